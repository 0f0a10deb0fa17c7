"""Helpers for the UI tests: a Studio on a tiny model in a temporary folder, and a real server on 127.0.0.1."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import contextlib
import socket
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
MODEL_NAME = "tiny-sd1"  # models/Stable-diffusion/tiny-sd1, named by its folder as A1111 names a checkpoint by its file
SIZE = 64  # the tiny model is an SD1-family model (native 512), so tests ask for 64x64 to stay fast


def make_studio(root: Path, extensions_dir: Path | None = None):
    """A Studio whose only model is a tiny SD1 model, with every folder under ``root``."""
    import torch

    from engine.studio import Studio, StudioConfig
    from engine.tiny_models import build_sd1

    torch.set_num_threads(1)
    model = root / "models" / "Stable-diffusion" / "tiny-sd1"
    if not (model / "model_index.json").is_file():
        build_sd1(model)
    config = StudioConfig(
        models_dir=root / "models", outputs_dir=root / "outputs", user_dir=root / "user",
        extensions_dir=extensions_dir or root / "no-extensions", presets_dir=REPO / "presets", builtin_models_dir=None,
    )
    return Studio(config)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(studio) -> Iterator[str]:
    """Serve the studio's UI on a free 127.0.0.1 port for the duration of the block; yields its URL."""
    try:
        from ui.server import serve
    except ImportError:
        serve = None
    if serve is not None:
        handle = serve(studio, host="127.0.0.1", port=0, block=False)
        try:
            yield handle.url
        finally:
            handle.stop()
        return
    from ui.app import build_app

    demo = build_app(studio)
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        demo.close()
