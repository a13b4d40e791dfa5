"""Offline distillation: teacher signals computed once into a provenance-checked Parquet
cache (`raydistill cache build`), then served to any number of student runs with no teacher
model loaded (`distill.mode: offline`, or `teachers[i].cache` for one teacher of a run).

A cache is used only when what its signals were computed from matches the recipe exactly:
teacher weights (a hash of the weight files), tokenizer, k (a cache of k serves any k' <= k,
truncated on read), temperature, dtype, and the token ids and loss masks the signals are
aligned to (so seq_len, chat template, BOS and truncation all count). Otherwise the run
stops before any actor starts with one line naming the field and both values.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import ray

from actors.batch import TokenBatch
from actors.cached_teacher import CachedTeacher
from actors.model_store import local_model
from actors.signal_cache import (
    CacheCorrupt,
    CacheMismatch,
    CacheReader,
    CacheWriter,
    bytes_per_position,
    data_hash,
    verify,
)
from orchestrator import run_lock, warm
from orchestrator.balance import LeastOutstanding
from orchestrator.faults import gather, restart_unresponsive
from orchestrator.ray_env import service_options
from orchestrator.recipe import Recipe, RecipeError, TeacherConfig
from orchestrator.teachers import live_pool, teacher_keys


@lru_cache(maxsize=16)
def weights_digest(model: str) -> str:
    """sha256 over the model folder's config and weight files (names and contents): what
    a cache's signals were computed from, known without loading the model."""
    path = Path(local_model(model))
    if not path.is_dir():
        raise RecipeError("teachers.cache", f"{model!r} is not a local folder: cannot hash it")
    files = sorted(
        p for p in path.iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin")
    )
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def tokenizer_digest(model: str) -> str:
    from orchestrator.identity import student_tokenizer_hash

    return student_tokenizer_hash(model)


def provenance(recipe: Recipe, cfg: TeacherConfig, dataset: Any) -> dict[str, Any]:
    """What the recipe asks of teacher `cfg`'s signals (the fields a cache must match)."""
    d = recipe.distill
    return {
        "teacher": cfg.name,
        "model_hash": weights_digest(cfg.model),
        "tokenizer_hash": tokenizer_digest(cfg.model),
        "top_k": int(cfg.top_k or d.top_k),
        "temperature": float(cfg.temperature or d.temperature),
        "dtype": cfg.dtype,
        "data_hash": data_hash([dataset.train, dataset.heldout]),
    }


def cache_path(recipe: Recipe, cfg: TeacherConfig) -> Path:
    return Path(cfg.cache or Path(recipe.run.output_dir) / "signal_cache" / cfg.name).resolve()


def cached_teachers(recipe: Recipe) -> list[TeacherConfig]:
    """The teachers served from a cache in this run (all of them in mode offline)."""
    return [t for t in recipe.teachers if recipe.from_cache(t)]


