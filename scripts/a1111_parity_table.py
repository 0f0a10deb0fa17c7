"""Print the A1111 parity matrix: each sampler × schedule A1111 1.10 offers, our engine's max pixel
difference from the independent reference (tests/a1111_reference) in /255, or why the engine refused it.

    .venv/bin/python scripts/a1111_parity_table.py [--model sfumato-demo|tiny-sd1|tiny-sdxl] [--samplers "Euler,DDIM"] [--markdown]

The demo model runs the full matrix by default; the tiny eps SD 1.x and SDXL models are built on the fly.
A cell is "matched" at ≤ 2/255; "=" after the number marks a bit-identical picture under A1111's
truncating uint8 conversion, "~" under the rounding one, "≡" a bit-identical decoded latent (the pixels then
differ only by the uint8 conversion).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

torch.set_num_threads(1)

from tests.a1111_reference import SAMPLERS, SCHEDULE_NAMES  # noqa: E402
from tests.a1111_reference.ref_parity import TOLERANCE, ReferenceCache, compare  # noqa: E402


def _engine_for(model: str, workdir: Path):
    from engine import Engine, ModelRegistry

    if model == "sfumato-demo":
        registry = ModelRegistry(None, builtin_dir=ROOT / "builtin")
    else:
        from engine.tiny_models import build_sd1, build_sdxl

        checkpoints = workdir / "Stable-diffusion"
        (build_sdxl if model == "tiny-sdxl" else build_sd1)(checkpoints / model, seed=2 if model == "tiny-sdxl" else 0)
        registry = ModelRegistry(workdir, builtin_dir=None, cache_size=2)
    return Engine(registry), registry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sfumato-demo")
    parser.add_argument("--samplers", default="", help="comma-separated subset (default: all 20)")
    parser.add_argument("--schedules", default="", help="comma-separated subset (default: all 12)")
    parser.add_argument("--markdown", action="store_true", help="a Markdown table for the README")
    args = parser.parse_args(argv)
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()] or list(SAMPLERS)
    schedules = [s.strip() for s in args.schedules.split(",") if s.strip()] or list(SCHEDULE_NAMES)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        engine, registry = _engine_for(args.model, Path(workdir))
        cache = ReferenceCache()
        outcomes = {}
        for sampler in samplers:
            for schedule in schedules:
                outcomes[sampler, schedule] = compare(engine, registry, args.model, sampler, schedule, cache=cache)
                print(f"  {sampler} + {schedule}: {outcomes[sampler, schedule].cell()}", file=sys.stderr, flush=True)

    def cell(o):
        if o.refused is not None:
            return "refused"
        mark = "=" if o.exact_truncation else "~" if o.exact_rounding else "≡" if o.latent_diff == 0 else ""
        return f"{o.max_diff}{mark}" + ("" if o.matched else " ✗")

    if args.markdown:
        print("| Sampler | " + " | ".join(schedules) + " |")
        print("|---" * (len(schedules) + 1) + "|")
        for sampler in samplers:
            print(f"| {sampler} | " + " | ".join(cell(outcomes[sampler, k]) for k in schedules) + " |")
    else:
        width = max(len(s) for s in samplers) + 2
        print("".ljust(width) + "".join(k[:11].ljust(12) for k in schedules))
        for sampler in samplers:
            print(sampler.ljust(width) + "".join(cell(outcomes[sampler, k])[:11].ljust(12) for k in schedules))
    refusals = sorted({o.refused for o in outcomes.values() if o.refused})
    if refusals:
        print("\nRefusals:")
        for reason in refusals:
            count = sum(1 for o in outcomes.values() if o.refused == reason)
            print(f"  {count:3d} × {reason}")
    measured = [o for o in outcomes.values() if o.max_diff is not None]
    matched = sum(o.matched for o in outcomes.values())
    worst = max(measured, key=lambda o: o.max_diff, default=None)
    print(f"\n{args.model}: {matched} of {len(outcomes)} combinations A1111 offers match within {TOLERANCE}/255; "
          f"{len(outcomes) - len(measured)} refused; "
          + (f"worst measured diff {worst.max_diff}/255 ({worst.sampler} + {worst.schedule})" if worst else "nothing measured")
          + f"; exact under truncation {sum(o.exact_truncation for o in measured)}, under rounding {sum(o.exact_rounding for o in measured)}"
          + f", bit-identical latent {sum(o.latent_diff == 0 for o in measured)}"
          + (f", worst latent diff {max(latents):.1e} of the latent's std" if (latents := [o.latent_diff for o in measured
                                                                                         if o.latent_diff is not None]) else "")
          + f"; {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
