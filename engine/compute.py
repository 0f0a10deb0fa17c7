"""One thread for all of the engine's torch work, whichever thread asks for it.

torch's Linux CPU wheels run their parallel ops on GNU OpenMP, which gives every
thread that starts a parallel op its own team of helper threads. Once the
helpers of all teams outnumber the cores, libgomp stops spinning between
parallel regions and puts its threads to sleep, so every op then pays for a
wake-up. A server that loads its model on one thread and generates on another
is already in that state: on a 2-core machine one step of the demo model took
15 ms on the thread that had loaded the model and 61 ms on a second thread.
Model loads, generations and preprocessors therefore all run here, on one
long-lived thread, and keep a single team.

The thread uses as many torch threads as the thread that asked it to run
something (``torch.set_num_threads`` is per thread under OpenMP).
"""
from __future__ import annotations

import functools
import queue
import threading
from concurrent.futures import Future
from typing import Callable, TypeVar

import torch

T = TypeVar("T")

_tasks: queue.SimpleQueue = queue.SimpleQueue()
_thread: threading.Thread | None = None
_start_lock = threading.Lock()


def run_on_compute_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` on the compute thread; its result, or its exception re-raised here."""
    if is_compute_thread():
        return fn(*args, **kwargs)
    future: Future = Future()
    _tasks.put((functools.partial(fn, *args, **kwargs), torch.get_num_threads(), future))
    _ensure_started()
    return future.result()


def on_compute_thread(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator form of ``run_on_compute_thread``."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return run_on_compute_thread(fn, *args, **kwargs)
    return wrapper


def is_compute_thread() -> bool:
    return threading.current_thread() is _thread


def _ensure_started() -> None:
    global _thread
    if _thread is not None:
        return
    with _start_lock:
        if _thread is None:
            _thread = threading.Thread(target=_serve, name="sfumato-compute", daemon=True)
            _thread.start()  # after the assignment: a task that calls back in must see itself as the compute thread


def _serve() -> None:
    while True:
        task, threads, future = _tasks.get()
        if not future.set_running_or_notify_cancel():
            continue
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        try:
            future.set_result(task())
        except BaseException as error:  # noqa: BLE001 - handed to the caller, the thread lives on
            future.set_exception(error)
        task = future = None  # while waiting for the next task, hold nothing of this one
