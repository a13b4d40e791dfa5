"""The loop of every run: work issued d steps ahead, two steps queued on the students.

It is given a sample source, feedback providers and student groups (a mode's `Assembly`,
orchestrator/parts.py) and knows nothing else of modes. Each step the source puts one shard
per student rank in the object store and the feedback starts on it (teachers score every
shard); the ranks train on the shards plus the feedback. A bounded window of steps stays
in flight, so teachers score steps t+1..t+d while the students train on step t, and memory
stays bounded however long the run. Its body reads top to bottom: issue work ahead, train,
sync, evaluate, checkpoint.
"""

from __future__ import annotations

import signal
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import ray

from orchestrator.bounded_waits import BoundedWaits
from orchestrator.checkpoint import checkpoint_rows, commit_checkpoint, tag_for, write_json
from orchestrator.cohort import Cohort
from orchestrator.critical_path import TeacherPriority
from orchestrator.data import Dataset
from orchestrator.faults import gather
from orchestrator.model_registry import log_student, model_tags
from orchestrator.parts import Assembly, InFlight, Queued, RunResult, TeacherPool
from orchestrator.plots import plot_curves
from orchestrator.progress import Progress
from orchestrator.recipe import Recipe
from orchestrator.step_metrics import step_metrics
from orchestrator.teacher_targets import signals_for
from orchestrator.tracking import Tracker

