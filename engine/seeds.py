"""Seeds: the range A1111 allows, and "-1 means pick one".

Noise itself (per-image CPU generators, variation seeds, ENSD, the Brownian tree) is ``engine.sampling.noise``:
image ``i`` of a batch uses ``seed + i`` and so equals a single run at that seed, on any device.
"""
from __future__ import annotations

import random

MAX_SEED = 2**32 - 1


def resolve_seed(seed: int) -> int:
    """-1 means "pick one"; the picked seed is reported back to the artist."""
    return random.randint(0, MAX_SEED) if seed == -1 else int(seed)
