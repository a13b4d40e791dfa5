"""The data stream: examples tokenized once with the student's tokenizer, served as one
deterministic batch per step (so a resumed run sees exactly the batches it would have)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from transformers import AutoTokenizer

from actors.batch import TokenBatch
from actors.chat import FINISH_REASONS, STOP, ChatEncodingError, adds_bos, encode_chat, encode_text
from actors.model_store import local_model
from actors.models import vocab_size_of
from orchestrator.recipe import DataConfig, Recipe, RecipeError


@dataclass
class Dataset:
    train: TokenBatch
    heldout: TokenBatch
    seed: int  # the run seed: it orders the batches, nothing else
    skipped_rows: int = 0  # rows dropped because they could not be tokenized faithfully
    train_prompts: list[str] | None = None  # each row's prompt text (judges read it)
    heldout_prompts: list[str] | None = None
    train_routes: np.ndarray | None = None  # each row's teacher index (distill.teacher_key)
    heldout_routes: np.ndarray | None = None
    _perms: dict[int, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def batch_for_step(self, step: int, batch_size: int) -> TokenBatch:
        """Rows for `step`: a fresh seeded permutation per epoch, no example twice per epoch."""
        return self.train.take(self.rows_for_step(step, batch_size))

    def rows_for_step(self, step: int, batch_size: int) -> np.ndarray:
        """Indices into `train` of the step's rows (see batch_for_step)."""
        n = len(self.train)
        epochs, pos = np.divmod(np.arange(step * batch_size, (step + 1) * batch_size), n)
        idx = np.empty(batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            idx[sel] = self._permutation(int(epoch))[pos[sel]]
        for old in [e for e in self._perms if e < epochs[0]]:
            del self._perms[old]  # steps move forward: earlier epochs are done with
        return idx

    def _permutation(self, epoch: int) -> np.ndarray:
        """The epoch's row order, computed once (not once per row of every batch)."""
        if epoch not in self._perms:
            n = len(self.train)
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(n)
        return self._perms[epoch]


def synthetic_dataset(cfg: DataConfig, vocab_size: int, seed: int) -> Dataset:
    """Sequences from a seeded sparse Markov chain: a toy language a student can learn.
    The language and the held-out split come from `data.split_seed`; the run `seed` only
    orders the batches, so runs with different seeds are compared on the same data."""
    rng = np.random.default_rng(cfg.split_seed)
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
    return split_rows(TokenBatch(ids, attn, loss), cfg.heldout, cfg.split_seed, seed)


def split_rows(
    all_rows: TokenBatch,
    heldout: int,
    split_seed: int,
    seed: int,
    skipped_rows: int = 0,
    prompts: list[str] | None = None,
    routes: np.ndarray | None = None,
) -> Dataset:
    """Held-out rows chosen by `split_seed` alone, so every run seed evaluates on the same
    examples; `seed` is kept for the batch order."""
    n = len(all_rows)
    if heldout >= n:
        raise RecipeError("data.heldout", f"{heldout} leaves no training examples out of {n}")
    perm = np.random.default_rng([split_seed, 2**31]).permutation(n)
    train, held = perm[:-heldout], perm[-heldout:]

    return Dataset(
        train=all_rows.take(train),
        heldout=all_rows.take(held),
        seed=seed,
        skipped_rows=skipped_rows,
        train_prompts=[prompts[i] for i in train] if prompts is not None else None,
        heldout_prompts=[prompts[i] for i in held] if prompts is not None else None,
        train_routes=routes[train] if routes is not None else None,
        heldout_routes=routes[held] if routes is not None else None,
    )


MAX_LINE_BYTES = 16 << 20  # one JSONL row; a longer line is a broken file, not an example
_TEXT_FIELDS = ("text", "prompt", "response")


def read_records(path: str) -> list[dict[str, str]]:
    """Rows of a .jsonl (UTF-8) or .parquet file; each needs `text`, or `prompt` (+
    `response`), as strings. Whatever cannot be read is a RecipeError naming the file and
    its line (JSONL) or row (Parquet)."""
    p = Path(path)
    rows = _parquet_rows(p) if p.suffix == ".parquet" else _jsonl_rows(p)
    records = []
    for where, rec in rows:
        if not isinstance(rec, dict) or not ({"text", "prompt"} & rec.keys()):
            raise RecipeError(f"{path}: {where}", "needs a `text` or `prompt` field")
        for key in _TEXT_FIELDS:
            value = rec.get(key)
            if key not in rec or isinstance(value, str) or (key == "response" and value is None):
                continue  # a null response: none given
            kind = "null" if value is None else type(value).__name__
            raise RecipeError(f"{path}: {where}", f"`{key}` is {kind}, expected a string")
        records.append(rec)
    if not records:
        raise RecipeError("data.path", f"{path} has no rows")
    return records


def _parquet_rows(path: Path) -> list[tuple[str, Any]]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        why = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise RecipeError(str(path), f"not a readable Parquet file ({why})") from exc
    return [(f"row {i + 1}", rec) for i, rec in enumerate(table.to_pylist())]


def _jsonl_rows(path: Path) -> list[tuple[str, Any]]:
    """(`line N`, parsed row) per non-blank line, read as bytes and decoded as UTF-8 line by
    line (a byte order mark at the start is allowed), no line longer than MAX_LINE_BYTES."""
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 2), b""), 1):
            where = f"line {lineno}"
            if len(raw.rstrip(b"\r\n")) > MAX_LINE_BYTES:
                raise RecipeError(
                    f"{path}: {where}", f"longer than {MAX_LINE_BYTES >> 20} MiB: not one example"
                )
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise RecipeError(
                    f"{path}: {where}", f"not valid UTF-8 (byte {exc.start + 1})"
                ) from None
            if not line.strip():
                continue
            try:
                rows.append((where, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise RecipeError(f"{path}: {where}", "not a JSON object") from exc
    return rows


Response = dict[str, str]  # {"response": text, "finish_reason": "stop" | "length"}
GenerateFn = Callable[[list[str]], list[Response]]
_CACHE_FORMAT = 2  # 2: responses carry their finish_reason


def writer_key(model_hash: str, tokenizer_hash: str, chat_template: str | None) -> dict[str, str]:
    """What makes a writing teacher's responses reusable: its weights, its tokenizer and
    the chat template its prompts were rendered with (hashed: templates are long)."""
    template = hashlib.sha256((chat_template or "").encode()).hexdigest()[:16]
    return {
        "teacher_model_hash": model_hash,
        "teacher_tokenizer_hash": tokenizer_hash,
        "teacher_chat_template_hash": template if chat_template else "none",
    }


def teacher_responses(
    prompts: list[str], generate: GenerateFn, cache_dir: Path, key_parts: dict
) -> list[Response]:
    """Responses written by the teacher, each with its finish_reason, cached as Parquet
    keyed by prompts, teacher (see `writer_key`) and sampling, so later runs (and other
    students) reuse them."""
    blob = json.dumps([prompts, key_parts, _CACHE_FORMAT], sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()
    path = cache_dir / f"responses-{key[:16]}.parquet"
    if path.exists():
        table = pq.read_table(path)
        meta = table.schema.metadata or {}
        if meta.get(b"key") == key.encode() and "finish_reason" in table.column_names:
            return _responses_of(table.select(["response", "finish_reason"]).to_pylist())
    responses = _responses_of(generate(prompts))
    if len(responses) != len(prompts):
        raise ValueError(f"the teacher wrote {len(responses)} responses for {len(prompts)}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "prompt": prompts,
            "response": [r["response"] for r in responses],
            "finish_reason": [r["finish_reason"] for r in responses],
        }
    )
    table = table.replace_schema_metadata({"key": key, "teacher": json.dumps(key_parts)})
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return responses


def _responses_of(rows: list[dict[str, Any]]) -> list[Response]:
    out = []
    for row in rows:
        reason = row.get("finish_reason")
        if reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason {reason!r} is not one of {FINISH_REASONS}")
        out.append({"response": str(row["response"]), "finish_reason": reason})
    return out


def tokenize_records(
    records: list[dict[str, str]], tokenizer: Any, seq_len: int
) -> tuple[TokenBatch, int, list[int]]:
    """Chat-formatted prompt/response pairs (loss on the response, and on its end-of-turn
    token only when it ended: `finish_reason` "stop", the default for given responses) or
    plain text (loss on every token), right-padded to seq_len. Rows that cannot be encoded
    without mis-masking are dropped and reported in one line; returns (batch, dropped, the
    indices of the records kept)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    add = adds_bos(tokenizer)
    ids = np.full((len(records), seq_len), pad or 0, dtype=np.int32)
    attn = np.zeros((len(records), seq_len), dtype=np.int8)
    loss = np.zeros((len(records), seq_len), dtype=bool)
    dropped: list[tuple[int, dict, str]] = []
    for i, rec in enumerate(records):
        try:
            f_ids, start = _encode_record(rec, tokenizer, add)
        except ChatEncodingError as exc:
            dropped.append((i, rec, str(exc)))
            continue
        f_ids = f_ids[:seq_len]
        n = len(f_ids)
        ids[i, :n] = f_ids
        attn[i, :n] = 1
        # position t predicts token t+1: it counts when token t+1 is a target token
        loss[i, max(start - 1, 0) : n - 1] = True
    if dropped:
        i, rec, why = dropped[0]
        print(
            f"data: dropped {len(dropped)} of {len(records)} rows ({why}); "
            f"first: row {i} {_short(rec)}",
            flush=True,
        )
    keep = loss.any(axis=1)
    if not keep.any():
        raise RecipeError("data.seq_len", f"{seq_len} truncates every example to its prompt")
    kept = [int(i) for i in np.flatnonzero(keep)]
    return TokenBatch(ids[keep], attn[keep], loss[keep]), len(dropped), kept


def _encode_record(rec: dict[str, str], tokenizer: Any, add: bool) -> tuple[list[int], int]:
    """(ids, first target index) of one row."""
    if "prompt" not in rec:
        return encode_text(tokenizer, rec["text"], add), 1
    reason = rec.get("finish_reason") or STOP
    if reason not in FINISH_REASONS:
        raise RecipeError("data.path", f"finish_reason {reason!r} is not one of {FINISH_REASONS}")
    response = rec.get("response") or ""
    return encode_chat(tokenizer, rec["prompt"], response, reason == STOP, add)


def _short(rec: dict[str, Any], width: int = 60) -> str:
    text = repr({k: v for k, v in rec.items() if k in ("prompt", "response", "text")})
    return text if len(text) <= width else text[: width - 3] + "..."


def file_dataset(
    cfg: DataConfig,
    tokenizer: Any,
    seed: int,
    generate: GenerateFn | None,
    cache_dir: Path,
    teacher_key: dict | None = None,
    route: tuple[str, list[str]] | None = None,
) -> Dataset:
    """Rows of `data.path`, responses given or written by the teacher (`generate`, cached
    under `teacher_key`, see `writer_key`), tokenized with the student's tokenizer. `route`:
    (the field naming each row's teacher, the teachers' names)."""
    records: list[dict[str, str]] = read_records(cfg.path or "")
    routes = routes_of(records, cfg.path or "", *route) if route else None
    if cfg.responses == "teacher":
        if generate is None:
            raise RecipeError("data.responses", "'teacher' needs a teacher that can write text")
        prompts = [r.get("prompt") or r["text"] for r in records]
        key = {**(teacher_key or {}), **cfg.generation.model_dump()}
        responses = teacher_responses(prompts, generate, cache_dir, key)
        records = [{"prompt": p, **r} for p, r in zip(prompts, responses, strict=True)]
    batch, skipped, kept = tokenize_records(records, tokenizer, cfg.seq_len)
    prompts = [records[i].get("prompt") or records[i]["text"] for i in kept]
    kept_routes = routes[kept] if routes is not None else None
    return split_rows(batch, cfg.heldout, cfg.split_seed, seed, skipped, prompts, kept_routes)


def routes_of(records: list[dict[str, Any]], path: str, key: str, names: list[str]) -> np.ndarray:
    """Each row's teacher index from its `key` field (distill.teacher_key)."""
    out = np.empty(len(records), dtype=np.int64)
    for i, rec in enumerate(records):
        name = rec.get(key)
        if name not in names:
            raise RecipeError(
                f"{path}: row {i + 1}",
                f"field {key!r} is {name!r}, expected one of the teachers {names}",
            )
        out[i] = names.index(name)
    return out


def build_dataset(recipe: Recipe, pools: list[Any]) -> Dataset:
    """The run's rows: synthetic, or a file (its responses written by the first of `pools`,
    a live or cached teacher pool, where the recipe asks the teacher to write them)."""
    data = recipe.data
    student_path = local_model(recipe.student.model)
    if data.source == "synthetic":
        vocab = pools[0].info()["vocab_size"] if pools else vocab_size_of(student_path)
        return synthetic_dataset(data, vocab, recipe.run.seed)
    tokenizer = AutoTokenizer.from_pretrained(student_path)
    writer = pools[0] if pools else None
    gen = data.generation
    written = [0]

    def generate(prompts: list[str]) -> list[dict[str, str]]:
        start = time.monotonic()

        def on_chunk(n: int) -> None:
            written[0] += n
            rate = written[0] / max(time.monotonic() - start, 1e-9)
            eta = (len(prompts) - written[0]) / max(rate, 1e-9)
            print(
                f"teacher {writer.name} writing responses: {written[0]}/{len(prompts)} "
                f"({rate:.1f}/s, eta {eta:.0f}s)",
                flush=True,
            )

        sampling = gen.model_dump(exclude={"batch_size"})
        return writer.generate(prompts, sampling, gen.batch_size, on_chunk)

    cache_dir = Path(recipe.run.output_dir).resolve() / "cache"
    key = None
    if data.responses == "teacher":  # responses are reused only from the same writer
        info = writer.info()
        try:  # the template the teacher renders its prompts with (read here, no actor call)
            template = AutoTokenizer.from_pretrained(local_model(writer.cfg.model)).chat_template
        except (OSError, ValueError):
            template = None
        key = writer_key(info["model_hash"], info["tokenizer_hash"], template)
    d = recipe.distill
    route = (d.teacher_key, [t.name for t in recipe.teachers]) if d.teacher_key else None
    return file_dataset(data, tokenizer, recipe.run.seed, generate, cache_dir, key, route)
