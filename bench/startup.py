"""``python -m bench startup`` (``python launch.py bench startup``): what a user waits for before the first picture.

Two figures of issue #22, reported (no goal is set for them):

- **Cold start to first picture**: a fresh Python process imports the engine, loads the built-in demo model and
  draws one picture at its defaults; the parent times it from spawn to the picture's arrival, and the child says
  how that splits (imports, model load, generation). Repeated ``--runs`` times; the OS file cache is warm after the
  first, as it is for a user who restarts the studio.
- **Full-size SD 1.5 single file**: a random-weight checkpoint of SD 1.5's exact architecture (UNet 860M, VAE 84M,
  CLIP ViT-L/14 123M parameters) in the original CompVis key layout at fp16, about 2.1 GB, built here in a temporary
  folder and deleted afterwards (never committed). Sfumato's load of it (``ModelRegistry.load``: its shipped SD 1.5
  configs, the name-by-name key check, then diffusers' converter) against diffusers'
  ``StableDiffusionPipeline.from_single_file`` given the same local configs, in interleaved pairs, both reading the
  file from a warm OS cache. The pipeline each side returns is dropped before the next load. Sfumato's first load
  of a file also hashes it (A1111's "Model hash"; reported apart); the studio keeps the digest across runs.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DEFAULT_OUT = BENCH_DIR / "results" / "startup.json"
CHECKPOINT_NAME = "sd15-random-fullsize"

# The child process of the cold-start figure: its own clock from its first line, then each phase.
_CHILD = r"""
import time
started = time.perf_counter()
import json, os, sys
import torch
torch.set_num_threads(int(sys.argv[1]))
from engine import Engine, GenerationRequest, ModelRegistry
imported = time.perf_counter()
registry = ModelRegistry(None)
engine = Engine(registry)
model = registry.default_name()
registry.load(model)
loaded = time.perf_counter()
result = engine.generate(GenerationRequest(prompt="a large red circle on the left, blue background", model=model, seed=1,
                                           preview_every=0))
result.images[0].image.load()
drawn = time.perf_counter()
print(json.dumps({"model": model, "import_s": imported - started, "load_s": loaded - imported,
                  "generate_s": drawn - loaded, "steps": result.request.steps}))
"""


def cold_start(runs: int, threads: int) -> dict:
    """Spawn → first picture of a fresh process, ``runs`` times (the first with whatever the OS cache holds)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    totals, phases = [], []
    for _ in range(runs):
        tick = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", _CHILD, str(threads)], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=600)
        total = time.perf_counter() - tick
        if done.returncode != 0:
            raise RuntimeError(f"the cold-start child failed: {done.stderr[-2000:]}")
        totals.append(total)
        phases.append(json.loads(done.stdout.strip().splitlines()[-1]))
    best = min(range(runs), key=lambda i: totals[i])
    return {"model": phases[0]["model"], "steps": phases[0]["steps"], "runs_s": [round(t, 2) for t in totals], "best_s": round(totals[best], 2),
            "best_split_s": {key: round(value, 2) for key, value in phases[best].items() if key.endswith("_s")},
            "interpreter_start_s": round(totals[best] - sum(v for k, v in phases[best].items() if k.endswith("_s")), 2)}


