"""Offline distillation: teacher signals computed once into a provenance-checked Parquet
cache (`raydistill cache build`), then served to any number of student runs with no teacher
model loaded (`distill.mode: offline`, or `teachers[i].source: cache` for one teacher).

A cache is used only when what its signals were computed from matches the recipe exactly:
teacher weights (a hash of the weight files), tokenizer, k (a cache of k serves any k' <= k,
truncated on read), temperature, dtype, and the token ids and loss masks the signals are
aligned to (so seq_len, chat template, BOS and truncation all count). Otherwise the run
stops before any actor starts with one line naming the field and both values.
"""

from __future__ import annotations

import shutil
import time
from collections import deque
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import ray

from actors.batch import TokenBatch
from actors.signal_cache import (
    CacheCorrupt,
    CacheMismatch,
    CacheReader,
    CacheWriter,
    bytes_per_position,
    verify,
)
from orchestrator import run_lock
from orchestrator.cached_teachers import cache_path, cached_teachers, feature_states, provenance
from orchestrator.faults import gather
from orchestrator.recipe import Recipe, RecipeError
from orchestrator.teacher_config import LiveSource, TeacherConfig
from orchestrator.teachers import live_pool


def build(recipe: Recipe, pools: list[Any], dataset: Any, chunk_rows: int = 32) -> dict:
    """Run every cached teacher once over the train and held-out rows (cache row i is train
    row i, then the held-out rows follow), pipelined over its replicas, and write its
    cache. A killed build continues after its last committed shard."""
    by_name = {p.name: p for p in pools}
    report: dict[str, Any] = {}
    for cfg in cached_teachers(recipe):
        pool = by_name[cfg.name]
        root = cache_path(recipe, cfg)
        root.mkdir(parents=True, exist_ok=True)
        info = pool.info()
        prov = provenance(recipe, cfg, dataset)
        prov.update(  # what a run served from this cache reports of its teacher
            vocab_size=int(info["vocab_size"]),
            num_params=int(info["num_params"]),
            live_model_hash=info["model_hash"],
            live_tokenizer_hash=info["tokenizer_hash"],
        )
        total = len(dataset.train) + len(dataset.heldout)
        try:
            writer = CacheWriter(root, prov, num_rows=total)
        except CacheMismatch as exc:
            i = recipe.teachers.index(cfg)
            why = f"{root} holds another cache: {exc}"
            raise RecipeError(f"teachers[{i}].source.path", why) from exc
        except CacheCorrupt as exc:
            i = recipe.teachers.index(cfg)
            raise RecipeError(f"teachers[{i}].source.path", f"{root}: {exc}") from exc
        want = set(feature_states(recipe, cfg))
        have = set(writer.hidden_layers)
        if writer.next_row and have != want:  # a cache of other states: never mixed
            i = recipe.teachers.index(cfg)
            why = (
                f"{root} holds the hidden states of layers {sorted(have)}, this recipe ships "
                f"{sorted(want)} (distill.features): remove it or build into another path"
            )
            raise RecipeError(f"teachers[{i}].source.path", why)
        bound = recipe.cluster.step_timeout_s
        report[cfg.name] = _fill(pool, writer, dataset, chunk_rows, bound)
        report[cfg.name].update(bytes_per_position=bytes_per_position(root), path=str(root))
    return report


def _chunks(dataset: Any, first: int, size: int) -> list[tuple[int, TokenBatch]]:
    """(cache row, rows) chunks from cache row `first` on; none straddles train/held-out."""
    out, offset = [], 0
    for part in (dataset.train, dataset.heldout):
        for start in range(max(first - offset, 0), len(part), size):
            out.append((offset + start, part.rows(start, min(start + size, len(part)))))
        offset += len(part)
    return out


