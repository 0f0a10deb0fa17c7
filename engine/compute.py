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

A job's work that cannot notice its interrupt (one long C call, a blocked read)
must not hold every later job: ``run_until_interrupted`` hands the compute
role to a fresh thread when an interrupt has gone unanswered for a grace
period. The old thread finishes that one call, meets the job's next
checkpoint, and ends; until then two teams share the cores, which is slower,
and only for that moment.
"""
from __future__ import annotations

import functools
import logging
import queue
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable, TypeVar

import torch

from .errors import Interrupted
from .request import CancelToken

T = TypeVar("T")
log = logging.getLogger("sfumato.compute")

# How long an interrupt may go unanswered before the job is left to finish alone on a retired thread.
# Checkpoints answer within one model block; only work that cannot check waits this long.
INTERRUPT_GRACE_S = 1.0
_POLL_S = 0.02

_tasks: queue.SimpleQueue = queue.SimpleQueue()
_thread: threading.Thread | None = None
_start_lock = threading.Lock()
_local = threading.local()  # .compute: this thread serves tasks (now or before it was retired); .retired: it stops after this task


def run_on_compute_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` on the compute thread; its result, or its exception re-raised here."""
    if is_compute_thread():
        return fn(*args, **kwargs)
    return _submit(fn, *args, **kwargs).result()


def _submit(fn: Callable[..., T], *args, **kwargs) -> Future:
    """Queue ``fn`` for the compute thread, with the caller's torch thread count; its future."""
    future: Future = Future()
    _tasks.put((functools.partial(fn, *args, **kwargs), torch.get_num_threads(), future))
    _ensure_started()
    return future


def run_until_interrupted(cancel: CancelToken, fn: Callable[..., T], *args, grace: float = INTERRUPT_GRACE_S, **kwargs) -> T:
    """``run_on_compute_thread``, except that an interrupt of ``cancel`` left unanswered for ``grace``
    seconds raises ``Interrupted`` here: the task is dropped if it has not started, else the compute
    thread is retired with it and a fresh one serves the tasks after it."""
    if is_compute_thread():
        return fn(*args, **kwargs)
    future = _submit(fn, *args, **kwargs)
    while True:
        try:
            return future.result(timeout=_POLL_S)
        except FutureTimeout:
            pass
        waited = cancel.pending_for()
        if waited is None or waited < grace:
            continue
        if future.cancel():
            raise Interrupted("interrupted before it started")
        with _start_lock:
            if future.done():  # it answered after all
                return future.result()
            _retire_current_thread()
        raise Interrupted(f"interrupted; the work it was doing did not stop within {grace:g} s and finishes in the background")


def on_compute_thread(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator form of ``run_on_compute_thread``."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return run_on_compute_thread(fn, *args, **kwargs)
    return wrapper


def is_compute_thread() -> bool:
    """True on the compute thread, and on a retired one finishing its last task (its calls back in run inline)."""
    return getattr(_local, "compute", False)


def _ensure_started() -> None:
    with _start_lock:
        if _thread is None:
            _start_thread()


def _start_thread() -> None:
    """A new compute thread; the caller holds ``_start_lock``."""
    global _thread
    _thread = threading.Thread(target=_serve, name="sfumato-compute", daemon=True)
    _thread.start()


def _retire_current_thread() -> None:
    """The caller holds ``_start_lock``. The current thread stops after its task; a fresh one takes the queue."""
    retiring = _thread
    retiring.retired = True  # read by that thread once its task returns
    log.warning("the compute thread is busy with an interrupted job's work that cannot stop; a new one takes over")
    _start_thread()


def _serve() -> None:
    _local.compute = True
    me = threading.current_thread()
    while not getattr(me, "retired", False):
        task, threads, future = _tasks.get()
        if getattr(me, "retired", False):  # retired while waiting: leave the task to the new thread
            _tasks.put((task, threads, future))
            return
        if not future.set_running_or_notify_cancel():
            continue
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        try:
            future.set_result(task())
        except BaseException as error:  # noqa: BLE001 - handed to the caller, the thread lives on
            future.set_exception(error)
        task = future = None  # while waiting for the next task, hold nothing of this one
