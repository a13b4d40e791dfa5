"""The run directory and its step ledger: which checkpoints are complete, and which is newest.

`checkpoints/latest.json` is the only truth. A `step_*` folder counts only once the ledger
names it: a crash while the ranks write shards (or before the ledger is replaced) leaves a
folder the ledger does not name, and that folder is deleted on resume. Retention keeps the
newest `keep` *committed* tags, so it can never delete the checkpoint the ledger points to.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

from actors.durable import fsync_dir, fsync_tree

LEDGER = "latest.json"
FAULT_ENV = "RAYDISTILL_FAULT"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic and durable: after a crash (even a power cut) the old file or the new one is
    there, never half of one, and a returned call is on disk."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_ledger(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "checkpoints" / LEDGER
    return json.loads(path.read_text()) if path.exists() else None


def committed_tags(run_dir: Path, ledger: dict[str, Any] | None) -> list[str]:
    """The complete checkpoints, oldest first. Ledgers from before the `committed` list
    named only the newest tag; any folder up to that step was complete then."""
    if ledger is None:
        return []
    if "committed" in ledger:
        return list(ledger["committed"])
    newest = int(ledger["step"])
    return [t for t in _tag_dirs(run_dir) if _step_of(t) is not None and _step_of(t) <= newest]


def prune_uncommitted(run_dir: Path) -> list[str]:
    """Delete `step_*` folders the ledger does not name (left by a crash); call before a
    resume loads anything. Returns the deleted tags."""
    keep = set(committed_tags(run_dir, read_ledger(run_dir)))
    stray = [t for t in _tag_dirs(run_dir) if t not in keep]
    for tag in stray:
        shutil.rmtree(run_dir / "checkpoints" / tag, ignore_errors=True)
    return stray


def commit_checkpoint(run_dir: Path, step: int, extra: dict[str, Any], keep: int) -> None:
    """Record `step_{step}` (already written by the ranks) as the newest complete checkpoint,
    then delete what the ledger no longer names. Order matters: shards on disk, then the
    ledger, then deletions, so a crash at any point leaves the ledger naming complete
    checkpoints only."""
    ckpt = run_dir / "checkpoints"
    tag = tag_for(step)
    if not (ckpt / tag).is_dir():
        raise RuntimeError(f"checkpoint {ckpt / tag} was not written; not committing it")
    fsync_tree(ckpt / tag)
    _fault_point("kill_before_ledger", step)
    previous = [t for t in committed_tags(run_dir, read_ledger(run_dir)) if t != tag]
    committed = [*previous, tag][-keep:]
    write_json(ckpt / LEDGER, {**extra, "step": step, "tag": tag, "committed": committed})
    for old in _tag_dirs(run_dir):
        if old not in committed:
            shutil.rmtree(ckpt / old, ignore_errors=True)
    (ckpt / "latest").unlink(missing_ok=True)  # DeepSpeed's own pointer; our ledger rules


def _fault_point(name: str, step: int) -> None:
    """For tests only: with `RAYDISTILL_FAULT=<name>:<step>` (e.g. `kill_before_ledger:8`)
    the process SIGKILLs itself here, as a crash would, with no cleanup of any kind."""
    if os.environ.get(FAULT_ENV) == f"{name}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _tag_dirs(run_dir: Path) -> list[str]:
    ckpt = run_dir / "checkpoints"
    if not ckpt.is_dir():
        return []
    return sorted(p.name for p in ckpt.iterdir() if p.is_dir() and p.name.startswith("step_"))


def _step_of(tag: str) -> int | None:
    digits = tag.removeprefix("step_")
    return int(digits) if digits.isdigit() else None


def tag_for(step: int) -> str:
    return f"step_{step:08d}"
