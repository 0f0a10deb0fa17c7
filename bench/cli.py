"""``python -m bench`` (and ``python launch.py bench``): run the benches, print a table, write JSON.

    python -m bench                 full run (the README's figures; minutes)
    python -m bench --quick         fewer repetitions and steps (development)
    python -m bench --smoke         tiny models, one repetition (CI; seconds)
    python -m bench --only peer,previews --out /tmp/b.json --write-readme
    python -m bench speed           Sfumato vs the diffusers pipeline at 64²-512², levers, per-step overhead (bench/speed.py)
    python -m bench startup         cold start to first picture; a full-size SD 1.5 single file's load vs diffusers (bench/startup.py)
    python -m bench --gpu           the same on CUDA: SD1.5- and SDXL-shaped models, it/s and peak VRAM (bench/gpu.py)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import traceback
from pathlib import Path
from typing import Callable

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "results" / "latest.json"
README = BENCH_DIR / "README.md"
# The benches, in the order they run; ``_benches`` maps each to its module's ``run``.
BENCH_NAMES = ("peer", "limit", "previews", "first_preview", "caches", "networks", "hires", "scaling", "upscaling", "serve")


def _benches() -> dict[str, Callable]:
    """Name → ``run(ctx) -> BenchResult``, in the order they run and print."""
    from . import caching, first_preview, hires, limit, networks, peer, previews, scaling, serve, upscaling

    return {"peer": peer.run, "limit": limit.run, "previews": previews.run, "first_preview": first_preview.run,
            "caches": caching.run, "networks": networks.run, "hires": hires.run, "scaling": scaling.run,
            "upscaling": upscaling.run, "serve": serve.run}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer repetitions and steps, for development")
    size.add_argument("--smoke", action="store_true", help="tiny models, one repetition, seconds: for the CI smoke test")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results path (default {DEFAULT_OUT.relative_to(BENCH_DIR.parent)})")
    parser.add_argument("--only", default="", help="comma-separated benches to run: " + ", ".join(
        BENCH_NAMES))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps", "auto"), help="torch device (default cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 with --smoke, else torch's default)")
    parser.add_argument("--write-readme", action="store_true", help="rewrite the results section of bench/README.md")
    return parser.parse_args(argv)


def _meta(mode_name: str, device: str, threads: int, notes: list[str]) -> dict:
    import diffusers
    import torch

    return {
        "mode": mode_name, "device": device, "threads": threads, "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "diffusers": diffusers.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "notes": notes,
    }


def _load_average() -> str:
    """The 1-minute load average: how busy the machine was (other programs included) around the run."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except (AttributeError, OSError):  # Windows
        return "n/a"


def headline(results: dict) -> dict:
    """The top-level keys other tools read: one number (or small dict) per goal."""
    peer = results.get("engine_vs_diffusers") or {}
    limit = results.get("engine_vs_limit") or {}
    previews = results.get("preview_cost") or {}
    first = results.get("first_preview") or {}
    scaling = results.get("scaling") or {}
    return {
        "engine_vs_diffusers": {family: {key: figures.get(key) for key in ("cold_prompt", "warm_prompt", "max_pixel_diff", "model")}
                                for family, figures in peer.items()} or None,
        "engine_vs_limit": (limit.get("sd1") or {}).get("ratio"),
        "preview_cost": {key: previews.get(key) for key in ("cheap", "full")} if previews else None,
        "first_preview_ms": {key: first.get(key, {}).get("median_ms") for key in ("gradio", "browser", "http")} if first else None,
        "step_ms": (limit.get("sd1") or {}).get("step_ms"),
        "peak_rss_mb": scaling.get("process_peak_rss_mb"),
    }


def _run_benches(args, mode, threads, chosen, benches, out_path):
    from .fixtures import BenchContext, BenchModels
    from .report import BenchResult

    models = BenchModels.create(mode, device=args.device)
    for note in models.notes:
        print(f"note: {note}")
    ctx = BenchContext(mode, models, models.engine(), out_path.parent, log=lambda line: print(line, flush=True), threads=threads)
    results, figures, failed = [], {}, []
    try:
        for name in chosen:
            print(f"[{name}]", flush=True)
            try:
                result = benches[name](ctx)
            except Exception as error:  # noqa: BLE001 - one broken bench must not hide the others
                traceback.print_exc()
                failed.append(name)
                result = BenchResult(name, name, skipped=f"error: {type(error).__name__}: {error}")
            results.append(result)
            figures[result.name] = result.figures if not result.skipped else {"skipped": result.skipped}
    finally:
        models.close()
    return models, results, figures, failed


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["startup"]:  # python -m bench startup: cold start to first picture, a 2 GB single file's load
        from . import startup

        return startup.main(argv[1:])
    if argv[:1] == ["speed"]:  # python -m bench speed: Sfumato vs the diffusers pipeline, levers, per-step overhead
        from . import speed

        return speed.main(argv[1:])
    if "--gpu" in argv:  # python -m bench --gpu: the same figures on CUDA
        from . import gpu

        return gpu.main([arg for arg in argv if arg != "--gpu"])
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    mode_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    threads = args.threads or (1 if args.smoke else None)
    if threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))

    from engine.compute import run_on_compute_thread

    from .fixtures import quiet_libraries
    from .report import text_table, write_readme
    from .timing import MODES, max_rss_mb, set_threads

    quiet_libraries()
    threads = set_threads(threads)
    mode = MODES[mode_name]
    benches = _benches()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()] or list(benches)
    unknown = [name for name in chosen if name not in benches]
    if unknown:
        print(f"unknown bench(es): {', '.join(unknown)}; choose from {', '.join(benches)}", file=sys.stderr)
        return 2

    out_path: Path = args.out
    out_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"sfumato bench, {mode_name} mode, device {args.device}, {threads} torch thread(s)")
    load_before = _load_average()
    # Every bench runs on the engine's compute thread, where Engine.generate runs anyway: the peer
    # pipelines, the floor's bare UNet calls and the tiny-model builds then share its OpenMP team
    # instead of making a second one that would slow every op down (see engine.compute).
    models, results, figures, failed = run_on_compute_thread(_run_benches, args, mode, threads, chosen, benches, out_path)

    meta = _meta(mode_name, str(models.registry.device), threads, models.notes)
    meta["load_average"] = f"{load_before} → {_load_average()}"
    meta["process_peak_rss_mb"] = round(max_rss_mb(), 1)
    scaling = figures.get("scaling") or {}
    if scaling.get("plot"):
        meta["plot"] = os.path.relpath(out_path.parent / scaling["plot"], README.parent)
    clean = {key: (value if "skipped" not in value else {}) for key, value in figures.items()}
    document = {**headline(clean), "meta": meta, "details": figures}
    if document["peak_rss_mb"] is None:
        document["peak_rss_mb"] = meta["process_peak_rss_mb"]
    out_path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print()
    print(text_table(results))
    print(f"\nwrote {out_path}")
    if args.write_readme:
        write_readme(README, results, meta)
        print(f"wrote {README}")
    return 1 if failed else 0
