"""A real Sfumato server on 127.0.0.1 for the benches that go through HTTP.

The server runs in a child process (``python -m bench.server ...``), started
with ``ui.server.serve`` on a free port the way the command line starts it,
over a ``Studio`` whose models folder holds the bench models and which saves
nothing. A separate process matters: clients polling in the bench process
would otherwise compete with the server for the GIL and inflate its latency.
The child prints its URL, then serves until its stdin closes.

When the server modules are not there yet, ``unavailable_reason`` says which
one is missing and the benches skip with that message.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

REPO_ROOT = Path(__file__).resolve().parent.parent
URL_PREFIX = "SFUMATO_BENCH_URL "
STARTUP_TIMEOUT_S = 180.0
REQUIRED_MODULES = {
    "api": ("ui.server", "ui.api", "engine.studio", "engine.extensions", "fastapi", "uvicorn"),
    "ui": ("ui.server", "ui.app", "engine.studio", "engine.extensions", "gradio"),
    "client": ("gradio_client",),
}


def unavailable_reason(*parts: str) -> str | None:
    """None when every module these parts need can be found; else a one-line reason to skip."""
    for part in parts:
        for module in REQUIRED_MODULES[part]:
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                return f"{module} does not exist yet; this bench needs the real server ({', '.join(REQUIRED_MODULES[part])})"
    return None


def make_studio(folder: Path, models_dir: Path, builtin_dir: Path | None, default_model: str, device: str = "cpu",
                preview_every: int = 1, preview_method: str = "cheap"):
    """A Studio over the bench models; outputs and settings live in ``folder``; nothing is saved."""
    from engine.studio import Studio, StudioConfig

    config = StudioConfig(
        models_dir=models_dir, outputs_dir=folder / "outputs", user_dir=folder / "user", extensions_dir=REPO_ROOT / "extensions",
        presets_dir=REPO_ROOT / "presets", builtin_models_dir=builtin_dir, device=device,
        dtype="float32" if device == "cpu" else None,
    )
    studio = Studio(config)
    studio.update_settings(replace(studio.settings, default_model=default_model, save_outputs=False,
                                   preview_every=preview_every, preview_method=preview_method))
    return studio


@contextmanager
def running_server(models_dir: Path, builtin_dir: Path | None, default_model: str, *, ui: bool, device: str = "cpu",
                   threads: int | None = None, preview_every: int = 1, log_path: Path | None = None) -> Iterator[str]:
    """The URL of a server child process on a free port; stopped (and waited for) on exit."""
    command = [sys.executable, "-m", "bench.server", "--models-dir", str(models_dir), "--model", default_model,
               "--device", device, "--preview-every", str(preview_every)]
    if builtin_dir is not None:
        command += ["--builtin-dir", str(builtin_dir)]
    if ui:
        command.append("--ui")
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        command += ["--threads", str(threads)]
    log_file = open(log_path, "w+") if log_path else tempfile.TemporaryFile("w+")
    child = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=log_file, text=True)
    try:
        url = _read_url(child, log_file)
        yield url
    finally:
        _stop(child)
        log_file.close()


def _read_url(child: subprocess.Popen, log_file) -> str:
    found: list[str] = []

    def reader() -> None:
        for line in child.stdout:
            if line.startswith(URL_PREFIX):
                found.append(line[len(URL_PREFIX):].strip())
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(STARTUP_TIMEOUT_S)
    if not found:
        _stop(child)
        log_file.seek(0)
        tail = log_file.read()[-2000:]
        raise RuntimeError(f"the bench server did not start (exit code {child.poll()}):\n{tail}")
    return found[0]


def _stop(child: subprocess.Popen) -> None:
    if child.poll() is not None:
        return
    try:
        child.stdin.close()
    except OSError:
        pass
    try:
        child.wait(20)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait(10)


# -- the child ---------------------------------------------------------------------

def serve_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.server", description="a Sfumato server for the benches")
    parser.add_argument("--models-dir", type=Path, required=True)
    parser.add_argument("--builtin-dir", type=Path, default=None)
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--preview-every", type=int, default=1)
    parser.add_argument("--ui", action="store_true", help="serve the Gradio UI too (default: the API alone)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from ui.server import serve

    from .fixtures import quiet_libraries

    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="sfumato-bench-server-") as folder:
        studio = make_studio(Path(folder), args.models_dir, args.builtin_dir, args.model, args.device, args.preview_every)
        studio.registry.load(args.model)
        handle = serve(studio, host="127.0.0.1", port=0, api=True, ui_builder=None if args.ui else False, block=False,
                       log_level="critical")
        print(URL_PREFIX + handle.url, flush=True)
        try:
            sys.stdin.read()  # until the parent closes our stdin
        finally:
            handle.stop(timeout=5)
            time.sleep(0.1)
    return 0


if __name__ == "__main__":
    raise SystemExit(serve_main())
