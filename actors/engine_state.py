"""A DeepSpeed engine's state: checkpoints that load without unpickling anything unchecked
(DeepSpeed's files, each rank's RNG state as safetensors, every file fsynced and hashed for
the ledger), and the full weights gathered for an export, a rollout engine or a peer."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from actors.durable import fsync_dir, seal_file
from actors.model_store import local_model

# what DeepSpeed's rank 0 copies into a ZeRO checkpoint folder with `copyfile`
RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")


def rng_state_tensors() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """torch (CPU and CUDA), numpy and python RNG states as tensors + JSON metadata, so a
    checkpoint loads without unpickling anything."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    tensors["python"] = torch.tensor(internal, dtype=torch.int64)
    meta = {
        "numpy": json.dumps([kind, int(pos), int(has_gauss), float(cached)]),
        "python": json.dumps([version, gauss_next]),
    }
    return tensors, meta


def set_rng_state_tensors(path: Path) -> None:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        torch.set_rng_state(f.get_tensor("torch"))
        cuda = sorted(k for k in f.keys() if k.startswith("cuda."))
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([f.get_tensor(k) for k in cuda])
        kind, pos, has_gauss, cached = json.loads(meta["numpy"])
        keys = f.get_tensor("numpy").numpy().astype(np.uint32)
        np.random.set_state((kind, keys, pos, has_gauss, cached))
        version, gauss_next = json.loads(meta["python"])
        internal = tuple(int(x) for x in f.get_tensor("python").tolist())
        random.setstate((version, internal, gauss_next))


def full_state(engine: Any, zero3: bool, rank: int, every_rank: bool = False) -> dict | None:
    """The model's full state dict ("lm." prefix dropped) on rank 0, None elsewhere (with
    `every_rank`: each rank's own copy, where ZeRO-3 does not shard it). Under ZeRO-3 every
    rank must call it: the shards are gathered onto rank 0 one layer at a time."""
    if zero3:
        state = engine._zero3_consolidated_16bit_state_dict()  # None off rank 0
    else:
        state = engine.module.state_dict() if rank == 0 or every_rank else None
    if state is None:
        return None
    # the HF model's weights only: what lives beside it (feature projections) stays here
    return {k.removeprefix("lm."): v for k, v in state.items() if k.startswith("lm.")}


def save_checkpoint(engine: Any, directory: str, tag: str, rank: int) -> dict[str, str]:
    """DeepSpeed state (weights, optimizer, scheduler) plus this rank's RNG state. Each
    rank fsyncs the files it wrote (only the writer's node surely can) and returns
    {path: sha256} of them, which the ledger records and a resume checks before
    DeepSpeed unpickles anything. No `latest` file: the ledger names the checkpoint."""
    written: list[str] = []
    io = engine.checkpoint_engine
    engine_save = io.save

    def save(state_dict: Any, path: str) -> None:
        engine_save(state_dict, path)
        written.append(str(path))

    io.save = save  # every file DeepSpeed writes for this rank goes through it
    try:
        engine.save_checkpoint(directory, tag=tag, save_latest=False)
    finally:
        io.save = engine_save
    folder = Path(directory) / tag
    if rank == 0:  # copied by rank 0 beside ZeRO shards, not through the engine
        written += [str(folder / n) for n in RECOVERY_SCRIPTS if (folder / n).is_file()]
    tensors, meta = rng_state_tensors()
    rng = folder / f"rng_rank{rank}.safetensors"
    save_file(tensors, str(rng), meta)
    written.append(str(rng))
    hashes = {path: seal_file(path) for path in written}
    for parent in {Path(path).parent for path in written}:
        fsync_dir(parent)
    return hashes


def load_checkpoint(engine: Any, directory: str, tag: str, rank: int) -> None:
    engine.load_checkpoint(directory, tag=tag)
    set_rng_state_tensors(Path(directory) / tag / f"rng_rank{rank}.safetensors")


def export(engine: Any, zero3: bool, rank: int, path: str, tokenizer_from: str | None) -> None:
    """Write the student as a plain HF folder from rank 0 (every rank calls it)."""
    state = full_state(engine, zero3, rank)
    if state is None:
        return
    state = {k: v.detach().cpu() for k, v in state.items()}
    engine.module.lm.save_pretrained(path, state_dict=state)
    if tokenizer_from:
        from transformers import AutoTokenizer

        try:
            AutoTokenizer.from_pretrained(local_model(tokenizer_from)).save_pretrained(path)
        except (OSError, ValueError):
            pass  # token-only student (tests): nothing to save
