"""The training loop of one run: teachers d steps ahead, two steps queued on the students.

Each step's token batch is split into one shard per student rank and put once; every
teacher scores every shard; the workers train on the shard plus one signal per teacher.
A bounded window of batches stays in flight, so teachers score steps t+1..t+d while the
students train on step t, and memory stays bounded however long the run.
"""

from __future__ import annotations

import signal
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray

from actors.batch import TokenBatch
from actors.specs import WorkerSpec
from orchestrator.checkpoint import (
    checkpoint_rows,
    commit_checkpoint,
    tag_for,
    write_json,
)
from orchestrator.critical_path import TeacherPriority
from orchestrator.data import Dataset
from orchestrator.faults import RuntimeFault, gather
from orchestrator.model_registry import log_student, model_tags
from orchestrator.offline import teacher_warm_keys
from orchestrator.plots import plot_curves
from orchestrator.progress import Progress
from orchestrator.recipe import Recipe
from orchestrator.step_metrics import pool_eval, step_metrics
from orchestrator.students import StudentGroup, group_key, worker_spec
from orchestrator.teachers import TeacherPool
from orchestrator.tracking import Tracker

QUEUED_STEPS = 2  # train steps queued on the students: the next is ready when one ends


@dataclass
class InFlight:
    """A step whose shards are in the object store and whose teachers are scoring them."""

    step: int
    shards: list[ray.ObjectRef]
    signals: list[list[ray.ObjectRef]]  # [rank][teacher]
    tokens: int | None  # loss tokens of the whole step, all ranks (None: the ranks count)
    meta: list[ray.ObjectRef] = field(default_factory=list)  # what wrote the shards, if any


@dataclass
class Queued:
    """A step queued on the students, with what is queued right behind it."""

    step: int
    metrics: list[ray.ObjectRef]
    meta: list[ray.ObjectRef] = field(default_factory=list)
    evaluation: list[ray.ObjectRef] | None = None
    save: list[ray.ObjectRef] | None = None


@dataclass
class RunResult:
    run_dir: Path
    steps_done: int
    finished: bool
    summary: dict[str, Any] = field(default_factory=dict)


