"""Teachers served from a signal cache: what a cache was computed from (provenance), where
it lies, and the pool that serves it to a run with no teacher model loaded (the cached
TeacherPool; the live one is orchestrator/teachers.py). Built by `raydistill cache build`
(orchestrator/offline.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import ray

from actors.cached_teacher import CachedTeacher
from actors.model_store import local_model
from actors.signal_cache import (
    CacheCorrupt,
    CacheMismatch,
    CacheReader,
    data_hash,
)
from orchestrator import warm
from orchestrator.actor_env import service_options
from orchestrator.balance import LeastOutstanding
from orchestrator.faults import gather, restart_unresponsive
from orchestrator.recipe import Recipe, RecipeError
from orchestrator.teacher_config import TeacherConfig
from orchestrator.teachers import shipped_states, teacher_keys


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
    folder = getattr(cfg.source, "path", None)
    return Path(folder or Path(recipe.run.output_dir) / "signal_cache" / cfg.name).resolve()


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
        self.field = f"teachers[{recipe.teachers.index(cfg)}].source"
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
        stored = set(self.reader.hidden_layers)
        missing = sorted(set(feature_states(self.recipe, self.cfg)) - stored)
        if missing:
            raise RecipeError(
                "distill.features",
                f"teacher {self.name}'s cache {self.root} holds the hidden states of layers "
                f"{sorted(stored)}, not {missing}: build it with this recipe "
                "(raydistill cache build)",
            )

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
    root = str(cache_path(recipe, cfg))
    return options, (cfg.name, root, int(d.top_k), temperature, feature_states(recipe, cfg))


def feature_states(recipe: Recipe, cfg: TeacherConfig) -> tuple[int, ...]:
    """The layers whose hidden states the run reads from this teacher (the feature loss's)."""
    return tuple(shipped_states(cfg.name, recipe.distill).get("hidden_layers", ()))


def reader_key(recipe: Recipe, cfg: TeacherConfig) -> str:
    """A reader's warm key, with its cache's files (a cache built again is another)."""
    options, args = _reader(recipe, cfg)
    return warm.key(CachedTeacher, options, args, warm.folder_stamp(args[1]))


def teacher_warm_keys(recipe: Recipe) -> list[str]:
    """The warm keys of every teacher of the run: live replicas and cache readers."""
    live = [k for t in recipe.teachers if recipe.runs_live(t) for k in teacher_keys(recipe, t)]
    return live + [reader_key(recipe, t) for t in cached_teachers(recipe)]


class CacheThenLive:
    """The TeacherPool of a cached teacher in a run that samples the student
    (`source.fresh: live`): the data's rows (those with a cache row) are read from its
    cache, the student's own samples are scored by live replicas of the same teacher."""

    def __init__(self, cached: CachedTeacherPool, live: Any) -> None:
        self.cached, self.live = cached, live

    @property
    def name(self) -> str:
        return self.live.name

    @property
    def replicas(self) -> list[Any]:
        return [*self.live.replicas, *self.cached.replicas]

    @property
    def restarts(self) -> dict[str, int]:
        return {**self.live.restarts, **self.cached.restarts}

    def info(self) -> dict[str, Any]:
        return self.live.info()

    def score(
        self,
        shard_ref: ray.ObjectRef,
        rows: list[int] | None = None,
        examples: list[int] | None = None,
    ) -> ray.ObjectRef:
        if examples is None:  # a fresh sample: in no cache
            return self.live.score(shard_ref, rows)
        return self.cached.score(shard_ref, rows, examples)

    def generate(
        self,
        prompts: list[str],
        sampling: dict[str, Any],
        chunk: int,
        on_chunk: Callable[[int], None],
    ) -> list[dict[str, str]]:
        return self.live.generate(prompts, sampling, chunk, on_chunk)

    def holder(self, ref: ray.ObjectRef) -> str:
        return self.live.holder(ref)

    def actors(self) -> dict[str, Any]:
        return {**self.live.actors(), **self.cached.actors()}

    def restart_unresponsive(self, timeout_s: float) -> list[str]:
        return [
            *self.live.restart_unresponsive(timeout_s),
            *self.cached.restart_unresponsive(timeout_s),
        ]

    def served(self) -> dict[str, int]:
        """What each side served: `calls`/`rows` summed, and the cache's alone."""
        live, cached = self.live.served(), self.cached.served()
        out = {k: live.get(k, 0) + cached.get(k, 0) for k in {*live, *cached}}
        return {**out, "cache_calls": cached["calls"], "cache_rows": cached["rows"]}

    def queue_metrics(self) -> dict[str, float]:
        return self.live.queue_metrics()

    def shutdown(self, keep: bool = False) -> None:
        self.live.shutdown(keep)
        self.cached.shutdown(keep)