def build_full_size_sd15(folder: Path) -> tuple[Path, Path]:
    """(single file, diffusers config folder): random weights in SD 1.5's architecture from the engine's own
    shipped SD 1.5 configs, saved in the original key layout at fp16."""
    import shutil

    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from engine.checkpoint_convert import save_single_file

    configs = REPO / "engine" / "configs" / "sd1"
    config_dir = folder / "diffusers-config"
    shutil.copytree(configs, config_dir)
    tokenizer_dir = config_dir / "tokenizer"
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(REPO / "engine" / "configs" / "clip_tokenizer" / name, tokenizer_dir / name)
    torch.manual_seed(0)
    with torch.no_grad():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet")).half()
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae")).half()
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder")).half()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
                                   unet=unet, scheduler=PNDMScheduler.from_pretrained(configs / "scheduler"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    checkpoint = save_single_file(pipe, folder / "models" / "Stable-diffusion" / f"{CHECKPOINT_NAME}.safetensors")
    del pipe, unet, vae, text_encoder
    gc.collect()
    return checkpoint, config_dir


def _read_through(path: Path) -> None:
    """Read the file once so both sides find it in the OS cache."""
    with open(path, "rb") as handle:
        while handle.read(64 << 20):
            pass


def single_file_load(folder: Path, pairs: int) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline

    from engine import ModelRegistry

    from .timing import median

    tick = time.perf_counter()
    checkpoint, config_dir = build_full_size_sd15(folder)
    build_s = time.perf_counter() - tick
    _read_through(checkpoint)
    # The engine finds the file in models/Stable-diffusion with no config beside it (its shipped SD 1.5 configs);
    # diffusers is handed the same configs as a local folder (it would fetch them from the hub otherwise).

    def engine_load() -> float:
        registry = ModelRegistry(folder / "models", builtin_dir=None, device="cpu", dtype="float16", cache_size=1)
        start = time.perf_counter()
        registry.load(CHECKPOINT_NAME)
        seconds = time.perf_counter() - start
        del registry
        gc.collect()
        return seconds

    def diffusers_load() -> float:
        start = time.perf_counter()
        pipe = StableDiffusionPipeline.from_single_file(str(checkpoint), config=str(config_dir), local_files_only=True,
                                                        torch_dtype=torch.float16, safety_checker=None,
                                                        requires_safety_checker=False)
        seconds = time.perf_counter() - start
        del pipe
        gc.collect()
        return seconds

    engine_s, diffusers_s = [], []
    # The engine's first load also computes the file's SHA-256 (A1111's "Model hash"); later loads, in this run or
    # any later one, read it from the studio's hash cache (``engine.file_hashes``). The pairs time those.
    first_engine_s = engine_load()
    diffusers_load()  # its first load pays one-time imports; not counted
    for index in range(pairs):
        first, second = (engine_load, diffusers_load) if index % 2 == 0 else (diffusers_load, engine_load)
        a, b = first(), second()
        engine_s.append(a if first is engine_load else b)
        diffusers_s.append(b if first is engine_load else a)
    return {"file_gb": round(checkpoint.stat().st_size / 1e9, 2), "build_s": round(build_s, 1),
            "engine_first_load_s": round(first_engine_s, 2), "engine_s": [round(s, 2) for s in engine_s], "diffusers_s": [round(s, 2) for s in diffusers_s],
            "engine_median_s": round(median(engine_s), 2), "diffusers_median_s": round(median(diffusers_s), 2),
            "ratio": round(median([e / d for e, d in zip(engine_s, diffusers_s)]), 3)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench startup", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="cold starts (default 3)")
    parser.add_argument("--pairs", type=int, default=3, help="interleaved single-file load pairs (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--skip-single-file", action="store_true", help="only the cold start (no 2 GB file)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    document: dict = {"threads": args.threads, "cpu_count": os.cpu_count(), "torch": torch.__version__}
    document["cold_start"] = cold_start(args.runs, args.threads)
    cold = document["cold_start"]
    print(f"cold start to first picture ({cold['model']}): best {cold['best_s']} s of {cold['runs_s']}; "
          f"split {cold['best_split_s']}, interpreter start {cold['interpreter_start_s']} s", flush=True)
    if not args.skip_single_file:
        with tempfile.TemporaryDirectory(prefix="sfumato-bench-sd15-") as scratch:
            loads = single_file_load(Path(scratch), args.pairs)
        document["single_file_load"] = loads
        print(f"full-size SD 1.5 single file ({loads['file_gb']} GB, fp16): Sfumato {loads['engine_median_s']} s, "
              f"diffusers from_single_file {loads['diffusers_median_s']} s, ratio {loads['ratio']} "
              f"(pairs {loads['engine_s']} vs {loads['diffusers_s']}); Sfumato's first load, hashing the file: "
              f"{loads['engine_first_load_s']} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
