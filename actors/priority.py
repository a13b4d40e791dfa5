"""The CPU priority (Linux nice value) of an actor's process, every thread of it.

Raised for actors whose work runs ahead of the student ranks (teachers with a prefetch
window) once the ranks are found to be the critical path: on a node they share, the ranks
then get the cores first and the teachers the rest (see orchestrator/critical_path.py).
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
            except ProcessLookupError:  # a thread that ended meanwhile
                pass
    except PermissionError:
        return False
    return True
