"""Run inside the image at build time: every package of the lock requirements-gpu.txt is
installed at its locked version, and torch is a CUDA build. Needs no GPU: it reads package
metadata and `torch.version.cuda` (set in CUDA builds whether or not a GPU is present).
The hashes themselves are pip's to check (`--require-hashes`, cluster/Dockerfile)."""

from __future__ import annotations

import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

LOCK = Path(__file__).with_name("requirements-gpu.txt")
_PIN = re.compile(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^\s;]+)")


def requirements(path: Path = LOCK) -> list[tuple[str, str, list[str]]]:
    """(name, version, sha256 hashes) per requirement of a pip requirements file: lines
    continued with a backslash are joined, comments dropped, extras ignored. Anything but an
    exact `name==version` pin with `--hash=sha256:...` options is refused."""
    found = []
    for line in path.read_text().replace("\\\n", " ").splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        m = _PIN.fullmatch(words[0])
        hashes = [w.removeprefix("--hash=sha256:") for w in words[1:]]
        if not m or any(not re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes):
            raise ValueError(f"{path.name}: {' '.join(words)!r} is not an exact pin with hashes")
        found.append((m.group(1).lower(), m.group(3), hashes))
    return found


def pins(path: Path = LOCK) -> dict[str, str]:
    """name -> version of every requirement in `path`."""
    return {name: ver for name, ver, _ in requirements(path)}


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
