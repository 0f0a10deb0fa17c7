"""Compare engine.philox_noise with torch.randn on a real CUDA device, and write the test fixture.

Run on a machine with an NVIDIA GPU:  python scripts/check_nv_rng_on_cuda.py OUT_DIR
It prints, for each seed and shape, how many elements the CPU emulation gets bit for bit and the
largest difference, and writes OUT_DIR/nv_rng_reference.json: sampled CUDA values (as float32 bit patterns) and the
SHA-256 of every whole tensor, which tests/test_philox_noise.py checks on any machine.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch

# Load the one module by path: the engine package imports diffusers, which a bare GPU machine may lack.
_spec = importlib.util.spec_from_file_location("philox_noise", Path(__file__).resolve().parent.parent / "engine" / "philox_noise.py")
philox_noise = importlib.util.module_from_spec(_spec)
sys.modules["philox_noise"] = philox_noise
_spec.loader.exec_module(philox_noise)
PhiloxNormalGenerator = philox_noise.PhiloxNormalGenerator

SEEDS = (0, 1, 42, 1234567890, 3_216_549_870, 2**33 + 5)
SHAPES = ((4, 64, 64), (4, 128, 128), (2, 3), (4, 96, 72))
CALLS_PER_SEED = 3  # the first noise, then two more draws (ancestral steps use later offsets)
SAMPLES_PER_TENSOR = 48
BEYOND_ONE_GRID_PASS = (4, 300, 300)  # 360,000 elements: more than 132 SMs x 2048 threads


def bits(array: np.ndarray) -> list[int]:
    return [int(word) for word in array.astype(np.float32).view(np.uint32)]


def compare(cuda: np.ndarray, cpu: np.ndarray) -> dict:
    ulps = np.abs(cuda.view(np.int32).astype(np.int64) - cpu.view(np.int32).astype(np.int64))
    return {"elements": int(cuda.size), "bit_equal": int((ulps == 0).sum()), "max_ulp": int(ulps.max()),
            "max_abs_diff": float(np.abs(cuda - cpu).max())}


def box_muller_variants(seed: int, count: int) -> dict[str, np.ndarray]:
    """Other float32 readings of curand's transform, to tell which one the GPU computes where the emulation differs."""
    key = (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)
    zeros = np.zeros(count, dtype=np.uint32)
    x, y, _, _ = philox_noise.philox4x32_10((zeros, zeros, np.arange(count, dtype=np.uint32), zeros), key)
    scale, scale_2pi = philox_noise._TWO_POW_MINUS_32, philox_noise._TWO_PI_TWO_POW_MINUS_32
    u_plain = x.astype(np.float32) * scale + scale / np.float32(2)
    v_plain = y.astype(np.float32) * scale_2pi + scale_2pi / np.float32(2)
    u_fma = philox_noise._fused_multiply_add_f32(x.astype(np.float32), scale, scale / np.float32(2))
    v_fma = philox_noise._fused_multiply_add_f32(y.astype(np.float32), scale_2pi, scale_2pi / np.float32(2))
    exact = lambda u, v: (np.sqrt(-2.0 * np.log(u.astype(np.float64))).astype(np.float32).astype(np.float64)
                          * np.sin(v.astype(np.float64)).astype(np.float32)).astype(np.float32)
    exact64 = lambda u, v: (np.sqrt(-2.0 * np.log(u.astype(np.float64))) * np.sin(v.astype(np.float64))).astype(np.float32)
    f32 = lambda u, v: (np.sqrt(np.float32(-2.0) * np.log(u)) * np.sin(v)).astype(np.float32)
    return {"plain_f32": f32(u_plain, v_plain), "fma_f32": f32(u_fma, v_fma), "fma_rounded_parts": exact(u_fma, v_fma),
            "fma_f64": exact64(u_fma, v_fma), "plain_f64": exact64(u_plain, v_plain)}


def main(out_dir: Path) -> None:
    assert torch.cuda.is_available(), "needs a CUDA device"
    print("device:", torch.cuda.get_device_name(), "torch", torch.__version__)
    cases = []
    for shape in SHAPES:
        for seed in SEEDS:
            torch.manual_seed(seed)
            emulation = PhiloxNormalGenerator(seed)
            for call in range(CALLS_PER_SEED):
                cuda = torch.randn(shape, device="cuda").cpu().numpy()
                cpu = emulation.randn(shape).numpy()
                stats = compare(cuda, cpu)
                picks = np.random.default_rng(seed + call).choice(cuda.size, size=min(SAMPLES_PER_TENSOR, cuda.size), replace=False)
                cases.append({"seed": seed, "shape": list(shape), "call": call,
                              "sha256": hashlib.sha256(cuda.astype(np.float32).tobytes()).hexdigest(),
                              "indices": [int(i) for i in picks], "bits": bits(cuda.reshape(-1)[picks]), **stats})
                print(f"seed {seed:>12} shape {shape} call {call}: {stats}")
    for seed in SEEDS[:3]:
        torch.manual_seed(seed)
        cuda = torch.randn(SHAPES[1], device="cuda").cpu().numpy().reshape(-1)
        for name, values in box_muller_variants(seed, cuda.size).items():
            print(f"variant {name:>18} seed {seed}: {compare(cuda, values)}")
    torch.manual_seed(7)
    cuda = torch.randn(BEYOND_ONE_GRID_PASS, device="cuda").cpu().numpy()
    beyond = compare(cuda, PhiloxNormalGenerator(7).randn(BEYOND_ONE_GRID_PASS).numpy())
    print("beyond one grid pass", BEYOND_ONE_GRID_PASS, beyond)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "multiprocessors": torch.cuda.get_device_properties(0).multi_processor_count,
              "cases": cases, "beyond_one_grid_pass": {"shape": list(BEYOND_ONE_GRID_PASS), **beyond}}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "nv_rng_reference.json").write_text(json.dumps(report))
    total = sum(case["elements"] for case in cases)
    equal = sum(case["bit_equal"] for case in cases)
    print(f"TOTAL bit-equal {equal}/{total}; max ulp {max(case['max_ulp'] for case in cases)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
