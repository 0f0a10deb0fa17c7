"""A1111's noise sources: per-image generators, ENSD, variation seeds, NV, and the SDE samplers' Brownian trees."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.errors import ValidationError
from engine.sampling.noise import ImageNoise, ancestral_noise, brownian_noise
from tests._kdiffusion import load

SHAPE = (4, 8, 8)
CUDA_REFERENCE = Path(__file__).resolve().parent / "fixtures" / "nv_rng_reference.json"
GPU_TRANSCENDENTAL_TOLERANCE = 3e-6  # curand's approximate ln/sin on the GPU, as in test_philox_noise.py


def _cpu_draws(seed: int, count: int, shape=SHAPE) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(count)]


def _a1111_style_slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Written here from the facts: per (channel, column) along the height axis of a (C, H, W) tensor."""
    result = torch.empty_like(low)
    for c in range(low.shape[0]):
        for w in range(low.shape[2]):
            a, b = low[c, :, w].double(), high[c, :, w].double()
            omega = torch.acos(torch.clamp((a / a.norm()) @ (b / b.norm()), -1, 1))
            result[c, :, w] = ((torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)).float()
    return result


def test_cpu_start_noise_is_torch_randn_of_a_seeded_cpu_generator():
    noise = ImageNoise(SHAPE, [4242]).first()
    assert noise.shape == (1, *SHAPE) and noise.dtype == torch.float32
    assert torch.equal(noise[0], _cpu_draws(4242, 1)[0])


def test_image_i_of_a_batch_equals_a_single_run_at_its_seed():
    seeds = [100, 101, 102]
    batch = ImageNoise(SHAPE, seeds)
    batch_draws = [batch.first(), batch.next(), batch.next()]
    for i, seed in enumerate(seeds):
        single = ImageNoise(SHAPE, [seed])
        for drawn, single_drawn in zip(batch_draws, [single.first(), single.next(), single.next()]):
            assert torch.equal(drawn[i], single_drawn[0])
        assert torch.equal(batch_draws[2][i], _cpu_draws(seed, 3)[2])


def test_next_before_first_gives_the_start_noise():
    assert torch.equal(ImageNoise(SHAPE, [7]).next(), ImageNoise(SHAPE, [7]).first())


def test_ensd_reseeds_the_ancestral_draws_but_not_the_start_noise():
    plain, delta = ImageNoise(SHAPE, [555]), ImageNoise(SHAPE, [555], eta_noise_seed_delta=31337)
    assert torch.equal(plain.first(), delta.first())
    plain_next, delta_next = plain.next(), delta.next()
    assert not torch.allclose(plain_next, delta_next)
    assert torch.equal(plain_next[0], _cpu_draws(555, 2)[1])
    assert torch.equal(delta_next[0], _cpu_draws(555 + 31337, 1)[0])
    assert torch.equal(delta.next()[0], _cpu_draws(555 + 31337, 2)[1])


def test_ancestral_noise_draws_the_images_next_noise():
    noise = ImageNoise(SHAPE, [9, 10])
    noise.first()
    source = ancestral_noise(noise)
    drawn = source(torch.tensor(2.0), torch.tensor(1.0))
    assert torch.equal(drawn[0], _cpu_draws(9, 2)[1])
    assert torch.equal(drawn[1], _cpu_draws(10, 2)[1])


def test_variation_seed_is_blended_by_a1111s_slerp():
    seed, subseed = 1000, 2000
    noise, subnoise = _cpu_draws(seed, 1)[0], _cpu_draws(subseed, 1)[0]
    blended = ImageNoise(SHAPE, [seed], subseeds=[subseed], subseed_strength=0.3).first()[0]
    assert torch.allclose(blended, _a1111_style_slerp(0.3, noise, subnoise), atol=1e-5)
    assert torch.allclose(ImageNoise(SHAPE, [seed], subseeds=[subseed], subseed_strength=1.0).first()[0],
                          subnoise, atol=1e-5)
    assert torch.equal(ImageNoise(SHAPE, [seed], subseeds=[subseed], subseed_strength=0.0).first()[0], noise)


def test_variation_seed_leaves_the_ancestral_draws_and_pads_with_seed_zero():
    varied = ImageNoise(SHAPE, [1, 2], subseeds=[77], subseed_strength=0.5)
    start = varied.first()
    assert torch.allclose(start[1], _a1111_style_slerp(0.5, _cpu_draws(2, 1)[0], _cpu_draws(0, 1)[0]), atol=1e-5)
    assert torch.equal(varied.next()[0], _cpu_draws(1, 2)[1])


