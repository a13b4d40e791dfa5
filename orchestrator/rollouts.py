"""RolloutPool: the rollout engines of a run, behind one handle."""

from __future__ import annotations

from typing import Any

import numpy as np
import ray

from actors.rollout import RolloutEngine
from actors.specs import EngineSpec
from actors.weights import GPU_SYNC, TRANSFER_GROUP
from orchestrator import warm
from orchestrator.actor_env import service_options
from orchestrator.balance import LeastOutstanding
from orchestrator.faults import restart_unresponsive
from orchestrator.parts import Source
from orchestrator.recipe import Recipe
from orchestrator.sources import DataSource, RolloutSource


def stop_token_ids_of(path: str) -> list[int]:
    """The ids that end a turn of the model at `path` (generation config and tokenizer)."""
    from transformers import AutoTokenizer, GenerationConfig

    from actors.chat import stop_token_ids

    try:
        eos = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:
        eos = None
    return stop_token_ids(eos, AutoTokenizer.from_pretrained(path))


def stop_and_pad(recipe: Recipe) -> tuple[list[int], int]:
    """The ids that end a student's turn and its pad id. Token-only data (synthetic, no
    tokenizer) has no end of turn: every sample runs to max_new_tokens."""
    if recipe.data.source == "synthetic":
        return [], 0
    from transformers import AutoTokenizer

    from actors.model_store import local_model

    path = local_model(recipe.student.model)
    stops = stop_token_ids_of(path)
    pad = AutoTokenizer.from_pretrained(path).pad_token_id
    return stops, int(pad if pad is not None else (stops or [0])[0])


def engine_spec(recipe: Recipe) -> EngineSpec:
    r, s = recipe.rollout, recipe.student
    stops, pad = stop_and_pad(recipe)
    return EngineSpec(
        model=s.model,
        layers=s.kept_layers,
        backend=r.backend,
        dtype=r.dtype,
        threads=r.threads,
        weight_sync=r.weight_sync,
        num_gpus=r.num_gpus,
        stop_ids=stops,
        pad=pad,
        seed=recipe.run.seed,
        max_model_len=recipe.data.seq_len + r.max_new_tokens,
    )


class RolloutPool:
    def __init__(self, recipe: Recipe) -> None:
        r = recipe.rollout
        # a restarted engine loads the snapshot of its next call, and generate is
        # idempotent (per-row seeds, a given snapshot): its calls in flight run again
        engine = ray.remote(RolloutEngine)
        if r.weight_sync in GPU_SYNC:  # the ranks' pushes, while the engine's thread waits
            engine = ray.remote(concurrency_groups={TRANSFER_GROUP: 1})(RolloutEngine)
        options = service_options(r, recipe.cluster.max_restarts)
        remote = engine.options(**options)
        spec = engine_spec(recipe)
        self.keys = rollout_keys(recipe, options, spec)
        # GPU weight_sync engines hold the ranks' transfer groups: never kept between runs
        self.warm = r.weight_sync not in GPU_SYNC
        self.replicas = [(self.warm and warm.take(k)) or remote.remote(spec) for k in self.keys]
        self.balance = LeastOutstanding(r.replicas)
        self.max_restarts = recipe.cluster.max_restarts
        self.restarts: dict[str, int] = {}  # by engine name, the ones the driver did
        self.sampling = {
            "temperature": r.temperature,
            "top_p": r.top_p,
            "max_new_tokens": r.max_new_tokens,
        }

    def generate(
        self,
        shards: list[list[np.ndarray]],
        seeds: list[list[int]],
        version: int,
        snapshot: ray.ObjectRef,
        sampling: dict[str, Any] | None = None,
    ) -> tuple[list[ray.ObjectRef], list[ray.ObjectRef]]:
        """(one TokenBatch ref per shard, in order; one meta ref per engine called). The
        shards are dealt over the engines, least outstanding first, so each engine writes
        an equal share (one more for the least busy ones) in one batch. `sampling`: other
        settings than the rollouts' (the win rate's greedy answers)."""
        n = len(self.replicas)
        out: list[ray.ObjectRef | None] = [None] * len(shards)
        metas = []
        depth = self.balance.depths()
        order = sorted(range(n), key=lambda e: (depth[e], self.balance.served[e], e))
        for rank, e in enumerate(order):
            mine = list(range(rank, len(shards), n))
            if not mine:
                continue
            refs = (
                self.replicas[e]
                .generate.options(num_returns=len(mine) + 1)
                .remote(
                    [shards[i] for i in mine],
                    [seeds[i] for i in mine],
                    sampling or self.sampling,
                    version,
                    [snapshot],
                )
            )
            for i, ref in zip(mine, refs[:-1], strict=True):
                out[i] = ref
            metas.append(refs[-1])
            self.balance.track(e, refs[-1])
        return [r for r in out if r is not None], metas

    def actors(self) -> dict[str, Any]:
        """The engines by name (what a fault names)."""
        return {f"rollout engine {i}": e for i, e in enumerate(self.replicas)}

    def engines_of(self, metas: list[ray.ObjectRef]) -> list[str]:
        """The engine each meta ref (of `generate`, not yet collected) was asked of."""
        names = list(self.actors())
        held = [
            next((names[e] for e, refs in enumerate(self.balance.outstanding) if m in refs), "")
            for m in metas
        ]
        return [h or "a rollout engine" for h in held]

    def restart_unresponsive(self, timeout_s: float) -> list[str]:
        """Restart the engines that do not answer within `timeout_s`; their names. A
        restarted engine writes its calls in flight again (see __init__)."""
        return restart_unresponsive(self.actors(), self.restarts, self.max_restarts, timeout_s)

    def shutdown(self, keep: bool = False) -> None:
        """Kill the engines, or with `keep` park them for the next run in this Ray
        (orchestrator/warm.py): each loads the next run's first snapshot before it writes."""
        keep = keep and self.warm and not self.restarts
        for k, engine in zip(self.keys, self.replicas, strict=True):
            warm.park_or_kill(k, engine, keep)


def rollout_keys(
    recipe: Recipe, options: dict[str, Any] | None = None, spec: EngineSpec | None = None
) -> list[str]:
    """The warm key of each engine (all alike): its options, spec and student files."""
    r = recipe.rollout
    options = options or service_options(r, recipe.cluster.max_restarts)
    spec = spec or engine_spec(recipe)
    stamp = warm.folder_stamp(recipe.student.model)
    return [warm.key(RolloutEngine, options, spec, stamp)] * r.replicas


def sample_source(recipe: Recipe, dataset: Any) -> Source:
    """The run's samples: the student's own on a share `distill.lambda` of the steps
    (rollout engines started here), the data's rows on the rest."""
    if recipe.rolls_out:
        return RolloutSource(recipe, dataset, RolloutPool(recipe))
    return DataSource(dataset, recipe.train.batch_size)


def sample_keys(recipe: Recipe) -> list[str]:
    """The warm keys of what `sample_source` starts."""
    return rollout_keys(recipe) if recipe.rolls_out else []
