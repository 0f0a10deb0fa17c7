"""Stopping a job in whatever phase it is in, not only between sampler steps.

The engine tells this thread which job's cancel token is current (``running``).
Checkpoints then read it:
- ``check()`` at the engine's phase boundaries;
- forward pre-hooks on each block of a model's outermost layer lists (text-
  encoder layers, UNet and VAE down/up blocks), installed once per model by
  ``install_checkpoints``. So a pending interrupt stops a text-encoder pass, a
  sampler step or a large VAE decode at the next block, not after the call.

Work that no checkpoint reaches (one long C call, a blocked read) is the
compute thread's watchdog's job: see ``engine.compute.run_until_interrupted``.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from typing import Iterator, TypeVar

import torch

from .errors import Interrupted
from .request import CancelToken

T = TypeVar("T")
_local = threading.local()
_POLL_S = 0.05


@contextmanager
def running(cancel: CancelToken) -> Iterator[None]:
    """Make ``cancel`` the token the checkpoints on this thread read."""
    previous = getattr(_local, "token", None), getattr(_local, "phase", None)
    _local.token, _local.phase = cancel, "waiting to start"
    try:
        yield
    finally:
        _local.token, _local.phase = previous


def entering(phase: str) -> None:
    """Check, then name the phase the job on this thread starts ("encoding the prompt"), for the interrupt's message."""
    check()
    _local.phase = phase


def check(phase: str | None = None) -> None:
    """Raise ``Interrupted`` if this thread's job has an interrupt not yet honoured."""
    token: CancelToken | None = getattr(_local, "token", None)
    if token is not None and token.interrupt_pending:
        raise Interrupted(f"interrupted while {phase or getattr(_local, 'phase', None) or 'running'}")


def wait_for(future: Future, phase: str) -> T:
    """``future.result()``, giving up with ``Interrupted`` when this thread's job is interrupted."""
    while True:
        check(phase)
        try:
            return future.result(timeout=_POLL_S)
        except FutureTimeout:
            continue


def _checkpoint(module: torch.nn.Module, args) -> None:
    check()


def install_checkpoints(model: torch.nn.Module) -> int:
    """Hook a checkpoint before each block of the outermost layer lists in ``model``; how many were hooked.

    Outermost only (UNet and VAE down/up blocks and mid-block parts, text-encoder layers): the
    lists nested inside them (resnets, attention internals) would add many checks per step
    for little sooner a stop, and a block that runs too long is the watchdog's.
    """
    hooked: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or any(name.startswith(outer + ".") for outer in hooked):
            continue
        for index, block in enumerate(module):
            block.register_forward_pre_hook(_checkpoint)
            hooked.append(f"{name}.{index}")
    return len(hooked)
