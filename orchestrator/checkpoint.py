"""The run directory and its step ledger: which step the last complete checkpoint holds."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

LEDGER = "latest.json"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def read_ledger(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "checkpoints" / LEDGER
    return json.loads(path.read_text()) if path.exists() else None


def commit_checkpoint(run_dir: Path, step: int, extra: dict[str, Any], keep: int) -> None:
    """Record `step_{step}` as the newest complete checkpoint, then drop old ones."""
    ckpt = run_dir / "checkpoints"
    write_json(ckpt / LEDGER, {"step": step, "tag": tag_for(step), **extra})
    tags = sorted(p for p in ckpt.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    (ckpt / "latest").unlink(missing_ok=True)  # DeepSpeed's own pointer; our ledger rules


def tag_for(step: int) -> str:
    return f"step_{step:08d}"