def _fill(
    pool: Any, writer: CacheWriter, dataset: Any, size: int, timeout_s: float
) -> dict[str, Any]:
    """Score the chunks in order, a few in flight; each is waited for at most `timeout_s`
    once the ones before it are in."""
    total = len(dataset.train) + len(dataset.heldout)
    begin, start = writer.next_row, time.monotonic()
    todo = deque(_chunks(dataset, begin, size))
    inflight: deque[tuple[int, TokenBatch, ray.ObjectRef]] = deque()
    depth = 2 * len(pool.replicas) + 1  # every replica busy, the next chunk queued

    def issue() -> None:
        if todo:
            first, part = todo.popleft()
            inflight.append((first, part, pool.score(ray.put(part.trimmed()))))

    for _ in range(depth):
        issue()
    while inflight:
        first, part, ref = inflight.popleft()
        what = f"teacher {pool.name} scoring cache rows from {first}"
        signal = gather([ref], what, timeout_s=timeout_s, who=[pool.holder(ref)])[0]
        issue()
        ends = np.cumsum(part.loss_mask.sum(axis=1))
        for r, (a, b) in enumerate(zip(np.concatenate([[0], ends[:-1]]), ends, strict=True)):
            states = {layer: h[a:b] for layer, h in signal.hidden.layers.items()}
            writer.add(first + r, signal.ids[a:b], signal.logprobs[a:b], states)
        done = first + len(part)
        rate = (done - begin) / max(time.monotonic() - start, 1e-9)
        print(
            f"cache {pool.name}: {done}/{total} rows ({rate:.1f} rows/s, "
            f"eta {(total - done) / max(rate, 1e-9):.0f}s)",
            flush=True,
        )
    writer.close()
    return {"rows": total, "resumed_at": begin, "seconds": time.monotonic() - start}


def verify_cache(path: str) -> int:
    """`raydistill cache verify PATH`: one line per bad shard; exit 1 if any."""
    root = Path(path)
    try:
        bad = verify(root)
    except CacheCorrupt as exc:
        raise RecipeError(path, str(exc)) from exc
    for name in bad:
        print(f"bad shard: {root / name}", flush=True)
    reader = CacheReader(root)
    print(
        f"{root}: {reader.num_rows} rows, k={reader.top_k}, "
        f"{'all shards intact' if not bad else f'{len(bad)} bad shard(s)'}",
        flush=True,
    )
    return 1 if bad else 0


def build_command(recipe: Recipe) -> int:
    """`raydistill cache build RECIPE`: start the cached teachers (and the first teacher, if
    it writes the responses), tokenize the data as a run would, write each cache. Each cache
    folder is held (`run_lock`) for the whole build: a second build of it is refused."""
    names = {t.name for t in cached_teachers(recipe)}
    if not names:
        raise RecipeError(
            "teachers",
            "no teacher to cache: set teachers[i].source: cache or distill.mode: offline",
        )
    writer = recipe.teachers[0] if recipe.data.responses == "teacher" else None
    wanted = [t for t in recipe.teachers if t.name in names or t is writer]
    with ExitStack() as held:  # refused here, before Ray or a model starts
        for t in cached_teachers(recipe):
            held.enter_context(_hold_cache(cache_path(recipe, t)))
        report = _build_with(recipe, wanted)
    for name, r in report.items():
        resumed = f" (resumed at row {r['resumed_at']})" if r["resumed_at"] else ""
        print(
            f"cache {name}: {r['rows']} rows in {r['seconds']:.0f}s{resumed}, "
            f"{r['bytes_per_position']:.0f} bytes per position -> {r['path']}",
            flush=True,
        )
    return 0


@contextmanager
def _hold_cache(root: Path) -> Iterator[None]:
    """Hold a cache folder's lock; a folder this build created and left without a manifest
    (it failed first) is removed, so a failed build leaves nothing behind."""
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    with run_lock.hold(root, "signal cache"):
        try:
            yield
        except BaseException:
            if created and [p.name for p in root.iterdir()] == [run_lock.LOCK_NAME]:
                shutil.rmtree(root, ignore_errors=True)
            raise


def _build_with(recipe: Recipe, wanted: list[TeacherConfig]) -> dict[str, Any]:
    """Start Ray and the `wanted` teachers, build every cache, tear everything down."""
    from orchestrator.data import build_dataset
    from orchestrator.placement import check_resources
    from orchestrator.ray_env import ensure_ray

    started = ensure_ray(recipe.cluster)
    pools: list[Any] = []
    built = False
    try:
        live = [t.model_copy(update={"source": LiveSource()}) for t in wanted]  # all run here
        mode = recipe.distill.model_copy(update={"mode": "off_policy"})
        check_resources(recipe.model_copy(update={"teachers": live, "distill": mode}))
        pools = [live_pool(recipe, t) for t in wanted]
        dataset = build_dataset(recipe, pools)
        out = build(recipe, pools, dataset)
        built = True
        return out
    finally:
        for pool in pools:  # kept for a run in this Ray (orchestrator/warm.py)
            pool.shutdown(keep=built and not started)
        if started:
            ray.shutdown()
