"""StudentGroup: N StudentWorker actors forming one DeepSpeed data-parallel group."""

from __future__ import annotations

from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.objective import LossSpec
from actors.specs import RLSpec, WorkerSpec
from actors.student import StudentWorker
from orchestrator import feature_config, warm
from orchestrator.actor_env import actor_options, demand
from orchestrator.config_base import StudentConfig
from orchestrator.faults import gather
from orchestrator.recipe import Recipe


def worker_spec(
    recipe: Recipe,
    student: StudentConfig | None = None,
    name: str = "student",
    target_weights: list[float] | None = None,
    rl: RLSpec | None = None,
) -> WorkerSpec:
    """What a rank needs (actors know nothing of recipes). `target_weights`: one per signal
    the worker trains on (default: the teachers' weights, normalised)."""
    s, t, d = student or recipe.student, recipe.train, recipe.distill
    if target_weights is None:
        total = sum(x.weight for x in recipe.teachers)
        target_weights = [x.weight / total for x in recipe.teachers]
    terms = tuple((t.loss, t.weight) for t in d.terms or [])
    if d.features is not None and d.features.only:  # the feature term alone
        terms = ((d.loss, 0.0),)
    loss = LossSpec(d.loss, d.temperature, d.alpha, d.beta, d.skew, terms)
    return WorkerSpec(
        name=name,
        model=s.model,
        layers=s.kept_layers,
        loss=loss,
        top_k=d.top_k,
        teacher_weights=target_weights,
        aggregate=d.aggregate,
        confidence_by=d.confidence_by,
        confidence_temperature=d.confidence_temperature,
        routed_by_field=d.aggregate == "route" and d.teacher_key is not None,
        zero_stage=s.zero_stage,
        gradient_checkpointing=s.gradient_checkpointing,
        dtype=s.dtype,
        threads=s.threads,
        seed=recipe.run.seed,
        optimizer=t.optimizer,
        lr=t.lr,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps,
        total_steps=t.steps,
        min_lr_ratio=t.min_lr_ratio,
        grad_clip=t.grad_clip,
        micro_batch_size=t.micro_batch_size,
        grad_accum=recipe.grad_accum,
        chunk_bytes=d.chunk_mb * 2**20,
        rl=rl,
        features=feature_config.spec(d.features, _feature_teacher(recipe)),
        dense_teachers=tuple((x.name, x.model) for x in recipe.teachers)
        if d.signal == "hidden"
        else (),
    )


def _feature_teacher(recipe: Recipe) -> str:
    f = recipe.distill.features
    return next((t.model for t in recipe.teachers if f and t.name == f.teacher), "")


def group_key(s: StudentConfig) -> str:
    """A group's warm key: its ranks are set up again for each run, so only their number,
    placement and Ray options must match."""
    options = actor_options(s.num_cpus, s.num_gpus, s.threads, s.resources)
    return warm.key(StudentWorker, s.world_size, s.placement, demand(s), options)


