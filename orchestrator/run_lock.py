"""One writer per folder: a run directory (`run`, `resume`) or a signal cache (`cache build`).

Two processes writing one run directory interleave checkpoints, ledgers and MLflow rows; two
builds of one cache delete each other's unfinished shards. Whoever writes a folder holds an
exclusive `flock` on `<folder>/.lock` for as long as it writes; a second writer is refused
at once with one line naming the holder's pid. The kernel drops the lock when the holder
exits, however it exits, so a crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from orchestrator.recipe import RecipeError

LOCK_NAME = ".lock"


@contextmanager
def hold(folder: Path, what: str) -> Iterator[None]:
    """Hold `folder`'s lock for the body; RecipeError (exit 2) if another process holds it.
    `what` names the folder's kind in the message ("run directory", "signal cache")."""
    path = Path(folder) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by Ray's processes
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise RecipeError(
            str(folder), f"this {what} is in use by another raydistill process ({holder})"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a waiter)


def _holder(fd: int) -> str:
    """'pid N' as the holder wrote it (it may not have written it yet)."""
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return f"pid {text}" if text.isdigit() else "pid unknown"
