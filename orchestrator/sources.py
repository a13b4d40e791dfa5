"""Sample sources: where a step's rows come from.

`DataSource`: the data's text (fixed, or cached rows: a cached teacher reads the same row
numbers). `RolloutSource`: each step draws, from the run seed and the step alone, whether
its batch is the student's own samples (probability `distill.lambda`, as in GKD) or the
data's text. An on-policy step takes the prompts of the first batch_size /
samples_per_prompt rows of the step's data batch (a row's prompt is everything before its
first target token), has the rollout engines write `samples_per_prompt` samples for each,
and sends the samples down the same path as data: the feedback scores them, the ranks
train on the sampled tokens.

Weights and staleness. The ranks publish a WeightSnapshot every `sync_every` steps, queued
right behind the train step it follows, so it holds exactly that step's weights; the
engines load it from the object store on their next call. Step t's samples are written
with version v(t) = the oldest synced version that keeps staleness t - v(t) within
`max_staleness`: with 0 every step waits for the previous update (strictly on-policy);
with 1 the samples of step t+1 are written with step t-1's result while step t trains.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from actors.batch import TokenBatch
from actors.rollout import request_seed
from actors.weights import GPU_SYNC
from orchestrator.parts import InFlight, Loop, Queued, Source

_LAMBDA_STREAM = 0x6F6E  # keeps the lambda draws apart from other seeded streams


def is_on_policy_step(seed: int, step: int, lmbda: float) -> bool:
    """GKD's lambda: each step is the student's own samples with probability lambda,
    drawn from (seed, step) alone, so a resumed run draws the same."""
    if lmbda >= 1:
        return True
    if lmbda <= 0:
        return False
    return bool(np.random.default_rng([seed, step, _LAMBDA_STREAM]).random() < lmbda)


def prompt_ids(batch: TokenBatch, row: int) -> np.ndarray:
    """The row's prompt: its tokens up to and including the one before the first target."""
    first = int(np.argmax(batch.loss_mask[row]))
    return batch.input_ids[row, : first + 1].copy()


class DataSource(Source):
    """The data's rows, step by step (`Dataset.rows_for_step`)."""

    def __init__(self, dataset: Any, batch_size: int) -> None:
        self.dataset, self.batch_size = dataset, batch_size

    def issue(self, step: int, world: int) -> InFlight:
        rows = self.dataset.rows_for_step(step, self.batch_size)
        batch = self.dataset.train.take(rows).trimmed()
        shards = [ray.put(s) for s in batch.shard(world)]
        routes = self.dataset.train_routes
        return InFlight(
            step,
            shards,
            batch.num_tokens,
            [[] for _ in shards],
            rows=rows,
            routes=None if routes is None else routes[rows],
        )


