"""Textual-inversion embeddings: a name in the prompt stands for the file's vectors, A1111's way.

Every check compares with an independent reference: a copy of the text encoder whose token-embedding
matrix is extended with the embedding's vectors as new rows, fed token ids where the name's slots hold
those new rows' ids (what "the slots hold the embedding's vectors" means), read at the family's layer.
Weighting is checked against compel's formula written out here: ``empty + (z - empty) * weight``.
"""
from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.errors import ModelError

DEMO = Path(__file__).resolve().parent.parent / "builtin" / "sfumato-demo"
EMB = object()  # marks the embedding's slots in a reference prompt


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    from engine.tiny_models import build_sd1, build_sdxl

    root = tmp_path_factory.mktemp("ti-models")
    build_sd1(root / "Stable-diffusion" / "ti-sd1", seed=3)
    build_sdxl(root / "Stable-diffusion" / "ti-sdxl", seed=4, text_encoder_2_width=48)  # clip_l 32 wide, clip_g 48
    (root / "embeddings" / "sub").mkdir(parents=True)
    return root


@pytest.fixture(scope="module")
def registry(models_dir):
    from engine import ModelRegistry

    return ModelRegistry(models_dir, builtin_dir=DEMO.parent, device="cpu", cache_size=3)


def vectors(count: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed))


def write_safetensors(path: Path, **tensors: torch.Tensor) -> Path:
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path))
    return path


def reference(text_encoder, tokenizer, pieces: list, embedding: torch.Tensor | None, hidden: str = "last"):
    """(token embeddings at the chosen layer, pooled/projected output or None) for the prompt ``pieces``."""
    encoder = copy.deepcopy(text_encoder)
    vocab = encoder.get_input_embeddings().weight.shape[0]
    ids = [tokenizer.bos_token_id]
    for piece in pieces:
        if piece is EMB:
            ids += list(range(vocab, vocab + embedding.shape[0]))
        else:
            ids += tokenizer(piece, add_special_tokens=False).input_ids
    ids += [tokenizer.eos_token_id]
    ids += [tokenizer.pad_token_id] * (tokenizer.model_max_length - len(ids))
    if embedding is not None:
        table = torch.cat([encoder.get_input_embeddings().weight.detach(), embedding.to(encoder.dtype)])
        encoder.set_input_embeddings(torch.nn.Embedding.from_pretrained(table))
    with torch.no_grad():
        output = encoder(torch.tensor([ids]), output_hidden_states=True)
    states = output.last_hidden_state if hidden == "last" else output.hidden_states[-2]
    return states, getattr(output, "text_embeds", None)


def sd1_reference(model, pieces, embedding):
    return reference(model.pipeline.text_encoder, model.pipeline.tokenizer, pieces, embedding)[0]


def test_embedding_takes_its_vectors_slots_sd1(registry, models_dir):
    emb = vectors(3, 32, seed=1)
    write_safetensors(models_dir / "embeddings" / "sub" / "glowy.safetensors", emb_params=emb)
    model = registry.load("ti-sd1")
    encoder = model.prompt_encoder
    own_weight = model.pipeline.text_encoder.get_input_embeddings().weight.clone()
    own_tokens = len(model.pipeline.tokenizer)

    got = encoder.encode("a glowy circle", "", 1, registry.embeddings)
    expected = sd1_reference(model, ["a", EMB, "circle"], emb)
    torch.testing.assert_close(got.prompt_embeds, expected, atol=1e-5, rtol=1e-5)
    assert [e.name for e in got.embeddings] == ["glowy"]

    as_text = encoder.encode("a glowy circle", "", 1, None).prompt_embeds  # the same word, tokenized as text
    assert (as_text - got.prompt_embeds).abs().max() > 1e-2
    torch.testing.assert_close(as_text, sd1_reference(model, ["a glowy circle"], None), atol=1e-5, rtol=1e-5)

    # A1111 finds the name by its tokens, so case does not matter; letters running on make another word.
    torch.testing.assert_close(encoder.encode("a GLOWY circle", "", 1, registry.embeddings).prompt_embeds, expected)
    assert encoder.encode("a glowyish circle", "", 1, registry.embeddings).embeddings == ()

    # The model's own text encoder and tokenizer are left as they were.
    text_encoder = model.pipeline.text_encoder
    assert torch.equal(text_encoder.get_input_embeddings().weight, own_weight)
    assert not text_encoder.get_input_embeddings()._forward_hooks
    assert len(model.pipeline.tokenizer) == own_tokens
    assert not any("sfumato-ti" in token for token in model.pipeline.tokenizer.get_vocab())