class _StopFlag:
    """SIGINT/SIGTERM ask for a checkpoint and a clean stop at the next step boundary."""

    def __init__(self) -> None:
        self.set = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.set:
            raise KeyboardInterrupt
        self.set = True
        print("stop requested: finishing this step and checkpointing", flush=True)

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class TrainLoop:
    @classmethod
    def student_spec(cls, recipe: Recipe) -> WorkerSpec:
        """The worker spec of the run's (first) student group."""
        return worker_spec(recipe)

    def __init__(
        self,
        recipe: Recipe,
        run_dir: Path,
        pools: list[TeacherPool],
        students: StudentGroup,
        dataset: Dataset,
        tracker: Tracker,
        identity: dict[str, Any],
    ) -> None:
        self.recipe, self.run_dir, self.pools = recipe, run_dir, pools
        self.students, self.dataset, self.tracker = students, dataset, tracker
        self.world = len(students)
        self.identity = identity  # recorded in every ledger, checked on resume
        self._priority = TeacherPriority(pools, recipe.distill.teacher_nice)
        self._heldout = self._put_heldout(dataset.heldout)
        # actors the ranks wait on: probed when a step runs past its bound (modes add theirs)
        self.services: list[Any] = list(pools)
        self.ranks = students.ranks()

    # -- submitting work ------------------------------------------------------------------

    def _signals_for(
        self,
        shards: list[ray.ObjectRef],
        routes: np.ndarray | None = None,
        examples: np.ndarray | None = None,
    ) -> list[list[ray.ObjectRef]]:
        """[rank][teacher] signal refs; all teachers are sent their work at once and run
        concurrently. With `routes` (each row's teacher, `distill.teacher_key`), a teacher
        scores only the rows routed to it. `examples`: each row's cache row (what a cached
        teacher reads; live ones ignore it)."""
        n = len(shards)  # shards are equal row slices
        routed = [None] * n if routes is None else np.array_split(routes, n)
        rows = [None] * n if examples is None else np.array_split(examples, n)
        return [
            [
                pool.score(
                    shard,
                    None if r is None else np.flatnonzero(r == i).tolist(),
                    **({} if ex is None else {"examples": ex.tolist()}),
                )
                for i, pool in enumerate(self.pools)
            ]
            for shard, r, ex in zip(shards, routed, rows, strict=True)
        ]

    def _issue(self, step: int) -> InFlight:
        rows = self.dataset.rows_for_step(step, self.recipe.train.batch_size)
        batch = self.dataset.train.take(rows).trimmed()
        shards = [ray.put(s) for s in batch.shard(self.world)]
        routes = self.dataset.train_routes[rows] if self.dataset.train_routes is not None else None
        signals = self._signals_for(shards, routes, rows)
        return InFlight(step, shards, signals, batch.num_tokens)

    def _put_heldout(self, heldout: TokenBatch) -> InFlight:
        parts = np.array_split(np.arange(len(heldout)), self.world)
        shards = [ray.put(heldout.rows(int(p[0]), int(p[-1]) + 1).trimmed()) for p in parts]
        examples = len(self.dataset.train) + np.arange(len(heldout))  # cache rows
        return InFlight(-1, shards, self._signals_for(shards, None, examples), heldout.num_tokens)

    def _submit(self, step: int, end: int) -> Queued:
        """Queue step's train_step on every rank (teachers already d steps ahead), followed,
        in the same actor queues, by the evaluation and checkpoint that belong after it, so
        they see exactly this step's weights even though the next step is queued too."""
        self._issue_ahead(step, end)
        item = self._window.popleft()
        assert item.step == step, (item.step, step)
        done, train = step + 1, self.recipe.train
        queued = Queued(step, self._train(item), item.meta)
        self._after_train(step, end)
        self._issue_ahead(step, end)
        if train.eval_every and done % train.eval_every == 0 and done < train.steps:
            queued.evaluation = self._submit_eval()
        every = self.recipe.checkpoint.every
        if done == end or (every and done % every == 0):
            queued.save = self._save_after(step)
        return queued

    def _issue_ahead(self, step: int, end: int) -> None:
        """Issue the steps up to `prefetch_depth` ahead that can be issued now."""
        while self._next_issue <= min(step + self.recipe.distill.prefetch_depth, end - 1):
            if not self._can_issue(self._next_issue):
                break
            self._window.append(self._issue(self._next_issue))
            self._next_issue += 1

    # hooks of the modes that extend this loop (on_policy, mutual)

    def _can_issue(self, step: int) -> bool:
        return True

    def _train(self, item: InFlight) -> list[ray.ObjectRef]:
        return self.students.train_step(item.shards, item.signals, item.tokens)

    def _after_train(self, step: int, end: int) -> None:
        """Work queued on the students right behind train step `step`."""

    def _started(self, start: int) -> None:
        """Called once the students hold the weights of step `start`."""

    def _step_metrics(self, item: Queued, metrics: dict[str, float]) -> None:
        """Add a mode's own metrics for a finished step."""

    def _headline(self, metrics: dict[str, float]) -> dict[str, float]:
        """A mode's own figures for the progress line, next to loss and kl."""
        return {}

    @classmethod
    def warm_keys(cls, recipe: Recipe) -> list[str]:
        """What a run of this mode may take from orchestrator/warm.py (modes add theirs)."""
        return [*teacher_warm_keys(recipe), group_key(recipe.student)]

    def shutdown(self, keep: bool = False) -> None:
        """Stop (or with `keep`, park) the actors a mode started for itself (teachers and
        students are the driver's)."""

    def _save_after(self, step: int) -> list[ray.ObjectRef]:
        """A checkpoint of the weights after `step`, queued behind it on every rank."""
        return self.students.save(str(self.run_dir / "checkpoints"), tag_for(step + 1))

    # -- evaluation -----------------------------------------------------------------------

    def _submit_eval(self) -> list[ray.ObjectRef]:
        return self.students.evaluate(self._heldout.shards, self._heldout.signals)

    def _eval_result(self, refs: list[ray.ObjectRef]) -> dict[str, float]:
        return pool_eval(self._wait(refs, "evaluation", self.ranks, students=True))

    def evaluate(self) -> dict[str, float]:
        return self._eval_result(self._submit_eval())

    # -- waiting on actors -----------------------------------------------------------------

    def _wait(
        self,
        refs: list[ray.ObjectRef],
        what: str,
        who: list[str] | None = None,
        *,
        students: bool = False,
    ) -> list[Any]:
        """The refs' values, waited for `cluster.step_timeout_s`. Past it, a frozen service
        (teacher replica, judge, rollout engine) the ranks wait on is the first suspect: the
        silent ones are restarted, their calls run again, and the wait goes on under a new
        bound (time to restart and redo the work). With every service answering, the fault
        stands (`students`: a rank is stuck, the group is brought back)."""
        c = self.recipe.cluster
        bound = c.step_timeout_s
        while True:
            try:
                return gather(refs, what, timeout_s=bound, who=who, students=students)
            except RuntimeFault as fault:
                if not fault.timed_out or not self._restart_silent_services(what, bound):
                    raise
            bound = c.setup_timeout_s + c.step_timeout_s

    def _restart_silent_services(self, what: str, waited: float) -> list[str]:
        """Probe every service actor (a no-op, `step_timeout_s` at most); restart those that
        do not answer (each within `cluster.max_restarts`); report them by name, on the
        console and as MLflow tags `restarts/<actor>`."""
        c = self.recipe.cluster
        restarted = []
        for service in self.services:
            for name in service.restart_unresponsive(c.step_timeout_s):
                count = service.restarts[name]
                print(
                    f"{what}: no answer within {waited:.0f}s; {name} did not answer a probe: "
                    f"restarted it ({count}/{c.max_restarts}), its calls run again",
                    flush=True,
                )
                self.tracker.set_tags({f"restarts/{name}": str(count)})
                restarted.append(name)
        return restarted

    # -- the loop -------------------------------------------------------------------------

    def run(self, ledger: dict[str, Any] | None, stop_after: int | None) -> RunResult:
        """Keep QUEUED_STEPS train steps queued on the students, so a rank never waits for
        the driver to read metrics, log or checkpoint between steps."""
        train = self.recipe.train
        start, summary = self._resume(ledger)
        self._started(start)
        if "eval_before" not in summary:
            summary["eval_before"] = self.evaluate()
            self.tracker.log_metrics(0, {f"eval/{k}": v for k, v in summary["eval_before"].items()})
        end = train.steps if stop_after is None else min(train.steps, start + stop_after)
        self._window, self._next_issue = deque(), start
        queued: deque[Queued] = deque()
        next_submit, step = start, start
        progress = Progress(train.steps, start, train.log_every)
        tokens_total, t_begin, last = 0.0, time.perf_counter(), time.perf_counter()
        last_cpu = time.process_time()
        with _StopFlag() as stop:
            while True:
                while next_submit < end and len(queued) < QUEUED_STEPS and not stop.set:
                    queued.append(self._submit(next_submit, end))
                    next_submit += 1
                if stop.set and queued and queued[-1].save is None:  # checkpoint, then stop
                    queued[-1].save = self._save_after(queued[-1].step)
                if not queued:
                    break
                item = queued.popleft()
                per_rank = self._wait(
                    item.metrics, f"train step {item.step + 1}", self.ranks, students=True
                )
                now = time.perf_counter()
                metrics = self._aggregate(per_rank, now - last, len(self._window))
                metrics["driver_cpu_s"] = time.process_time() - last_cpu  # incl. its threads
                self._priority.observe(metrics)
                self._step_metrics(item, metrics)
                last, last_cpu, step = now, time.process_time(), item.step + 1
                tokens_total += metrics["tokens"]
                self.tracker.log_metrics(step, metrics)  # written when a checkpoint commits
                progress.update(
                    metrics["loss"], metrics["kl"], metrics["tokens_per_s"], self._headline(metrics)
                )
                if item.evaluation is not None:
                    ev = self._eval_result(item.evaluation)
                    self.tracker.log_metrics(step, {f"eval/{k}": v for k, v in ev.items()})
                if item.save is None and stop.set and not queued:
                    item.save = self._save_after(item.step)
                if item.save is not None:
                    self._checkpoint(step, summary, item.save)
        progress.close()
        elapsed = time.perf_counter() - t_begin
        finished = step >= train.steps
        if finished:
            summary.update(self._finish(tokens_total, elapsed))
            write_json(self.run_dir / "summary.json", summary)
            self.tracker.log_artifact(self.run_dir / "summary.json")
        return RunResult(self.run_dir, step, finished, summary)

    def _resume(self, ledger: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        """(first step, summary so far): the checkpoint's, loaded on the ranks, and its
        MLflow rows logged again where MLflow missed them; (0, {}) for a new run."""
        if ledger is None:
            return 0, {}
        self.tracker.replay(checkpoint_rows(self.run_dir, ledger))
        self.students.load_checkpoint(str(self.run_dir / "checkpoints"), ledger["tag"])
        start = int(ledger["step"])
        print(f"resumed from checkpoint at step {start}", flush=True)
        return start, dict(ledger.get("summary", {}))

    def _aggregate(self, per_rank: list[dict[str, float]], wall: float, depth: int) -> dict:
        return step_metrics(per_rank, self.pools, wall, depth)

    def _checkpoint(self, step: int, summary: dict[str, Any], saved: list[ray.ObjectRef]) -> None:
        """Shards (fsynced and hashed by the ranks that wrote them), then the ledger with
        their hashes and the MLflow rows this checkpoint makes final, then those rows in
        MLflow: a committed step is never lost from either, nor logged twice (a crash after
        the ledger is repaired on resume). The ledger records the run's identity."""
        files: dict[str, str] = {}
        bound = self.recipe.cluster.setup_timeout_s  # a save writes the whole state
        what = f"checkpoint at step {step}"
        for written in gather(saved, what, timeout_s=bound, who=self.ranks, students=True):
            files.update(written)
        extra = {"summary": summary, "identity": self.identity}
        rows = self.tracker.pending_rows()
        commit_checkpoint(self.run_dir, step, extra, self.recipe.checkpoint.keep, files, rows)
        self.tracker.commit()

    def _finish(self, tokens_total: float, elapsed: float) -> dict[str, Any]:
        after = self.evaluate()
        self.tracker.log_metrics(
            self.recipe.train.steps, {f"eval/{k}": v for k, v in after.items()}
        )
        self.tracker.commit()
        kl_keys = [f"kl/{p.name}" for p in self.pools]
        runs = {self.run_dir.name: (self.tracker.client, self.tracker.run_id)}
        curves = plot_curves(runs, ["loss", *kl_keys, "tokens_per_s"], self.run_dir / "curves.png")
        self.tracker.log_artifact(curves)
        export_dir = self.run_dir / "student"
        self.students.export(str(export_dir), self.recipe.student.model)
        tags = model_tags(self.run_dir, self.identity)
        model = log_student(self.tracker, export_dir, tags, self.recipe.run.register_as)
        infos = [p.info() for p in self.pools]
        return {
            "eval_after": after,
            "teacher_params": {i["name"]: i["num_params"] for i in infos},
            "teacher_served": {p.name: p.served() for p in self.pools},
            "student_params": self.students.num_params,
            "tokens_per_s": tokens_total / max(elapsed, 1e-9),
            "student_dir": str(export_dir),
            **model,
            "mlflow_run_id": self.tracker.run_id,
            "tracking_uri": self.tracker.uri,
        }