def test_nv_noise_matches_torch_randn_recorded_on_a_cuda_gpu():
    reference = json.loads(CUDA_REFERENCE.read_text())
    cases = [case for case in reference["cases"] if case["shape"] == [4, 64, 64] and case["seed"] in (42, 8589934597)]
    for seed in (42, 8589934597):
        noise = ImageNoise((4, 64, 64), [seed], source="NV")
        draws = [noise.first(), noise.next(), noise.next()]
        for case in (case for case in cases if case["seed"] == seed):
            drawn = draws[case["call"]][0].numpy().reshape(-1)
            cuda = np.array(case["bits"], dtype=np.uint32).view(np.float32)
            assert np.abs(drawn[case["indices"]] - cuda).max() < GPU_TRANSCENDENTAL_TOLERANCE


def test_nv_start_noise_is_philox_noise_for_the_seed():
    from engine.philox_noise import PhiloxNormalGenerator

    assert torch.equal(ImageNoise(SHAPE, [31, 32], source="NV").first()[1], PhiloxNormalGenerator(32).randn(SHAPE))


def test_gpu_source_without_cuda_is_refused_with_a_hint_to_use_nv():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(ValidationError) as refused:
        ImageNoise(SHAPE, [1], source="GPU")
    assert refused.value.field == "rng" and "NV" in refused.value.message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_source_draws_on_a_cuda_generator():
    noise = ImageNoise(SHAPE, [5], source="GPU", device="cuda")
    generator = torch.Generator("cuda").manual_seed(5)
    assert torch.equal(noise.first()[0], torch.randn(SHAPE, generator=generator, device="cuda"))
    assert torch.equal(noise.next()[0], torch.randn(SHAPE, generator=generator, device="cuda"))


def test_unknown_source_is_refused():
    with pytest.raises(ValidationError):
        ImageNoise(SHAPE, [1], source="TPU")


def test_noise_sources_leave_the_global_rng_alone():
    state = torch.get_rng_state()
    noise = ImageNoise(SHAPE, [1, 2], subseeds=[3, 4], subseed_strength=0.4, eta_noise_seed_delta=5)
    x = noise.first()
    noise.next()
    sigmas = torch.tensor([14.6, 3.0, 0.5, 0.03, 0.0])
    brownian_noise(x, sigmas, [1, 2])(sigmas[1], sigmas[2])
    ImageNoise(SHAPE, [1], source="NV").next()
    assert torch.equal(torch.get_rng_state(), state)


def _sigma_pairs(sigmas: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    pairs = [(sigmas[i], sigmas[i + 1]) for i in range(len(sigmas) - 2)]
    midpoint = (sigmas[1] * sigmas[2]).sqrt()
    return pairs + [(sigmas[1], midpoint), (midpoint, sigmas[2]), (sigmas[0], sigmas[-2])]


def test_brownian_noise_equals_kdiffusions_brownian_tree_with_per_image_seeds():
    k_sampling, _ = load()
    seeds = [12, 3456789]
    x = torch.zeros((2, *SHAPE))
    sigmas = torch.tensor([14.6, 6.1, 2.2, 0.7, 0.16, 0.03, 0.0])
    ours = brownian_noise(x, sigmas, seeds)
    theirs = k_sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seeds)
    for sigma, sigma_next in _sigma_pairs(sigmas):
        drawn = ours(sigma, sigma_next)
        assert drawn.shape == x.shape
        assert torch.equal(drawn, theirs(sigma, sigma_next))


def test_brownian_noise_repeats_for_a_seed_and_is_per_image():
    sigmas = torch.tensor([14.6, 4.0, 1.0, 0.2, 0.03, 0.0])
    batch = torch.zeros((2, *SHAPE))
    first = [brownian_noise(batch, sigmas, [8, 9])(a, b) for a, b in _sigma_pairs(sigmas)]
    second = [brownian_noise(batch, sigmas, [8, 9])(a, b) for a, b in _sigma_pairs(sigmas)]
    alone = [brownian_noise(batch[:1], sigmas, [9])(a, b) for a, b in _sigma_pairs(sigmas)]
    for a, b, single in zip(first, second, alone):
        assert torch.equal(a, b)
        assert torch.equal(a[1], single[0])
        assert not torch.allclose(a[0], a[1])
    # Unit variance: each increment is divided by the square root of its length.
    assert abs(torch.cat([draw.flatten() for draw in first]).std().item() - 1) < 0.1