def test_weighting_syntax_around_the_name(registry, models_dir):
    emb = vectors(2, 32, seed=2)
    write_safetensors(models_dir / "embeddings" / "shadowy.safetensors", emb_params=emb)
    model = registry.load("ti-sd1")
    got = model.prompt_encoder.encode("a (shadowy:1.3) circle", "", 1, registry.embeddings).prompt_embeds
    z = sd1_reference(model, ["a", EMB, "circle"], emb)
    empty = sd1_reference(model, [], None)
    weights = torch.ones(z.shape[1])
    weights[2:4] = 1.3  # bos, "a", then the two vectors
    weighted = empty + (z - empty) * weights[None, :, None]
    expected = torch.where(weights[None, :, None] == 1, z, weighted)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    negative = model.prompt_encoder.encode("a circle", "[shadowy]", 1, registry.embeddings)
    assert [e.name for e in negative.embeddings] == ["shadowy"]


def test_sdxl_clip_l_clip_g_pair(registry, models_dir):
    clip_l, clip_g = vectors(2, 32, seed=5), vectors(2, 48, seed=6)
    write_safetensors(models_dir / "embeddings" / "xlthing.safetensors", clip_l=clip_l, clip_g=clip_g)
    model = registry.load("ti-sdxl")
    pipe = model.pipeline
    got = model.prompt_encoder.encode("a xlthing", "", 1, registry.embeddings)
    first, _ = reference(pipe.text_encoder, pipe.tokenizer, ["a", EMB], clip_l, hidden="penultimate")
    second, pooled = reference(pipe.text_encoder_2, pipe.tokenizer_2, ["a", EMB], clip_g, hidden="penultimate")
    torch.testing.assert_close(got.prompt_embeds, torch.cat([first, second], dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.pooled, pooled, atol=1e-5, rtol=1e-5)
    plain = model.prompt_encoder.encode("a xlthing", "", 1, None)
    assert (plain.pooled - got.pooled).abs().max() > 1e-3
    # Weighted, the pooled output comes through compel's provider and is read without the weights, as A1111 reads it.
    weighted = model.prompt_encoder.encode("a (xlthing:1.2)", "", 1, registry.embeddings)
    torch.testing.assert_close(weighted.pooled, pooled, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(weighted.prompt_embeds, got.prompt_embeds)


def test_a1111_pt_file_on_the_demo_model(registry, models_dir):
    emb = vectors(2, 64, seed=7)
    path = models_dir / "embeddings" / "demotoken.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": emb}, "name": "demotoken", "step": 1500,
                "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "demo"}, path)
    model = registry.load("sfumato-demo")
    got = model.prompt_encoder.encode("red demotoken", "", 1, registry.embeddings)
    pipe = model.pipeline
    expected = reference(pipe.text_encoder.float(), pipe.tokenizer, ["red", EMB], emb)[0]
    torch.testing.assert_close(got.prompt_embeds.float(), expected, atol=1e-4, rtol=1e-4)
    loaded = registry.embeddings.get("demotoken")
    assert (loaded.step, loaded.sd_checkpoint, loaded.count, loaded.shape) == (1500, "abcdef12", 2, 64)


def test_cache_keys_follow_the_file(registry, models_dir):
    path = write_safetensors(models_dir / "embeddings" / "cachey.safetensors", emb_params=vectors(1, 32, seed=8))
    model = registry.load("ti-sd1")
    encoder = model.prompt_encoder
    first = encoder.encode("cachey", "", 1, registry.embeddings)
    hits = encoder.hits
    assert encoder.encode("cachey", "", 1, registry.embeddings) is first and encoder.hits == hits + 1
    changed = vectors(1, 32, seed=9)
    write_safetensors(path, emb_params=changed)
    second = encoder.encode("cachey", "", 1, registry.embeddings)
    torch.testing.assert_close(second.prompt_embeds, sd1_reference(model, [EMB], changed), atol=1e-5, rtol=1e-5)
    # The same text without the library is the word, cached apart from the embedding's entry.
    assert not torch.equal(encoder.encode("cachey", "", 1, None).prompt_embeds, second.prompt_embeds)


def test_wrong_width_names_the_file(registry, models_dir):
    write_safetensors(models_dir / "embeddings" / "sdonething.safetensors", emb_params=vectors(1, 32, seed=10))
    model = registry.load("ti-sdxl")
    with pytest.raises(ModelError, match=r"sdonething\.safetensors.*another kind of model"):
        model.prompt_encoder.encode("sdonething", "", 1, registry.embeddings)
    write_safetensors(models_dir / "embeddings" / "narrowthing.safetensors", emb_params=vectors(1, 16, seed=10))
    with pytest.raises(ModelError, match=r"narrowthing\.safetensors"):
        registry.load("ti-sd1").prompt_encoder.encode("x", "narrowthing", 1, registry.embeddings)
    write_safetensors(models_dir / "embeddings" / "oddformat.safetensors", weights=vectors(1, 32, seed=10),
                      biases=vectors(1, 32, seed=11))
    with pytest.raises(ModelError, match=r"oddformat\.safetensors is not a known embedding format"):
        registry.load("ti-sd1").prompt_encoder.encode("oddformat", "", 1, registry.embeddings)


def test_truncated_file_is_an_error_and_the_state_is_kept(registry, models_dir):
    path = write_safetensors(models_dir / "embeddings" / "brokenish.safetensors", emb_params=vectors(2, 32, seed=11))
    model = registry.load("ti-sd1")
    encoder = model.prompt_encoder
    before = encoder.encode("a circle", "", 1, registry.embeddings).prompt_embeds.clone()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"brokenish\.safetensors.*(corrupt or truncated)"):
        encoder.encode("a brokenish circle", "", 1, registry.embeddings)
    assert not model.pipeline.text_encoder.get_input_embeddings()._forward_hooks
    encoder.clear()
    torch.testing.assert_close(encoder.encode("a circle", "", 1, registry.embeddings).prompt_embeds, before, atol=0, rtol=0)


