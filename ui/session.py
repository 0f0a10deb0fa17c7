"""Who is asking: a browser session owns its jobs, and Interrupt/Skip reach only those."""
from __future__ import annotations

from engine.jobs import JobQueue

ANONYMOUS = "ui-anonymous"


def session_owner(request) -> str:
    """The job owner for a Gradio request: its session hash (one per open page)."""
    session = getattr(request, "session_hash", None) if request is not None else None
    return f"ui-{session}" if session else ANONYMOUS


def interrupt_own(jobs: JobQueue, owner: str) -> bool:
    """Stop this owner's running job and drop its queued ones; True when there was something to stop."""
    found = False
    current = jobs.current()
    if current is not None and current.owner == owner and not current.finished:
        jobs.cancel(current)
        found = True
    for job in jobs.pending():
        if job.owner == owner:
            jobs.cancel(job)
            found = True
    return found


def skip_own(jobs: JobQueue, owner: str) -> bool:
    """End the current image of this owner's running job (the rest of the batch goes on)."""
    current = jobs.current()
    if current is not None and current.owner == owner and not current.finished:
        current.cancel.skip()
        return True
    return False
