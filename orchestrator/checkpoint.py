"""The run directory and its step ledger: which checkpoints are complete, and which is newest.

`checkpoints/latest.json` is the only truth. A `step_*` folder counts only once the ledger
names it: a crash while the ranks write shards (or before the ledger is replaced) leaves a
folder the ledger does not name, and that folder is deleted on start-up and resume (never
during a run: the next checkpoint's folder may be half-written by the ranks while the driver
commits this one). Retention deletes only committed tags older than the newest `keep`.
The ledger records the sha256 of every file of each kept checkpoint (hashed by the rank that
wrote it); `verify_checkpoint` checks them before anything is loaded (DeepSpeed unpickles).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

from actors.durable import fsync_dir, fsync_tree, sha256_file
from orchestrator.recipe import RecipeError

LEDGER = "latest.json"
ROWS = "tracker_rows.json"  # the MLflow rows a checkpoint makes final, kept with it
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


def commit_checkpoint(
    run_dir: Path,
    step: int,
    extra: dict[str, Any],
    keep: int,
    files: dict[str, str],
    rows: list[list[Any]] | None = None,
) -> None:
    """Record `step_{step}` (already written, fsynced and hashed by the ranks: `files` maps
    each written file's path to its sha256) as the newest complete checkpoint, with the
    MLflow `rows` its steps make final, then delete committed tags older than the `keep`
    newest. Order matters: shards on disk, then the ledger, then deletions, so a crash at
    any point leaves the ledger naming complete checkpoints only. Folders the ledger does
    not name are left alone here (the next save may be writing one): `prune_uncommitted`."""
    ckpt = run_dir / "checkpoints"
    tag = tag_for(step)
    folder = ckpt / tag
    if not folder.is_dir():
        raise RuntimeError(f"checkpoint {folder} was not written; not committing it")
    hashes = {Path(p).relative_to(folder).as_posix(): h for p, h in files.items()}
    if rows is not None:
        write_json(folder / ROWS, {"rows": rows})
        hashes[ROWS] = sha256_file(folder / ROWS)
    unhashed = sorted(set(_files_in(folder)) - set(hashes))
    if unhashed:
        raise RuntimeError(f"checkpoint {folder}: no rank hashed {unhashed[0]}; not committing")
    fsync_tree(folder)
    _fault_point("kill_before_ledger", step)
    ledger = read_ledger(run_dir)
    previous = [t for t in committed_tags(run_dir, ledger) if t != tag]
    committed = [*previous, tag][-keep:]
    known = (ledger or {}).get("files", {})
    kept_files = {t: known[t] for t in committed if t in known} | {tag: hashes}
    record = {**extra, "step": step, "tag": tag, "committed": committed, "files": kept_files}
    write_json(ckpt / LEDGER, record)
    _fault_point("kill_after_ledger", step)
    oldest_kept = min(_step_of(t) or 0 for t in committed)
    for old in previous:
        if old not in committed and (_step_of(old) or 0) < oldest_kept:
            shutil.rmtree(ckpt / old, ignore_errors=True)
    (ckpt / "latest").unlink(missing_ok=True)  # DeepSpeed's pointer, from older runs


def verify_checkpoint(run_dir: Path, ledger: dict[str, Any]) -> None:
    """Refuse (one line naming the file) a checkpoint whose files are not exactly those the
    ledger hashed: a changed byte, a missing file, or a file nobody recorded. Called before
    any rank loads it: DeepSpeed's loader unpickles, so an unchecked file could run code."""
    tag = ledger["tag"]
    folder = run_dir / "checkpoints" / tag
    where = f"checkpoint {tag}"
    expected = ledger.get("files", {}).get(tag)
    if expected is None:
        print(f"{where}: the ledger records no file hashes (an older run); not checking")
        return
    unknown = sorted(set(_files_in(folder)) - set(expected))
    if unknown:
        raise RecipeError(str(folder / unknown[0]), f"not in the ledger of {where}; not loading it")
    for name, digest in sorted(expected.items()):
        path = folder / name
        if not path.is_file():
            raise RecipeError(str(path), f"missing; the ledger of {where} names it")
        if sha256_file(path) != digest:
            raise RecipeError(
                str(path), f"sha256 differs from the ledger of {where}; not loading it"
            )


def checkpoint_rows(run_dir: Path, ledger: dict[str, Any]) -> list[list[Any]]:
    """The MLflow rows kept with the ledger's checkpoint (none for older runs)."""
    path = run_dir / "checkpoints" / ledger["tag"] / ROWS
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def _files_in(folder: Path) -> list[str]:
    """Every file under `folder`, as a path relative to it."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


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