def test_infotext_ti_hashes_round_trip(registry, models_dir):
    from engine import Engine
    from engine.infotext import loading_notes, parse_infotext, request_fields_from_infotext
    from engine.request import GenerationRequest

    path = models_dir / "embeddings" / "hashme.pt"
    torch.save({"string_to_param": {"*": vectors(1, 64, seed=12)}}, path)
    result = Engine(registry).generate(GenerationRequest(prompt="red hashme", negative_prompt="blue", model="sfumato-demo",
                                                         steps=1, width=64, height=64, seed=1))
    expected = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    info = result.images[0].infotext
    assert f'TI hashes: "hashme: {expected}"' in info
    assert parse_infotext(info)["TI hashes"] == f"hashme: {expected}"
    params = parse_infotext(info)
    assert not loading_notes(params, request_fields_from_infotext(params))  # a fact about the image, not a setting to apply


def api_client(registry, default_model: str):
    from types import SimpleNamespace

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from engine.settings import Settings
    from ui.api import install_api

    studio = SimpleNamespace(registry=registry, default_model=lambda: default_model, presets=SimpleNamespace(list=lambda: []),
                             settings=Settings(), extensions=None)
    app = FastAPI()
    install_api(app, studio)
    return TestClient(app)


def test_api_lists_embeddings_in_a1111_shape(registry, models_dir):
    write_safetensors(models_dir / "embeddings" / "apione.safetensors", emb_params=vectors(2, 32, seed=13))
    write_safetensors(models_dir / "embeddings" / "apixl.safetensors", clip_l=vectors(1, 32, seed=14),
                      clip_g=vectors(1, 48, seed=15))
    registry.load("ti-sd1")
    client = api_client(registry, "ti-sd1")
    body = client.get("/sdapi/v1/embeddings").json()
    assert body["loaded"]["apione"] == {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 32,
                                        "vectors": 2}
    assert body["skipped"]["apixl"]["vectors"] == 1 and "apixl" not in body["loaded"]
    (models_dir / "embeddings" / "apione.safetensors").unlink()
    assert client.post("/sdapi/v1/refresh-embeddings").status_code == 200
    assert "apione" not in client.get("/sdapi/v1/embeddings").json()["loaded"]


