"""Making files durable: a checkpoint is on disk before the ledger that names it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable; a no-op where the OS
    cannot open directories (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """Flush every file and directory under `path` (and its entry in the parent) to disk.
    A file that disappears while it is walked (a writer's temp file, renamed) is skipped:
    its new name is walked too."""
    root = Path(path)
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            file = Path(dirpath) / name
            if file.is_symlink():
                continue
            try:
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
            except FileNotFoundError:
                continue
        fsync_dir(Path(dirpath))
    fsync_dir(root.parent)


def seal_file(path: str | Path) -> str:
    """fsync a file this process wrote and return its sha256. A checkpoint's ranks call it
    on their own files: only the writer's fsync surely flushes them from its node (the
    driver's fsync on another node cannot), and the hash lets a reader check the bytes
    before anything unpickles them."""
    with open(path, "rb") as f:
        digest = _sha256(f)
        os.fsync(f.fileno())
    return digest


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return _sha256(f)


def _sha256(f: BinaryIO, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    while block := f.read(chunk):
        digest.update(block)
    return digest.hexdigest()
