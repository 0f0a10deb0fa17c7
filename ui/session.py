"""Who is asking: a browser session owns its jobs, and Interrupt/Skip reach only those."""
from __future__ import annotations

from engine.jobs import Job, JobQueue

ANONYMOUS = "ui-anonymous"


def session_owner(request) -> str:
    """The job owner for a Gradio request: its session hash (one per open page)."""
    session = getattr(request, "session_hash", None) if request is not None else None
    return f"ui-{session}" if session else ANONYMOUS


def session_user(request) -> str | None:
    """The login behind a Gradio request; None when the UI has no logins."""
    return getattr(request, "username", None) if request is not None else None


def sees_job(user: str | None, job: Job) -> bool:
    """With logins a user sees, and may stop, only the jobs they submitted; without logins everyone sees every job."""
    return user is None or job.user == user


def interrupt_own(jobs: JobQueue, owner: str) -> bool:
    """Stop this owner's running jobs and drop its queued ones; True when there was something to stop."""
    found = False
    for running in jobs.running():  # one with one engine; one per busy replica in serve mode
        if running.owner == owner and not running.finished:
            jobs.cancel(running)
            found = True
    for job in jobs.pending():
        if job.owner == owner:
            jobs.cancel(job)
            found = True
    return found


def skip_own(jobs: JobQueue, owner: str) -> bool:
    """End the current image of this owner's running jobs (the rest of each batch goes on)."""
    found = False
    for running in jobs.running():
        if running.owner == owner and not running.finished:
            running.cancel.skip()
            found = True
    return found