def test_diffusers_single_tensor_format_and_infotext_checks(registry, models_dir):
    from engine.networks.embeddings import infotext_problems, parse_ti_hashes

    emb = vectors(1, 32, seed=16)
    path = write_safetensors(models_dir / "embeddings" / "learned.safetensors", **{"<learned>": emb})
    model = registry.load("ti-sd1")
    got = model.prompt_encoder.encode("learned", "", 1, registry.embeddings).prompt_embeds
    torch.testing.assert_close(got, sd1_reference(model, [EMB], emb), atol=1e-5, rtol=1e-5)

    short = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert parse_ti_hashes(f"learned: {short}, other thing: 0123456789ab") == {"learned": short, "other thing": "0123456789ab"}
    assert infotext_problems({"TI hashes": f"learned: {short}"}, registry.embeddings) == []
    problems = infotext_problems({"TI hashes": "learned: 0123456789ab, nowhere: 0123456789ab"}, registry.embeddings)
    assert len(problems) == 2 and "not the file the picture used" in problems[0] and "nowhere" in problems[1]


def test_a_long_prompt_keeps_an_embedding_in_one_chunk(registry, models_dir):
    """Where the 75-token chunk would cut through the name's vectors, the chunk ends before them and they start
    the next chunk together (A1111's rule too): compel splits only at word ends or punctuation, and a vector's
    slot is neither."""
    emb = vectors(3, 32, seed=17)
    write_safetensors(models_dir / "embeddings" / "longy.safetensors", emb_params=emb)
    model = registry.load("ti-sd1")
    got = model.prompt_encoder.encode("a " * 73 + "longy", "", 1, registry.embeddings).prompt_embeds
    assert got.shape[1] == 2 * 77
    second = sd1_reference(model, [EMB], emb)
    torch.testing.assert_close(got[:, 77 + 1:], second[:, 1:], atol=1e-5, rtol=1e-5)  # position 0: compel copies chunk 1's


def reference_many(text_encoder, tokenizer, pieces: list) -> torch.Tensor:
    """Like ``reference``, with each embedding given in ``pieces`` as its own [vectors, width] tensor."""
    encoder = copy.deepcopy(text_encoder)
    table = encoder.get_input_embeddings().weight.detach()
    ids = [tokenizer.bos_token_id]
    for piece in pieces:
        if isinstance(piece, torch.Tensor):
            ids += list(range(table.shape[0], table.shape[0] + piece.shape[0]))
            table = torch.cat([table, piece])
        else:
            ids += tokenizer(piece, add_special_tokens=False).input_ids
    ids += [tokenizer.eos_token_id]
    ids += [tokenizer.pad_token_id] * (tokenizer.model_max_length - len(ids))
    encoder.set_input_embeddings(torch.nn.Embedding.from_pretrained(table))
    with torch.no_grad():
        return encoder(torch.tensor([ids])).last_hidden_state


def test_several_embeddings_and_sets_in_turn(registry, models_dir):
    first, second = vectors(2, 32, seed=18), vectors(1, 32, seed=19)
    write_safetensors(models_dir / "embeddings" / "duoone.safetensors", emb_params=first)
    write_safetensors(models_dir / "embeddings" / "duotwo.safetensors", emb_params=second)
    model = registry.load("ti-sd1")
    pipe = model.pipeline
    for prompt, pieces in (("duotwo x", [second, "x"]), ("duoone y duotwo", [first, "y", second]),
                           ("duoone", [first]), ("duotwo duoone duotwo", [second, first, second])):
        got = model.prompt_encoder.encode(prompt, "", 1, registry.embeddings).prompt_embeds
        torch.testing.assert_close(got, reference_many(pipe.text_encoder, pipe.tokenizer, pieces), atol=1e-5, rtol=1e-5)
