"""Waiting on actors without waiting forever: a death watch over a set of refs.

`ray.get` on the refs of several ranks blocks on the first one; if another rank died, the
survivors sit in a collective until the process-group timeout (30 minutes) and so does the
driver. `gather` waits on all the refs at once and raises as soon as any of them failed,
so a dead actor is seen within `poll_s`, and an optional bound caps the whole wait.
"""

from __future__ import annotations

import time
from typing import Any

import ray


class RuntimeFault(RuntimeError):
    """A fault during a run (an actor died, a wait ran past its bound): the run directory
    stays resumable and the CLI prints one line. `student_lost`: a student rank died (the
    group can be brought back from the last checkpoint)."""

    student_lost = False


def gather(
    refs: list[ray.ObjectRef],
    what: str,
    *,
    timeout_s: float | None = None,
    poll_s: float = 1.0,
    students: bool = False,
) -> list[Any]:
    """The refs' values; a failed ref raises RuntimeFault at once, naming `what`.
    `students`: the refs are the student group's, so a wait past `timeout_s` means a rank is
    stuck (frozen, or blocked in a collective with one that is) and the group is lost."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=poll_s)
        for ref in ready:
            try:
                ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                fault = RuntimeFault(f"{what}: {_reason(exc)}")
                fault.student_lost = isinstance(exc, ray.exceptions.RayActorError) and (
                    "StudentWorker" in str(exc)
                )
                raise fault from exc
        if deadline is not None and time.monotonic() > deadline and pending:
            fault = RuntimeFault(f"{what}: no answer within {timeout_s:.0f}s")
            fault.student_lost = students
            raise fault
    return ray.get(list(refs))


OUT_OF_MEMORY_HINT = "lower train.micro_batch_size or data.seq_len, or give the actors more memory"


def _out_of_memory(exc: Exception) -> bool:
    """Torch's allocator, Python's MemoryError, or Ray's memory monitor killing a worker."""
    if isinstance(exc, ray.exceptions.OutOfMemoryError):
        return True
    cause = getattr(exc, "cause", None)
    if isinstance(cause, MemoryError):
        return True
    text = str(cause if cause is not None else exc).lower()
    return "can't allocate memory" in text or "out of memory" in text


def _reason(exc: Exception) -> str:
    if _out_of_memory(exc):
        where = getattr(exc, "function_name", None) or "a worker"
        return f"out of memory in {where}; {OUT_OF_MEMORY_HINT}"
    if isinstance(exc, ray.exceptions.ActorDiedError | ray.exceptions.RayActorError):
        return "an actor died (" + str(exc).strip().splitlines()[0][:160] + ")"
    cause = getattr(exc, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1][:160]}"
    return str(exc).strip().splitlines()[-1][:160]
