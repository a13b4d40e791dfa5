"""Run inside the image at build time: every pin of requirements-gpu.txt is what is
installed, and torch is a CUDA build. Needs no GPU: it reads package metadata and
`torch.version.cuda` (set in CUDA builds whether or not a GPU is present)."""

from __future__ import annotations

import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PINS = Path(__file__).with_name("requirements-gpu.txt")


def pins(path: Path = PINS) -> dict[str, str]:
    """`name==version` lines (extras dropped), comments and blank lines skipped."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^\s;]+)", line)
        if not m:
            raise ValueError(f"{path.name}: {line!r} is not an exact name==version pin")
        found[m.group(1).lower()] = m.group(3)
    return found


def main() -> int:
    bad = []
    for name, want in pins().items():
        try:
            have = version(name)
        except PackageNotFoundError:
            bad.append(f"{name}: not installed (want {want})")
            continue
        if have.split("+", 1)[0] != want:
            bad.append(f"{name}: {have} installed, {want} pinned")
    try:
        import torch

        if not torch.version.cuda:
            bad.append(f"torch: {torch.__version__} is not a CUDA build")
    except ImportError as exc:
        bad.append(f"torch: cannot be imported ({exc})")
    for line in bad:
        print(f"verify_pins: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
