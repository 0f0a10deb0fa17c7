"""CUDA's `torch.randn`, reproduced on any device: A1111's "NV" RNG source.

Most shared AUTOMATIC1111 infotexts carry no `RNG:` key, which means their noise came from
`torch.randn` on an NVIDIA GPU. That noise is a fixed function of the seed, so it can be computed
on the CPU:

- The generator is Philox 4x32-10 (Salmon, Moraes, Dror and Shaw, "Parallel random numbers:
  as easy as 1, 2, 3", SC'11), keyed by the 64-bit seed split into two 32-bit words.
- PyTorch's CUDA normal kernel gives element i of a tensor the first of the four normals that
  curand's `curand_normal4` makes from the stream with counter (offset, 0, i, 0). That holds while
  the tensor fits in one pass of the kernel's grid: 2048 threads per multiprocessor, so 270,336
  elements on a 132-SM H200, far more than an SDXL latent (65,536). Larger tensors depend on the
  GPU's multiprocessor count, so no CPU emulation can be exact for them.
- Each `torch.randn` call moves the counter's first word on by one.
- curand turns two 32-bit words into a normal by Box-Muller: u = x·2⁻³² + 2⁻³³,
  v = y·2π·2⁻³² + π·2⁻³², normal = √(−2 ln u) · sin v, all in float32.

Why this is close, not bit-exact: on the device, curand computes ln and sin with the GPU's
approximate hardware instructions (`__logf`, `__sincosf`), whose rounding no CPU library
reproduces. Checked on an H200 (scripts/check_nv_rng_on_cuda.py; tests/fixtures/nv_rng_reference.json):
every element within 2.5e-6 of the GPU's, about one in five bit for bit. So the "NV" source stays
an experimental setting: its pictures match a GPU run's to well under one 8-bit level in practice,
but not by construction.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Philox 4x32 multipliers and Weyl key increments, from the paper.
_MULTIPLIERS = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
_KEY_INCREMENTS = (np.uint32(0x9E3779B9), np.uint32(0xBB67AE85))
_ROUNDS = 10

# curand's Box-Muller constants, as float32.
_TWO_POW_MINUS_32 = np.float32(2.3283064e-10)
_TWO_PI_TWO_POW_MINUS_32 = np.float32(2.3283064e-10 * 6.2831855)


def _multiply_high_low(word: np.ndarray, multiplier: np.uint64) -> tuple[np.ndarray, np.ndarray]:
    product = word.astype(np.uint64) * multiplier
    return (product >> np.uint64(32)).astype(np.uint32), (product & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def philox4x32_10(counter: tuple[np.ndarray, ...], key: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """Ten Philox rounds over arrays of 4-word counters (each word a uint32 array); returns the 4 output words."""
    c0, c1, c2, c3 = (np.asarray(word, dtype=np.uint32) for word in counter)
    k0, k1 = np.uint32(key[0]), np.uint32(key[1])
    with np.errstate(over="ignore"):
        for round_index in range(_ROUNDS):
            if round_index:
                k0, k1 = k0 + _KEY_INCREMENTS[0], k1 + _KEY_INCREMENTS[1]
            high0, low0 = _multiply_high_low(c0, _MULTIPLIERS[0])
            high1, low1 = _multiply_high_low(c2, _MULTIPLIERS[1])
            c0, c1, c2, c3 = high1 ^ c1 ^ k0, low1, high0 ^ c3 ^ k1, low0
    return c0, c1, c2, c3


def _fused_multiply_add_f32(x: np.ndarray, scale: np.float32, add: np.float32) -> np.ndarray:
    # nvcc contracts curand's `x * scale + add` into one FMA: one rounding, which float64 reproduces
    # (a float32 product is exact in float64).
    return (x.astype(np.float64) * np.float64(scale) + np.float64(add)).astype(np.float32)


def box_muller_sin(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The first output of curand's Box-Muller transform for 32-bit words x and y."""
    u = _fused_multiply_add_f32(x.astype(np.float32), _TWO_POW_MINUS_32, _TWO_POW_MINUS_32 / np.float32(2))
    v = _fused_multiply_add_f32(y.astype(np.float32), _TWO_PI_TWO_POW_MINUS_32, _TWO_PI_TWO_POW_MINUS_32 / np.float32(2))
    radius = np.sqrt(np.float32(-2.0) * np.log(u))
    return (radius * np.sin(v)).astype(np.float32)


@dataclass
class PhiloxNormalGenerator:
    """A seeded stream of CUDA-equal normal tensors: call `randn` as often as the GPU run called torch.randn."""

    seed: int
    offset: int = 0

    def randn(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        count = int(np.prod(tuple(shape), dtype=np.int64))
        if count >= 2**32:
            raise ValueError(f"NV noise: a tensor of {count} elements is beyond one Philox subsequence word")
        seed = int(self.seed) & 0xFFFFFFFFFFFFFFFF
        key = (seed & 0xFFFFFFFF, seed >> 32)
        zeros = np.zeros(count, dtype=np.uint32)
        counter = (np.full(count, self.offset & 0xFFFFFFFF, dtype=np.uint32), zeros,
                   np.arange(count, dtype=np.uint32), zeros)
        self.offset += 1
        words = philox4x32_10(counter, key)
        return torch.from_numpy(box_muller_sin(words[0], words[1]).reshape(tuple(shape)))