class CachedTeacherPool:
    """The TeacherPool of a teacher served from its cache. The manifest is read on the driver
    (what the run needs to know of the teacher, no actor); `check` compares its provenance
    with the recipe's once the data is tokenized, and only then `start` starts the one
    CachedTeacher actor (no model, a little CPU) that reads the shards."""

    def __init__(self, recipe: Recipe, cfg: TeacherConfig) -> None:
        self.recipe, self.cfg = recipe, cfg
        self.field = f"teachers[{recipe.teachers.index(cfg)}].cache"
        self.root = cache_path(recipe, cfg)
        if not (self.root / "manifest.json").is_file():
            raise RecipeError(
                self.field, f"no cache at {self.root}; build it first: raydistill cache build"
            )
        try:
            self.reader = CacheReader(self.root)
        except (CacheCorrupt, ValueError) as exc:
            raise RecipeError(self.field, str(exc)) from exc
        prov = self.reader.provenance
        self._info = {
            "name": cfg.name,
            "vocab_size": int(prov["vocab_size"]),
            "num_params": int(prov["num_params"]),
            "model_hash": prov["live_model_hash"],  # as a live replica reports it
            "tokenizer_hash": prov["live_tokenizer_hash"],
            "backend": "cache",
            "cache": str(self.root),
        }
        self.replicas: list[Any] = []
        self.key = ""
        self.balance = LeastOutstanding(1)
        self.restarts: dict[str, int] = {}

    @property
    def name(self) -> str:
        return self.cfg.name

    def info(self) -> dict[str, Any]:
        return self._info

    def check(self, dataset: Any) -> None:
        try:
            self.reader.check(provenance(self.recipe, self.cfg, dataset))
        except CacheMismatch as exc:
            raise RecipeError(self.field, str(exc)) from exc

    def start(self) -> None:
        options, args = _reader(self.recipe, self.cfg)
        self.key = reader_key(self.recipe, self.cfg)
        actor = warm.take(self.key) or ray.remote(CachedTeacher).options(**options).remote(*args)
        self.replicas = [actor]

    def score(
        self,
        shard_ref: ray.ObjectRef,
        rows: list[int] | None = None,
        examples: list[int] | None = None,
    ) -> ray.ObjectRef:
        ref = self.replicas[0].score.remote(shard_ref, rows, examples)
        self.balance.track(0, ref)
        return ref

    def generate(
        self,
        prompts: list[str],
        sampling: dict[str, Any],
        chunk: int,
        on_chunk: Callable[[int], None],
    ) -> list[dict[str, str]]:
        raise RecipeError(
            "data.responses",
            f"teacher {self.name} is served from its cache and its responses are not in the "
            "response cache: run `raydistill cache build` with this recipe first",
        )

    def holder(self, ref: ray.ObjectRef) -> str:
        return f"cache reader {self.name}"

    def actors(self) -> dict[str, Any]:
        return {f"cache reader {self.name}": actor for actor in self.replicas}

    def restart_unresponsive(self, timeout_s: float) -> list[str]:
        """Restart the reader if it does not answer within `timeout_s` (see faults.py)."""
        cap = self.recipe.cluster.max_restarts
        return restart_unresponsive(self.actors(), self.restarts, cap, timeout_s)

    def served(self) -> dict[str, int]:
        bound = self.recipe.cluster.setup_timeout_s
        info = gather([self.replicas[0].info.remote()], f"cache {self.name}", timeout_s=bound)[0]
        return {k: int(info["served"][k]) for k in ("calls", "rows")}

    def queue_metrics(self) -> dict[str, float]:
        return {}

    def shutdown(self, keep: bool = False) -> None:
        """Kill the reader, or with `keep` park it for the next run (orchestrator/warm.py)."""
        for actor in self.replicas:
            warm.park_or_kill(self.key, actor, keep and not self.restarts)


def _reader(recipe: Recipe, cfg: TeacherConfig) -> tuple[dict[str, Any], tuple[Any, ...]]:
    """(Ray options, arguments) of a cache reader: a little CPU, no GPU."""
    d = recipe.distill
    options = service_options(cfg, recipe.cluster.max_restarts)
    options.update(num_cpus=min(cfg.num_cpus, 0.25), num_gpus=0)
    temperature = float(cfg.temperature or d.temperature)
    return options, (cfg.name, str(cache_path(recipe, cfg)), int(d.top_k), temperature)


def reader_key(recipe: Recipe, cfg: TeacherConfig) -> str:
    """A reader's warm key, with its cache's files (a cache built again is another)."""
    options, args = _reader(recipe, cfg)
    return warm.key(CachedTeacher, options, args, warm.folder_stamp(args[1]))


def teacher_warm_keys(recipe: Recipe) -> list[str]:
    """The warm keys of every teacher of the run: live replicas and cache readers."""
    live = [k for t in recipe.teachers if not recipe.from_cache(t) for k in teacher_keys(recipe, t)]
    return live + [reader_key(recipe, t) for t in cached_teachers(recipe)]


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
            raise RecipeError(f"teachers[{i}].cache", f"{root} holds another cache: {exc}") from exc
        except CacheCorrupt as exc:
            i = recipe.teachers.index(cfg)
            raise RecipeError(f"teachers[{i}].cache", f"{root}: {exc}") from exc
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
            writer.add(first + r, signal.ids[a:b], signal.logprobs[a:b])
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
            "teachers", "no teacher to cache: set teachers[i].cache or distill.mode: offline"
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
        live = [t.model_copy(update={"cache": None}) for t in wanted]  # here they all run
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
