"""The live TeacherPool (orchestrator/parts.py): the replicas of one teacher behind one
handle that spreads work over them. The cached one reads a signal cache
(orchestrator/cached_teachers.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray

from actors.judge import JUDGE_GROUP, judge_kwargs
from actors.signal import FINAL
from actors.teacher import TeacherActor
from orchestrator import warm
from orchestrator.actor_env import service_options
from orchestrator.balance import LeastOutstanding
from orchestrator.faults import gather, restart_unresponsive
from orchestrator.recipe import ClusterConfig, DistillConfig, Recipe
from orchestrator.teacher_config import TeacherConfig


class LiveTeacherPool:
    def __init__(
        self,
        cfg: TeacherConfig,
        distill: DistillConfig,
        max_model_len: int = 2048,
        actor_class: type = TeacherActor,
        student_tokenizer: str | None = None,
        cluster: ClusterConfig | None = None,
        judges: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """`student_tokenizer`: the student's, for a teacher with `cross_tokenizer` set. A
        replica that dies is restarted (`cluster.max_restarts`) and the calls it had in
        flight run again on it: scoring and writing are idempotent (a shard's signal, a
        prompt chunk's seeded responses). A replica that stops answering (frozen, hung) is
        found by `restart_unresponsive` and restarted the same way."""
        self.cfg = cfg
        cluster = cluster or ClusterConfig()
        self.setup = {"timeout_s": cluster.setup_timeout_s}
        self.step_timeout_s = cluster.step_timeout_s
        self.max_restarts = cluster.max_restarts
        self.restarts: dict[str, int] = {}  # by replica name, the ones the driver did
        options, args = _replicas(cfg, distill, max_model_len, student_tokenizer, cluster, judges)
        self.keys = _keys(actor_class, options, args)
        if judges:  # judge calls in a thread of their own (actors/judge.py JUDGE_GROUP)
            remote = ray.remote(concurrency_groups={JUDGE_GROUP: 1})(actor_class)
        else:
            remote = ray.remote(actor_class)
        remote = remote.options(**options)
        pairs = zip(self.keys, args, strict=True)
        self.replicas = [warm.take(k) or remote.remote(**a) for k, a in pairs]
        self.balance = LeastOutstanding(cfg.replicas)
        self._info: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.cfg.name

    def replica_name(self, i: int) -> str:
        return f"teacher {self.name} replica {i}"

    def actors(self) -> dict[str, Any]:
        """The replicas by name (what a fault names)."""
        return {self.replica_name(i): r for i, r in enumerate(self.replicas)}

    def holder(self, ref: ray.ObjectRef) -> str:
        """The replica a call still running was sent to (what a wait past its bound names)."""
        held = [i for i, refs in enumerate(self.balance.outstanding) if ref in refs]
        return self.replica_name(held[0]) if held else f"teacher {self.name}"

    def restart_unresponsive(self, timeout_s: float) -> list[str]:
        """Restart the replicas that do not answer within `timeout_s`; their names."""
        return restart_unresponsive(self.actors(), self.restarts, self.max_restarts, timeout_s)

    def info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = gather(
                [self.replicas[0].info.remote()],
                f"teacher {self.name}",
                who=[self.replica_name(0)],
                **self.setup,
            )[0]
        return self._info

    def score(
        self,
        shard_ref: ray.ObjectRef,
        rows: list[int] | None = None,
        examples: list[int] | None = None,
    ) -> ray.ObjectRef:
        """A TeacherSignal ref for the shard (or only its `rows`), from the replica with the
        fewest outstanding requests (`examples`: for cached teachers only)."""
        i = self.balance.pick()
        ref = self.replicas[i].score.remote(shard_ref, rows)
        self.balance.track(i, ref)
        return ref

    def served(self) -> dict[str, int]:
        """Shards and rows the replicas scored so far, and judgments they gave as a judge
        (their own counts), summed."""
        infos = gather(
            [r.info.remote() for r in self.replicas],
            f"teacher {self.name}",
            who=list(self.actors()),
            **self.setup,
        )
        return {k: sum(int(i["served"][k]) for i in infos) for k in infos[0]["served"]}

    def queue_metrics(self) -> dict[str, float]:
        """Queue depth and requests served per replica, for MLflow."""
        out: dict[str, float] = {}
        for i, depth in enumerate(self.balance.depths()):
            out[f"teacher_queue/{self.name}/r{i}"] = float(depth)
            out[f"teacher_served/{self.name}/r{i}"] = float(self.balance.served[i])
        return out

    def generate(
        self,
        prompts: list[str],
        sampling: dict[str, Any],
        chunk: int,
        on_chunk: Callable[[int], None],
    ) -> list[dict[str, str]]:
        """Responses for all prompts, each `{"response", "finish_reason"}` (see
        TeacherActor.generate), chunks spread over the replicas, order kept. Each chunk is
        waited for at most `cluster.step_timeout_s` once the ones before it are in."""
        chunks = [prompts[i : i + chunk] for i in range(0, len(prompts), chunk)]
        refs, by = [], []
        for i, c in enumerate(chunks):
            r = self.balance.pick()
            refs.append(self.replicas[r].generate.remote(c, {**sampling, "seed": i}))
            self.balance.track(r, refs[-1])
            by.append(self.replica_name(r))
        out: list[dict[str, str]] = []
        for i, (ref, c) in enumerate(zip(refs, chunks, strict=True)):
            what = f"teacher {self.name} writing responses (chunk {i + 1}/{len(chunks)})"
            out.extend(gather([ref], what, timeout_s=self.step_timeout_s, who=[by[i]])[0])
            on_chunk(len(c))
        return out

    def shutdown(self, keep: bool = False) -> None:
        """Kill the replicas, or with `keep` park them for the next run in this Ray
        (`orchestrator/warm.py`), unless the driver restarted one."""
        for k, actor in zip(self.keys, self.replicas, strict=True):
            warm.park_or_kill(k, actor, keep and not self.restarts)


def _replicas(
    cfg: TeacherConfig,
    distill: DistillConfig,
    max_model_len: int,
    student_tokenizer: str | None,
    cluster: ClusterConfig,
    judges: dict[str, dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(Ray options, each replica's arguments), and so its warm key."""
    common = {
        "name": cfg.name,
        "model": cfg.model,
        "top_k": cfg.top_k or distill.top_k,
        "temperature": cfg.temperature or distill.temperature,
        "dtype": cfg.dtype,
        "threads": cfg.threads,
        "chunk_bytes": distill.chunk_mb * 2**20,
        "backend": cfg.backend,
        "max_model_len": max_model_len,
        "student_tokenizer": student_tokenizer if cfg.cross_tokenizer else None,
        **({"judges": judges} if judges else {}),
        **shipped_states(cfg.name, distill),
    }
    options = service_options(cfg, cluster.max_restarts)
    return options, [{**common, "replica": i} for i in range(cfg.replicas)]


def shipped_states(name: str, distill: DistillConfig) -> dict[str, Any]:
    """The layers whose states this teacher ships: the feature loss's (resolved pairs) and,
    for distill.signal hidden, the final one (then its top-k is one entry: unused)."""
    f = distill.features
    layers = set()
    if f is not None and f.teacher == name and f.pairs != "uniform":
        layers |= {int(t) for _, t in f.pairs}
    if distill.signal == "hidden":
        return {"hidden_layers": (*sorted(layers), FINAL), "top_k": 1}
    return {"hidden_layers": tuple(sorted(layers))} if layers else {}


def _keys(actor_class: type, options: dict[str, Any], args: list[dict[str, Any]]) -> list[str]:
    """Each replica's warm key: with its model's files (a folder rewritten in place is
    another teacher)."""
    return [warm.key(actor_class, options, a, warm.folder_stamp(a["model"])) for a in args]


def live_pool(recipe: Recipe, cfg: TeacherConfig) -> LiveTeacherPool:
    """A teacher's live replicas, sized for what the recipe asks of them."""
    return LiveTeacherPool(cfg, recipe.distill, **_live_args(recipe, cfg))


def teacher_keys(recipe: Recipe, cfg: TeacherConfig) -> list[str]:
    """The warm keys of `live_pool(recipe, cfg)`'s replicas."""
    a = _live_args(recipe, cfg)
    replicas = _replicas(
        cfg, recipe.distill, a["max_model_len"], a["student_tokenizer"], a["cluster"], a["judges"]
    )
    return _keys(TeacherActor, *replicas)


def _live_args(recipe: Recipe, cfg: TeacherConfig) -> dict[str, Any]:
    return {
        "max_model_len": teacher_max_len(recipe),
        "student_tokenizer": recipe.student.model,
        "cluster": recipe.cluster,
        "judges": hosted_judges(recipe, cfg),
    }


def hosted_judges(recipe: Recipe, cfg: TeacherConfig) -> dict[str, dict[str, Any]]:
    """The judges of an RLAIF run that name this teacher: its replicas serve them."""
    if recipe.distill.mode != "rlaif":
        return {}
    return {
        j.name: judge_kwargs(j.kind, j.rubric, j.rating_tokens, j.min_mass)
        for j in recipe.judges
        if j.teacher == cfg.name
    }


def teacher_max_len(recipe: Recipe) -> int:
    """The longest sequence a vLLM teacher is asked to hold: a rendered prompt plus what it
    writes, or a training row plus a rollout."""
    data = recipe.data
    longest = data.seq_len + max(data.generation.max_new_tokens, recipe.rollout.max_new_tokens)
    return max(2048, longest)
