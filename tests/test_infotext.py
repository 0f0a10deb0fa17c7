"""A1111 infotext: exact shape when written, tolerant when read, lossless round trip."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from engine.sampling import table as samplers
from engine.errors import ValidationError
from engine.infotext import (
    NEGATIVE_PREFIX,
    VERSION,
    build_infotext,
    format_number,
    loading_notes,
    parse_infotext,
    quote,
    request_fields_from_infotext,
)
from engine.request import INPAINT_AREAS, MASKED_CONTENT, RESIZE_MODES, GenerationRequest
from engine.seeds import MAX_SEED

INIT = Image.new("RGB", (64, 64), "gray")
MASK = Image.new("L", (64, 64), 255)


def test_txt2img_infotext_has_exact_a1111_shape():
    request = GenerationRequest(prompt="a cat", negative_prompt="blurry", sampler="DPM++ 2M", schedule="Karras", width=512, height=512)
    text = build_infotext(request, seed=123, model_name="name", model_hash="1a2b3c4d5e")
    assert text == (
        "a cat\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 512x512, "
        f"Model hash: 1a2b3c4d5e, Model: name, RNG: CPU, Version: {VERSION}"
    )


def test_negative_line_left_out_when_empty_and_empty_values_omitted():
    text = build_infotext(GenerationRequest(prompt="a cat"), seed=1, model_name=None, model_hash="")
    # "Automatic" is written resolved, as A1111 writes it (DPM++ 2M's default is Karras); RNG is written unless it is
    # A1111's GPU default, since a missing key means GPU noise
    assert text.splitlines() == ["a cat", f"Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, RNG: CPU, Version: {VERSION}"]
    assert NEGATIVE_PREFIX not in text and "Model" not in text and "Size" not in text


def test_explicit_size_is_written_when_request_uses_native_size():
    text = build_infotext(GenerationRequest(), seed=1, model_name=None, model_hash=None, size=(64, 96))
    assert "Size: 64x96" in text


def test_numbers_formatted_like_a1111():
    assert format_number(7.0) == "7"
    assert format_number(7.5) == "7.5"
    assert format_number(0.75) == "0.75"
    assert format_number(20) == "20"
    assert "CFG scale: 7.5," in build_infotext(GenerationRequest(cfg_scale=7.5), 1, None, None)


def test_values_with_commas_colons_or_quotes_are_json_quoted():
    assert quote("plain") == "plain"
    assert quote("a,b") == '"a,b"'
    assert quote("a: b") == '"a: b"'
    assert quote('say "hi"') == '"say \\"hi\\""'
    text = build_infotext(GenerationRequest(), 1, "my, model", None, extra={"ControlNet 0": "Module: canny, Model: x, Weight: 1"})
    assert 'Model: "my, model"' in text
    assert 'ControlNet 0: "Module: canny, Model: x, Weight: 1", Version: ' in text


def test_variation_seed_written_only_with_strength():
    plain = build_infotext(GenerationRequest(subseed=5), 1, None, None)
    assert "Variation seed" not in plain
    varied = build_infotext(GenerationRequest(subseed_strength=0.3), 1, None, None, subseed=77)
    assert "Variation seed: 77, Variation seed strength: 0.3" in varied


def test_inpaint_options_written_with_a1111_keys():
    request = GenerationRequest(
        init_image=INIT, mask=MASK, mask_blur=8, invert_mask=True, masked_content="latent noise",
        inpaint_area="Only masked", inpaint_padding=48, denoising_strength=0.6, outpaint=(0, 64, 0, 0), zero_terminal_snr=True,
    )
    text = build_infotext(request, 9, None, None)
    for part in (
        "Denoising strength: 0.6", "Mask blur: 8", "Mask mode: Inpaint not masked", "Masked content: latent noise",
        "Inpaint area: Only masked", "Masked area padding: 48", 'Outpaint: "0,64,0,0"', "Noise Schedule: Zero Terminal SNR",
        "Resize mode: Just resize",
    ):
        assert part in text


def test_txt2img_leaves_out_img2img_options():
    text = build_infotext(GenerationRequest(), 1, None, None)
    assert "Denoising strength" not in text and "Mask blur" not in text and "Outpaint" not in text


def test_extension_keys_that_would_break_the_line_are_refused():
    with pytest.raises(ValidationError):
        build_infotext(GenerationRequest(), 1, None, None, extra={"Bad: key": "x"})
    with pytest.raises(ValidationError):
        build_infotext(GenerationRequest(), 1, None, None, extra={"Seed": "x"})


def test_parse_reads_real_a1111_text():
    text = (
        "masterpiece, (cat:1.2)\nsecond line\n"
        "Negative prompt: lowres,\nbad hands\n"
        'Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 512x768, Model hash: abc, '
        'Model: v1-5, Lora hashes: "x: 1, y: 2", Version: v1.6.0\n'
    )
    params = parse_infotext(text)
    assert params["Prompt"] == "masterpiece, (cat:1.2)\nsecond line"
    assert params["Negative prompt"] == "lowres,\nbad hands"
    assert params["Lora hashes"] == "x: 1, y: 2"
    assert params["Size-1"] == "512" and params["Size-2"] == "768"
    fields = request_fields_from_infotext(params)
    assert fields["sampler"] == "DPM++ 2M" and fields["schedule"] == "Karras"  # legacy name split
    assert fields["width"] == 512 and fields["height"] == 768 and fields["cfg_scale"] == 7.5 and fields["steps"] == 30
    assert fields["model"] == "v1-5"


def test_parse_without_parameters_is_all_prompt():
    assert parse_infotext("just a prompt\nover two lines") == {"Prompt": "just a prompt\nover two lines", "Negative prompt": ""}
    assert parse_infotext("") == {"Prompt": "", "Negative prompt": ""}


def test_parse_refuses_non_text():
    with pytest.raises(ValidationError):
        parse_infotext(b"Steps: 20")  # type: ignore[arg-type]


def test_invalid_and_unknown_values_are_skipped():
    params = parse_infotext("p\nSteps: many, Sampler: Warp drive, Schedule type: Karras, CFG scale: nan, Seed: 99999999999, Size: 7x7, Mask blur: 4, Foo: bar")
    fields = request_fields_from_infotext(params)
    assert fields == {"prompt": "p", "negative_prompt": "", "schedule": "Karras", "mask_blur": 4}
    assert request_fields_from_infotext("not a dict") == {}  # type: ignore[arg-type]


def test_euler_a_with_karras_is_read_as_written():
    fields = request_fields_from_infotext(parse_infotext("p\nSteps: 20, Sampler: Euler a, Schedule type: Karras, Seed: 1"))
    assert fields["sampler"] == "Euler a" and fields["schedule"] == "Karras"


def test_a_timestep_sampler_writes_no_schedule_type():
    text = build_infotext(GenerationRequest(prompt="p", sampler="DDIM", schedule="Karras"), seed=1, model_name=None, model_hash=None)
    assert "Schedule type" not in text  # A1111's DDIM, PLMS and UniPC ignore the schedule and do not name one


# --- property tests ------------------------------------------------------------

prompt_text = st.text(
    alphabet=st.one_of(st.sampled_from(list(',:"\n\\ ()[]{}<>=-|')), st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")),
    max_size=60,
)
combos = [(sampler, schedule) for sampler in samplers.sampler_names() for schedule in samplers.schedules_for(sampler)]


def _no_negative_marker(text: str) -> bool:
    return not any(line.startswith(NEGATIVE_PREFIX) for line in text.split("\n"))


@st.composite
def requests(draw):
    sampler, schedule = draw(st.sampled_from(combos))
    mode = draw(st.sampled_from(["txt2img", "img2img", "inpaint"]))
    values = dict(
        prompt=draw(prompt_text),
        negative_prompt=draw(prompt_text),
        sampler=sampler,
        schedule=schedule,
        zero_terminal_snr=draw(st.booleans()) and samplers.supports_zero_terminal_snr(sampler),
        steps=draw(st.integers(1, 150)),
        cfg_scale=draw(st.one_of(st.integers(0, 30), st.floats(0, 30, allow_nan=False))),
        width=draw(st.integers(8, 512)) * 8,
        height=draw(st.integers(8, 512)) * 8,
        subseed_strength=draw(st.one_of(st.just(0.0), st.floats(0, 1))),
        subseed=draw(st.integers(0, MAX_SEED)),
        clip_skip=draw(st.integers(1, 12)),
        eta=draw(st.one_of(st.none(), st.floats(0, 1))),
        eta_noise_seed_delta=draw(st.one_of(st.just(0), st.integers(0, 2**32 - 1))),
        rng=draw(st.sampled_from(["CPU", "GPU", "NV"])),
    )
    if mode != "txt2img":
        values.update(init_image=INIT, denoising_strength=draw(st.floats(0, 1)), resize_mode=draw(st.sampled_from(RESIZE_MODES)))
    if mode == "inpaint":
        values.update(
            mask=MASK, mask_blur=draw(st.integers(0, 64)), invert_mask=draw(st.booleans()),
            masked_content=draw(st.sampled_from(MASKED_CONTENT)), inpaint_area=draw(st.sampled_from(INPAINT_AREAS)),
            inpaint_padding=draw(st.integers(0, 256)), outpaint=tuple(draw(st.lists(st.integers(0, 1024), min_size=4, max_size=4))),
        )
    return GenerationRequest(**values)


@settings(deadline=None, max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(request=requests(), seed=st.integers(0, MAX_SEED), model=st.one_of(st.none(), prompt_text.filter(lambda s: s.strip() == s and s)))
def test_round_trip_reproduces_every_written_field(request, seed, model):
    assume(_no_negative_marker(request.prompt))  # the format itself cannot tell such a line from the negative prompt
    fields = request_fields_from_infotext(parse_infotext(build_infotext(request, seed, model, "abcdef0123")))
    expected = {
        "prompt": request.prompt, "negative_prompt": request.negative_prompt, "steps": request.steps,
        "sampler": request.sampler, "cfg_scale": float(request.cfg_scale), "seed": seed,
        "width": request.width, "height": request.height,
    }
    written_schedule = samplers.infotext_schedule(request.sampler, request.schedule)  # Automatic comes back resolved
    if written_schedule is not None:
        expected["schedule"] = written_schedule
    if model is not None:
        expected["model"] = model
    if request.subseed_strength > 0:
        expected.update(subseed=request.subseed, subseed_strength=request.subseed_strength)
    if request.zero_terminal_snr:
        expected["zero_terminal_snr"] = True
    if request.clip_skip != 1:
        expected["clip_skip"] = request.clip_skip
    if request.eta is not None and samplers.find_sampler(request.sampler).eta_default not in (None, request.eta):
        expected["eta"] = request.eta  # A1111 writes eta only when it differs from the sampler's default
    if request.eta_noise_seed_delta and samplers.find_sampler(request.sampler).noise != samplers.NO_NOISE:
        expected["eta_noise_seed_delta"] = request.eta_noise_seed_delta  # only samplers that draw noise write ENSD
    if request.rng != "GPU":  # A1111 leaves its default out, and so do we
        expected["rng"] = request.rng
    if request.mode != "txt2img":
        expected.update(denoising_strength=request.denoising_strength, resize_mode=request.resize_mode)
    if request.mode == "inpaint":
        expected.update(mask_blur=request.mask_blur, invert_mask=request.invert_mask, masked_content=request.masked_content, inpaint_area=request.inpaint_area)
        if request.inpaint_area == "Only masked":
            expected["inpaint_padding"] = request.inpaint_padding
        if any(request.outpaint):
            expected["outpaint"] = request.outpaint
    assert fields == expected


@settings(deadline=None, max_examples=100)
@given(text=st.one_of(
    st.text(max_size=300),
    st.lists(st.sampled_from(["Steps: 20", 'K: "x', ": ,", "Negative prompt:", "\n", "a-b/c: 1x2", '"\\"', "Size: 9x", ", ", "ü: ü"]), max_size=30).map("".join),
))
def test_parse_never_raises_on_any_text(text):
    params = parse_infotext(text)
    assert isinstance(params["Prompt"], str) and isinstance(params["Negative prompt"], str)
    assert all(isinstance(key, str) and isinstance(value, str) for key, value in params.items())
    fields = request_fields_from_infotext(params)
    assert set(fields) <= set(GenerationRequest.field_names())


def test_parse_of_a_huge_garbage_line_is_fast():
    import time

    start = time.perf_counter()
    parse_infotext("a" * 200_000 + "\n" + "word " * 100_000)
    assert time.perf_counter() - start < 2


def test_a1111s_noise_schedule_key_reads_as_zero_terminal_snr():
    """A1111 1.10 writes its "Noise schedule" setting as "Noise Schedule: Zero Terminal SNR"; older Sfumato PNGs say
    "Zero terminal SNR: True"."""
    for line in ("Noise Schedule: Zero Terminal SNR", "Zero terminal SNR: True"):
        fields = request_fields_from_infotext(parse_infotext(f"a cat\nSteps: 20, Sampler: Euler, {line}"))
        assert fields["zero_terminal_snr"] is True, line
    fields = request_fields_from_infotext(parse_infotext("a cat\nSteps: 20, Sampler: Euler, Noise Schedule: Default"))
    assert fields["zero_terminal_snr"] is False


def test_beta_schedule_writes_and_reads_a1111s_alpha_and_beta():
    """A1111 writes "Beta schedule alpha/beta" beside "Schedule type: Beta"; its defaults are what we run, others are
    reported as not applied."""
    text = build_infotext(GenerationRequest(prompt="a cat", sampler="Euler", schedule="Beta"), 1, None, None)
    assert "Schedule type: Beta" in text and "Beta schedule alpha: 0.6, Beta schedule beta: 0.6" in text
    params = parse_infotext(text)
    assert loading_notes(params, request_fields_from_infotext(params)) == []
    other = parse_infotext(text.replace("Beta schedule alpha: 0.6", "Beta schedule alpha: 0.5"))
    notes = loading_notes(other, request_fields_from_infotext(other))
    assert any("Beta schedule alpha: 0.5" in note for note in notes)
