"""The data stream: examples tokenized once with the student's tokenizer, served as one
deterministic batch per step (so a resumed run sees exactly the batches it would have)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from actors.batch import TokenBatch
from orchestrator.recipe import DataConfig, RecipeError


@dataclass
class Dataset:
    train: TokenBatch
    heldout: TokenBatch
    seed: int

    def batch_for_step(self, step: int, batch_size: int) -> TokenBatch:
        """Rows for `step`: a fresh seeded permutation per epoch, no example twice per epoch."""
        n = len(self.train)
        rows = []
        for i in range(step * batch_size, (step + 1) * batch_size):
            epoch, pos = divmod(i, n)
            perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            rows.append(perm[pos])
        idx = np.asarray(rows)
        t = self.train
        return TokenBatch(t.input_ids[idx], t.attention_mask[idx], t.loss_mask[idx])


def synthetic_dataset(cfg: DataConfig, vocab_size: int, seed: int) -> Dataset:
    """Sequences from a seeded sparse Markov chain: a toy language a student can learn."""
    rng = np.random.default_rng(seed)
    succ = rng.integers(0, vocab_size, size=(vocab_size, cfg.synthetic.branching))
    probs = rng.dirichlet(np.ones(cfg.synthetic.branching), size=vocab_size)
    total = cfg.synthetic.num_sequences + cfg.heldout
    ids = np.empty((total, cfg.seq_len), dtype=np.int32)
    ids[:, 0] = rng.integers(0, vocab_size, size=total)
    for t in range(1, cfg.seq_len):
        prev = ids[:, t - 1]
        choice = (rng.random(total)[:, None] > probs[prev].cumsum(1)).sum(1)
        ids[:, t] = succ[prev, np.minimum(choice, cfg.synthetic.branching - 1)]
    attn = np.ones_like(ids, dtype=np.int8)
    loss = np.ones_like(ids, dtype=bool)
    loss[:, -1] = False
    return _split(TokenBatch(ids, attn, loss), cfg.heldout, seed)


def _split(all_rows: TokenBatch, heldout: int, seed: int) -> Dataset:
    n = len(all_rows)
    if heldout >= n:
        raise RecipeError("data.heldout", f"{heldout} leaves no training examples out of {n}")
    perm = np.random.default_rng([seed, 2**31]).permutation(n)
    train, held = perm[:-heldout], perm[-heldout:]

    def take(idx: np.ndarray) -> TokenBatch:
        return TokenBatch(
            all_rows.input_ids[idx], all_rows.attention_mask[idx], all_rows.loss_mask[idx]
        )

    return Dataset(train=take(train), heldout=take(held), seed=seed)


def read_records(path: str) -> list[dict[str, str]]:
    """Rows of a .jsonl or .parquet file; each needs `text`, or `prompt` (+ `response`)."""
    p = Path(path)
    if p.suffix == ".parquet":
        records = pq.read_table(p).to_pylist()
    else:
        records = []
        for lineno, line in enumerate(p.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise RecipeError(f"{path}:{lineno}", "not a JSON object") from exc
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or not ({"text", "prompt"} & rec.keys()):
            raise RecipeError(f"{path}: row {i + 1}", "needs a `text` or `prompt` field")
    if not records:
        raise RecipeError("data.path", f"{path} has no rows")
    return records


GenerateFn = Callable[[list[str]], list[str]]


def teacher_responses(
    prompts: list[str], generate: GenerateFn, cache_dir: Path, key_parts: dict
) -> list[str]:
    """Responses written by the teacher, cached as Parquet keyed by prompts, teacher and
    sampling, so later runs (and other students) reuse them."""
    key = hashlib.sha256(json.dumps([prompts, key_parts], sort_keys=True).encode()).hexdigest()
    path = cache_dir / f"responses-{key[:16]}.parquet"
    if path.exists():
        table = pq.read_table(path)
        if table.schema.metadata and table.schema.metadata.get(b"key") == key.encode():
            return table.column("response").to_pylist()
    responses = generate(prompts)
    cache_dir.mkdir(parents=True, exist_ok=True)
    table = pa.table({"prompt": prompts, "response": responses})
    table = table.replace_schema_metadata({"key": key, "teacher": json.dumps(key_parts)})
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return responses


def tokenize_records(records: list[dict[str, str]], tokenizer: Any, seq_len: int) -> TokenBatch:
    """Chat-formatted prompt/response pairs (loss on the response) or plain text (loss on
    every token), right-padded to seq_len."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = np.full((len(records), seq_len), pad, dtype=np.int32)
    attn = np.zeros((len(records), seq_len), dtype=np.int8)
    loss = np.zeros((len(records), seq_len), dtype=bool)
    for i, rec in enumerate(records):
        if "prompt" in rec:
            chat = [{"role": "user", "content": rec["prompt"]}]
            if tokenizer.chat_template:
                prompt = tokenizer.apply_chat_template(
                    chat, tokenize=False, add_generation_prompt=True
                )
                full = tokenizer.apply_chat_template(
                    [*chat, {"role": "assistant", "content": rec.get("response", "")}],
                    tokenize=False,
                )
            else:
                prompt, full = rec["prompt"] + "\n", rec["prompt"] + "\n" + rec.get("response", "")
            p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            f_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
            start = len(p_ids)
        else:
            f_ids = tokenizer(rec["text"], add_special_tokens=False)["input_ids"]
            start = 1
        f_ids = f_ids[:seq_len]
        n = len(f_ids)
        ids[i, :n] = f_ids
        attn[i, :n] = 1
        # position t predicts token t+1: it counts when token t+1 is a target token
        loss[i, max(start - 1, 0) : n - 1] = True
    keep = loss.any(axis=1)
    if not keep.any():
        raise RecipeError("data.seq_len", f"{seq_len} truncates every example to its prompt")
    return TokenBatch(ids[keep], attn[keep], loss[keep])


def file_dataset(
    cfg: DataConfig,
    tokenizer: Any,
    seed: int,
    generate: GenerateFn | None,
    cache_dir: Path,
    teacher_key: dict | None = None,
) -> Dataset:
    records = read_records(cfg.path or "")
    if cfg.responses == "teacher":
        if generate is None:
            raise RecipeError("data.responses", "'teacher' needs a teacher that can write text")
        prompts = [r.get("prompt") or r["text"] for r in records]
        key = {**(teacher_key or {}), **cfg.generation.model_dump()}
        responses = teacher_responses(prompts, generate, cache_dir, key)
        records = [{"prompt": p, "response": r} for p, r in zip(prompts, responses, strict=True)]
    return _split(tokenize_records(records, tokenizer, cfg.seq_len), cfg.heldout, seed)
