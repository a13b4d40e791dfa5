"""An actor's own process: its CPU priority (the Linux nice value of every thread), and
whether it may serve another run of the same driver (orchestrator/warm.py).

The priority is lowered for actors whose work runs ahead of the student ranks (teachers
with a prefetch window) once the ranks are found to be the critical path: on a node they
share, the ranks then get the cores first (see orchestrator/critical_path.py).
"""

from __future__ import annotations

import os
from pathlib import Path


def _threads() -> list[int]:
    """Every thread of this process: a nice value is per thread on Linux, and torch's
    intra-op threads exist already."""
    tasks = Path("/proc/self/task")
    return [int(t.name) for t in tasks.iterdir()] if tasks.is_dir() else [0]


def nice() -> int:
    """The lowest nice value among this process's threads (the one that yields least)."""
    values = []
    for tid in _threads():
        try:
            values.append(os.getpriority(os.PRIO_PROCESS, tid))
        except ProcessLookupError:  # a thread that ended meanwhile
            pass
    return min(values)


def set_nice(level: int) -> bool:
    """Set every thread's nice value to `level`. False where the system refuses (lowering
    it back needs a privilege an ordinary user does not have)."""
    try:
        for tid in _threads():
            try:
                os.setpriority(os.PRIO_PROCESS, tid, level)
            except ProcessLookupError:
                pass
    except PermissionError:
        return False
    return True


def yield_cpu(level: int) -> int:
    """Take the cores the student ranks leave (they are the run's critical path); the nice
    value this process now has."""
    set_nice(level)
    return nice()


def reusable() -> bool:
    """Whether this actor may serve the driver's next run: not restarted by Ray (that spent
    part of its restart budget), and back at the priority a run starts with."""
    import ray

    return not ray.get_runtime_context().was_current_actor_reconstructed and set_nice(0)