class StudentGroup:
    """Construction places the ranks and starts them, and returns at once: their imports and
    engine setup overlap whatever starts next (the teachers' model loads, peer groups).
    `ready()` waits for them; nothing else may be called before it."""

    def __init__(
        self,
        recipe: Recipe,
        student: StudentConfig | None = None,
        spec: WorkerSpec | None = None,
    ) -> None:
        s = self.config = student or recipe.student
        spec = spec or worker_spec(recipe, s)
        self.name = spec.name
        # setup, load, save and export: whole-model work, bounded by the setup bound
        self.wait = {"timeout_s": recipe.cluster.setup_timeout_s}
        options = actor_options(s.num_cpus, s.num_gpus, s.threads, s.resources)
        self.key = group_key(s)
        self.workers: list[Any] = []
        self.num_params = 0
        self._setup: list[ray.ObjectRef] | None = None
        try:
            self.pg, self.workers = warm.take(self.key) or self._place(s, options)
            addr, port = self.workers[0].rendezvous.options(num_returns=2).remote()
            self._setup = [w.setup.remote(addr, port, spec) for w in self.workers]
        except BaseException:
            self.shutdown()  # a group that failed to form leaves no actor behind
            raise

    def _place(self, s: StudentConfig, options: dict[str, Any]) -> tuple[Any, list[Any]]:
        """One bundle per rank, reserved together: the group starts whole or not at once."""
        self.pg = placement_group([demand(s)] * s.world_size, strategy=s.placement.upper())
        remote = ray.remote(StudentWorker)
        workers = [
            remote.options(
                **options, scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, r)
            ).remote(r, s.world_size, s.threads)
            for r in range(s.world_size)
        ]
        return self.pg, workers

    def ready(self) -> StudentGroup:
        """Wait until every rank's engine is set up (once; later calls return at once)."""
        if self._setup is None:
            return self
        try:
            where = f"placing the {self.name} group ({self.config.placement})"
            gather([self.pg.ready()], where, **self.wait)
            infos = gather(self._setup, "students", who=self.ranks(), **self.wait)
        except BaseException:
            self.shutdown()
            raise
        self._setup = None
        self.num_params = int(infos[0]["num_params"])
        return self

    def __len__(self) -> int:
        return len(self.workers)

    def ranks(self) -> list[str]:
        """The ranks by name (what a fault names)."""
        return [f"{self.name} rank {r}" for r in range(len(self.workers))]

    def train_step(
        self,
        shards: list[ray.ObjectRef],
        signals: list[list[ray.ObjectRef]],
        step_tokens: int | None,
        rl: list[dict[str, Any]] | None = None,
    ) -> list[ray.ObjectRef]:
        """Refs of per-rank metrics; signals[rank] holds one signal ref per teacher;
        step_tokens: the step's loss tokens over all ranks (the objective's denominator;
        None: the ranks count them); rl[rank]: RLAIF inputs (StudentWorker.train_step)."""
        rl = rl or [None] * len(self.workers)
        return [
            w.train_step.remote(shard, sigs, step_tokens, r)
            for w, shard, sigs, r in zip(self.workers, shards, signals, rl, strict=True)
        ]

    def reference_hash(self) -> str | None:
        return gather([self.workers[0].reference_hash.remote()], "reference hash", **self.wait)[0]

    def evaluate(self, shards: list[ray.ObjectRef], signals: list[list[ray.ObjectRef]]) -> list:
        return [
            w.evaluate.remote(shard, sigs)
            for w, shard, sigs in zip(self.workers, shards, signals, strict=True)
        ]

    def snapshot(self) -> ray.ObjectRef:
        """Ref of the WeightSnapshot taken after the work queued so far (rank 0's)."""
        return [w.weights_snapshot.remote() for w in self.workers][0]

    def token_logprobs(self, shard: ray.ObjectRef) -> ray.ObjectRef:
        return [w.token_logprobs.remote(shard) for w in self.workers][0]

    def score(self, shards: list[ray.ObjectRef]) -> list[ray.ObjectRef]:
        """Each rank's own top-k on its shard, before its next update (for peers)."""
        return [w.score.remote(shard) for w, shard in zip(self.workers, shards, strict=True)]

    def save(self, directory: str, tag: str) -> list[ray.ObjectRef]:
        """Queued behind the ranks' current work: it saves the weights of the last queued
        step. The refs resolve when every rank's files are written and fsynced, each to
        {path: sha256} of the files that rank wrote (for the ledger)."""
        return [w.save_checkpoint.remote(directory, tag) for w in self.workers]

    def load_checkpoint(self, directory: str, tag: str) -> None:
        refs = [w.load_checkpoint.remote(directory, tag) for w in self.workers]
        gather(refs, "loading a checkpoint", who=self.ranks(), students=True, **self.wait)

    def export(self, path: str, tokenizer_from: str) -> None:
        refs = [w.export.remote(path, tokenizer_from) for w in self.workers]
        gather(refs, "export", who=self.ranks(), **self.wait)

    def shutdown(self, graceful: bool = True, keep: bool = False) -> None:
        """Leave the process group, then kill, or with `keep` park the ranks for the next run
        in this Ray (orchestrator/warm.py). After a fault a surviving rank may sit in a
        collective with a dead one: it is killed at once, not waited for."""
        if graceful:
            try:
                ray.get([w.shutdown.remote() for w in self.workers], timeout=30)
            except Exception:  # best effort before the kill
                keep = False
            else:
                if keep and self._setup is None:
                    pg, workers = self.pg, self.workers
                    warm.park(self.key, (pg, workers), workers, lambda: _kill(pg, workers))
                    return
        if hasattr(self, "pg"):
            _kill(self.pg, self.workers)


def _kill(pg: Any, workers: list[Any]) -> None:
    for w in workers:
        ray.kill(w)
    remove_placement_group(pg)