QUEUED_STEPS = 2  # train steps queued on the students: the next is ready when one ends
# beside each judge's reward curve (`reward/<judge>`) where a run logged them
JUDGED_CURVES = ("eval/win_rate", "eval/constraints")


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
    def __init__(
        self,
        recipe: Recipe,
        run_dir: Path,
        pools: list[TeacherPool],
        students: Any,
        dataset: Dataset,
        tracker: Tracker,
        identity: dict[str, Any],
        assembly: Assembly,
    ) -> None:
        self.recipe, self.run_dir, self.pools = recipe, run_dir, pools
        self.students, self.dataset, self.tracker = students, dataset, tracker
        self.world = len(students)
        self.identity = identity  # recorded in every ledger, checked on resume
        self.source, self.parts = assembly.source, assembly.parts
        self.cohort = Cohort(students, assembly.peers, recipe.cluster.step_timeout_s)
        self._priority = TeacherPriority(
            pools, recipe.distill.teacher_nice, recipe.distill.prefetch_depth
        )
        self._heldout = self._put_heldout()
        # actors the ranks wait on: probed when a step runs past its bound
        services = [*pools, *(s for p in self.parts for s in p.services)]
        self.waits = BoundedWaits(list({id(s): s for s in services}.values()), recipe, tracker)
        self.ranks = students.ranks()
        self._metas: dict[int, list[dict[str, Any]]] = {}
        self._window: deque[InFlight] = deque()
        self.next_issue = 0

    # -- issuing work ahead ----------------------------------------------------------------

    def _put_heldout(self) -> InFlight:
        heldout = self.dataset.heldout
        parts = np.array_split(np.arange(len(heldout)), self.world)
        shards = [ray.put(heldout.rows(int(p[0]), int(p[-1]) + 1).trimmed()) for p in parts]
        examples = len(self.dataset.train) + np.arange(len(heldout))  # cache rows
        signals = signals_for(self.pools, shards, None, examples)
        return InFlight(-1, shards, heldout.num_tokens, signals)

    def _issue_ahead(self, step: int, end: int) -> None:
        """Issue the steps up to `prefetch_depth` ahead that can be issued now."""
        while self.next_issue <= min(step + self.recipe.distill.prefetch_depth, end - 1):
            if not all(p.can_issue(self.next_issue) for p in self.parts):
                break
            item = self.source.issue(self.next_issue, self.world)
            for part in self.parts:
                part.issued(item)
            self._window.append(item)
            self.next_issue += 1

    def _submit(self, step: int, end: int) -> Queued:
        """Queue step's train_step on every rank (feedback already d steps ahead), followed,
        in the same actor queues, by the evaluation and checkpoint that belong after it, so
        they see exactly this step's weights even though the next step is queued too."""
        self._issue_ahead(step, end)
        item = self._window.popleft()
        assert item.step == step, (item.step, step)
        for part in self.parts:
            part.before_train(item, self)
        queued = Queued(step, self.cohort.train(item), item.meta)
        for part in self.parts:
            part.after_train(step, end, self)
        self._issue_ahead(step, end)
        done, train = step + 1, self.recipe.train
        if train.eval_every and done % train.eval_every == 0 and done < train.steps:
            queued.evaluation = self._submit_eval()
        every = self.recipe.checkpoint.every
        if done == end or (every and done % every == 0):
            queued.save = self._save_after(step)
        return queued

    def _save_after(self, step: int) -> list[ray.ObjectRef]:
        """A checkpoint of the weights after `step`, queued behind it on every rank."""
        return self.cohort.save(self.run_dir / "checkpoints", tag_for(step + 1))

    # -- waiting on actors -----------------------------------------------------------------

    def metas(self, item: InFlight | Queued) -> list[dict[str, Any]]:
        """What wrote a step's samples (the rollout engines' reports), waited for once."""
        if item.step not in self._metas:
            what = f"rollouts of step {item.step + 1}"
            who = self.source.services[0].engines_of(item.meta)
            self._metas[item.step] = self.wait(item.meta, what, who)
        return self._metas[item.step]

    def wait(
        self, refs: list[ray.ObjectRef], what: str, who: list[str] | None = None, **kw: bool
    ) -> list[Any]:
        return self.waits.wait(refs, what, who, **kw)

    # -- the loop -------------------------------------------------------------------------

    def run(self, ledger: dict[str, Any] | None, stop_after: int | None) -> RunResult:
        """Keep QUEUED_STEPS train steps queued on the students, so a rank never waits for
        the driver to read metrics, log or checkpoint between steps."""
        train = self.recipe.train
        start, summary = self._resume(ledger)
        for part in self.parts:
            part.started(start, self)
        if "eval_before" not in summary:
            summary["eval_before"] = self.evaluate()
            self.tracker.log_metrics(0, {f"eval/{k}": v for k, v in summary["eval_before"].items()})
        end = train.steps if stop_after is None else min(train.steps, start + stop_after)
        self.next_issue = start
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
                metrics, now = self._step_metrics(item, last, last_cpu)
                last, last_cpu, step = now, time.process_time(), item.step + 1
                tokens_total += metrics["tokens"]
                self.tracker.log_metrics(step, metrics)  # written when a checkpoint commits
                headline = {k: v for p in self.parts for k, v in p.headline(metrics).items()}
                progress.update(metrics["loss"], metrics["kl"], metrics["tokens_per_s"], headline)
                if item.evaluation is not None:
                    ev = self._eval_result(item.evaluation)
                    self.tracker.log_metrics(step, {f"eval/{k}": v for k, v in ev.items()})
                if item.save is None and stop.set and not queued:
                    item.save = self._save_after(item.step)
                if item.save is not None:
                    self._checkpoint(step, summary, item.save)
        progress.close()
        finished = step >= train.steps
        if finished:
            summary.update(self._finish(tokens_total, time.perf_counter() - t_begin))
            write_json(self.run_dir / "summary.json", summary)
            self.tracker.log_artifact(self.run_dir / "summary.json")
        return RunResult(self.run_dir, step, finished, summary)

    def _step_metrics(
        self, item: Queued, last: float, last_cpu: float
    ) -> tuple[dict[str, float], float]:
        """A finished step's figures (the first group's, its peers', every part's), and
        when the step ended: its wall time runs from the end of the one before."""
        what = f"train step {item.step + 1}"
        per_rank = self.wait(item.metrics[0], what, self.ranks, students=True)
        now = time.perf_counter()
        wall = now - last
        metrics = step_metrics(per_rank, self.pools, wall, len(self._window))
        metrics["driver_cpu_s"] = time.process_time() - last_cpu  # incl. its threads
        if self.cohort.peers:
            peers = self.cohort.peer_metrics(item.step, item.metrics[1:], self.pools, wall)
            metrics["actors_cpu_s"] += peers.pop("actors_cpu_s")
            metrics.update(peers)
        self._priority.observe(metrics)
        for part in self.parts:
            part.step_metrics(item, metrics, self)
        self._metas.pop(item.step, None)
        return metrics, now

    def _resume(self, ledger: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        """(first step, summary so far): the checkpoint's, loaded on the ranks, and its
        MLflow rows logged again where MLflow missed them; (0, {}) for a new run."""
        if ledger is None:
            return 0, {}
        self.tracker.replay(checkpoint_rows(self.run_dir, ledger))
        folder = self.run_dir / "checkpoints"
        self.students.load_checkpoint(str(folder), ledger["tag"])
        self.cohort.load_peers(folder, ledger["tag"])
        start = int(ledger["step"])
        print(f"resumed from checkpoint at step {start}", flush=True)
        return start, dict(ledger.get("summary", {}))

    # -- evaluation, checkpoints, the end ---------------------------------------------------

    def _submit_eval(self) -> list[ray.ObjectRef]:
        return self.cohort.evaluate(self._heldout.shards, self._heldout.signals)

    def _eval_result(self, refs: list[ray.ObjectRef]) -> dict[str, float]:
        parts = self.wait(refs, "evaluation", self.cohort.ranks(), students=True)
        return self.cohort.eval_result(parts)

    def evaluate(self) -> dict[str, float]:
        return self._eval_result(self._submit_eval())

    def _checkpoint(self, step: int, summary: dict[str, Any], saved: list[ray.ObjectRef]) -> None:
        """Shards (fsynced and hashed by the ranks that wrote them), then the ledger with
        their hashes and the MLflow rows this checkpoint makes final, then those rows in
        MLflow: a committed step is never lost from either, nor logged twice (a crash after
        the ledger is repaired on resume). The ledger records the run's identity."""
        files: dict[str, str] = {}
        bound = self.recipe.cluster.setup_timeout_s  # a save writes the whole state
        what = f"checkpoint at step {step}"
        for written in gather(saved, what, timeout_s=bound, who=self.cohort.ranks(), students=True):
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
        logged = self.tracker.client.get_run(self.tracker.run_id).data.metrics
        judged = [k for k in sorted(logged) if k.startswith("reward/") or k in JUDGED_CURVES]
        keys = ["loss", *kl_keys, "tokens_per_s", *judged]
        curves = plot_curves(runs, keys, self.run_dir / "curves.png")
        self.tracker.log_artifact(curves)
        export_dir = self.run_dir / "student"
        self.students.export(str(export_dir), self.recipe.student.model)
        tags = model_tags(self.run_dir, self.identity)
        model = log_student(self.tracker, export_dir, tags, self.recipe.run.register_as)
        infos = [p.info() for p in self.pools]
        summary = {
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
        peers = [p.model for p in self.recipe.mutual.peers]
        summary.update(self.cohort.export_peers(self.run_dir, peers, self.tracker))
        for part in self.parts:
            part.finish(summary, self)
        return summary

    def shutdown(self, keep: bool = False) -> None:
        """Stop (or with `keep`, park) what the mode started (teachers and the first
        student group are the driver's)."""
        for part in self.parts:
            part.shutdown(keep)
        self.cohort.shutdown_peers(keep)