class RolloutSource(Source):
    """The student's own samples on a share `lmbda` of the steps, the data's on the rest."""

    def __init__(self, recipe: Any, dataset: Any, rollouts: Any) -> None:
        self.recipe, self.rollouts, self.lmbda = recipe, rollouts, recipe.on_policy_share
        self.data = DataSource(dataset, recipe.train.batch_size)
        self.services = (rollouts,)
        self.snapshots: dict[int, ray.ObjectRef] = {}
        self._start = 0
        self._students: Any = None

    # -- versions -------------------------------------------------------------------------

    def version_for(self, step: int) -> int:
        """The weight version step's samples are written with (see module docstring)."""
        r = self.recipe.rollout
        oldest = r.sync_every * math.ceil(max(step - r.max_staleness, 0) / r.sync_every)
        return max(oldest, self._start)

    def started(self, start: int, loop: Loop) -> None:
        self._start = start  # the checkpoint's weights: what a resumed run starts from
        self._students = loop.students
        if self.lmbda > 0:
            self.snapshots = {start: self.snapshot()}

    def after_train(self, step: int, end: int, loop: Loop) -> None:
        done = step + 1
        if self.lmbda > 0 and done < end and done % self.recipe.rollout.sync_every == 0:
            self.snapshots[done] = self.snapshot()
        self._prune(self.version_for(loop.next_issue))

    def snapshot(self) -> ray.ObjectRef:
        """The ranks' weights for the engines, after the work queued so far: a snapshot in
        the object store, or with a GPU `rollout.weight_sync` pushed into the engines now
        (`actors/vllm_transfer.py`), the ref then being rank 0's receipt."""
        mode = self.recipe.rollout.weight_sync
        if mode not in GPU_SYNC:
            return self._students.snapshot()
        engines = self.rollouts.replicas
        return [w.push_weights.remote(mode, engines) for w in self._students.workers][0]

    def _prune(self, oldest: int) -> None:
        """Drop snapshots no step from here on can use (versions only grow with steps), so
        at most max_staleness + 1 copies of the weights sit in the object store."""
        for old in [v for v in self.snapshots if v < oldest]:
            del self.snapshots[old]

    def can_issue(self, step: int) -> bool:
        return not self.on_policy(step) or self.version_for(step) in self.snapshots

    def on_policy(self, step: int) -> bool:
        return is_on_policy_step(self.recipe.run.seed, step, self.lmbda)

    # -- batches --------------------------------------------------------------------------

    def issue(self, step: int, world: int) -> InFlight:
        if not self.on_policy(step):
            return self.data.issue(step, world)
        train, k = self.recipe.train, self.recipe.rollout.samples_per_prompt
        rows = self.data.dataset.rows_for_step(step, train.batch_size)[: train.batch_size // k]
        t = self.data.dataset.train
        batch = TokenBatch(t.input_ids[rows], t.attention_mask[rows], t.loss_mask[rows])
        prompts = [prompt_ids(batch, i) for i in range(len(rows))]
        shards, metas = self._rollout(step, prompts, world)
        item = InFlight(step, shards, None, [[] for _ in shards], metas)
        item.prompts, item.prompt_rows = prompts, rows
        return item

    def _rollout(
        self, step: int, prompts: list[np.ndarray], world: int
    ) -> tuple[list[ray.ObjectRef], list[ray.ObjectRef]]:
        """The step's samples: (one TokenBatch ref per rank, one meta ref per engine)."""
        r = self.recipe.rollout
        rows = [p for p in prompts for _ in range(r.samples_per_prompt)]  # a prompt's K adjacent
        per_rank = len(rows) // world
        shards = [rows[i * per_rank : (i + 1) * per_rank] for i in range(world)]
        seeds = [
            [request_seed(self.recipe.run.seed, step, i * per_rank + j) for j in range(per_rank)]
            for i in range(world)
        ]
        version = self.version_for(step)
        self._prune(version)
        return self.rollouts.generate(shards, seeds, version, self.snapshots[version])

    # -- what a step reports --------------------------------------------------------------

    def step_metrics(self, item: Queued, metrics: dict[str, float], loop: Loop) -> None:
        metrics["on_policy"] = float(bool(item.meta))
        if not item.meta:
            return
        metas, step = loop.metas(item), item.step
        staleness = [step - m["version"] for m in metas]
        if max(staleness) > self.recipe.rollout.max_staleness or min(staleness) < 0:
            raise RuntimeError(f"step {step}: samples of versions {staleness} steps old")
        metrics.update(rollout_metrics(metas))
        metrics["rollout/staleness"] = float(max(staleness))
        metrics["actors_cpu_s"] = metrics.get("actors_cpu_s", 0.0) + metrics["rollout/cpu_s"]
        record(loop.run_dir / "rollouts", step, metas)

    def shutdown(self, keep: bool) -> None:
        self.rollouts.shutdown(keep)


def rollout_metrics(metas: list[dict[str, Any]]) -> dict[str, float]:
    """A step's rollout figures, from the engines' reports."""
    responses = [r for m in metas for r in m["responses"]]
    reasons = [f for m in metas for f in m["finish_reasons"]]
    busy = max(m["busy_s"] for m in metas)
    new_tokens = sum(m["new_tokens"] for m in metas)
    out = {
        "rollout/version": float(min(m["version"] for m in metas)),
        "rollout/busy_s": busy,
        "rollout/cpu_s": sum(m["cpu_s"] for m in metas),
        "rollout/new_tokens": float(new_tokens),
        "rollout/tokens_per_s": new_tokens / max(busy, 1e-9),
        "rollout/response_len": float(np.mean([len(r) for r in responses])),
        "rollout/truncated_frac": float(np.mean([f == "length" for f in reasons])),
    }
    synced = [m for m in metas if "sync_bytes" in m]
    if synced:
        out["sync/time_s"] = synced[0]["sync_gather_s"] + max(m["sync_load_s"] for m in synced)
        out["sync/bytes"] = float(synced[0]["sync_bytes"])
        out["sync/in_place"] = min(m.get("sync_in_place", 0.0) for m in synced)
    return out


def record(folder: Any, step: int, metas: list[dict[str, Any]]) -> None:
    """rollouts/step_XXXXXX.parquet: every sample with the version that wrote it."""
    table = pa.table(
        {
            "step": pa.array([step] * sum(len(m["responses"]) for m in metas), pa.int64()),
            "version": [m["version"] for m in metas for _ in m["responses"]],
            "finish_reason": [f for m in metas for f in m["finish_reasons"]],
            "response": pa.array([r for m in metas for r in m["responses"]], pa.list_(pa.int32())),
            "logprobs": pa.array(
                [lp for m in metas for lp in m["logprobs"]], pa.list_(pa.float32())
            ),
        }
    )
    folder.mkdir(exist_ok=True)
    path = folder / f"step_{step + 1:06d}.parquet"
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
