"""distill.mode: mutual — students that distill from each other while they all train (deep
mutual learning), optionally from frozen teachers as well.

Every student is its own DeepSpeed group (own model, own size) and trains on the same
batches. At step t each group first scores the step's shards with its current weights (its
top-k, the same TeacherSignal contract as a teacher), queued right before its own train
step t; then each group trains on the teachers' signals plus its peers' signals. So each
student learns from the others' distributions of the same step, before that step's update.

The signals a student trains on are weighted: each teacher by its `weight`, each peer by
`mutual.peer_weight`, normalised to sum to 1. Each student has its own metrics
(`<name>/loss`, `<name>/kl/<peer>`, `eval/<name>/ppl`), checkpoint and exported folder
(`student/` for the first, `<name>/` for the peers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray

from actors.specs import WorkerSpec
from orchestrator.checkpoint import tag_for
from orchestrator.faults import gather
from orchestrator.recipe import Recipe
from orchestrator.step_metrics import pool_eval
from orchestrator.students import StudentGroup, group_key, worker_spec
from orchestrator.train_loop import InFlight, Queued, TrainLoop

MAIN = "student"


def student_names(recipe: Recipe) -> list[str]:
    return [MAIN, *(p.name for p in recipe.mutual.peers)]


def signal_weights(recipe: Recipe, name: str) -> list[float]:
    """Weights of the signals `name` trains on: the teachers', then its peers' in order."""
    raw = [t.weight for t in recipe.teachers]
    raw += [recipe.mutual.peer_weight for n in student_names(recipe) if n != name]
    return [w / sum(raw) for w in raw]


class MutualLoop(TrainLoop):
    @classmethod
    def student_spec(cls, recipe: Recipe) -> WorkerSpec:
        return worker_spec(recipe, name=MAIN, target_weights=signal_weights(recipe, MAIN))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        recipe = self.recipe
        self.peers: list[StudentGroup] = []
        for peer in recipe.mutual.peers:
            spec = worker_spec(recipe, peer, peer.name, signal_weights(recipe, peer.name))
            self.peers.append(StudentGroup(recipe, peer, spec))
        for group in self.peers:  # started together, waited for together
            group.ready()
        self.groups = [self.students, *self.peers]
        self._peer_metrics: dict[int, list[list[ray.ObjectRef]]] = {}

    # -- training -------------------------------------------------------------------------

    def _train(self, item: InFlight) -> list[ray.ObjectRef]:
        """Every group scores the shards first (weights before this step), then trains."""
        scores = [group.score(item.shards) for group in self.groups]  # [group][rank]
        metrics = []
        for g, group in enumerate(self.groups):
            signals = [
                [*item.signals[r], *(scores[h][r] for h in range(len(self.groups)) if h != g)]
                for r in range(self.world)
            ]
            metrics.append(group.train_step(item.shards, signals, item.tokens))
        self._peer_metrics[item.step] = metrics[1:]
        return metrics[0]

    def _step_metrics(self, item: Queued, metrics: dict[str, float]) -> None:
        for group, refs in zip(self.peers, self._peer_metrics.pop(item.step), strict=True):
            per_rank = gather(
                refs,
                f"{group.name} train step {item.step + 1}",
                timeout_s=self.recipe.cluster.step_timeout_s,
                students=True,
            )
            peer = self._aggregate(per_rank, metrics["step_time_s"], 0)
            for key in ("loss", "ce", "kd", "kl", "student_busy_s", "student_cpu_s"):
                metrics[f"{group.name}/{key}"] = peer[key]
            for key in peer:
                if key.startswith("kl/"):
                    metrics[f"{group.name}/{key}"] = peer[key]
            metrics["actors_cpu_s"] += sum(m["student_cpu_s"] for m in per_rank)

    # -- evaluation, checkpoints, export --------------------------------------------------

    def _submit_eval(self) -> list[ray.ObjectRef]:
        h = self._heldout
        return [ref for g in self.groups for ref in g.evaluate(h.shards, h.signals)]

    def _eval_result(self, refs: list[ray.ObjectRef]) -> dict[str, float]:
        parts = self._wait(refs, "evaluation", students=True)
        out = pool_eval(parts[: self.world])
        for g, group in enumerate(self.peers, start=1):
            mine = pool_eval(parts[g * self.world : (g + 1) * self.world])
            out.update({f"{group.name}/{k}": v for k, v in mine.items()})
        return out

    def _peer_dir(self, tag: str) -> str:
        return str(self.run_dir / "checkpoints" / tag / "peers")

    def _save_after(self, step: int) -> list[ray.ObjectRef]:
        refs = super()._save_after(step)
        for group in self.peers:
            refs += group.save(self._peer_dir(tag_for(step + 1)), group.name)
        return refs

    def _started(self, start: int) -> None:
        if start:
            for group in self.peers:
                group.load_checkpoint(self._peer_dir(tag_for(start)), group.name)

    def _finish(self, tokens_total: float, elapsed: float) -> dict[str, Any]:
        summary = super()._finish(tokens_total, elapsed)
        for group, cfg in zip(self.peers, self.recipe.mutual.peers, strict=True):
            path: Path = self.run_dir / group.name
            group.export(str(path), cfg.model)
            self.tracker.log_artifact(path, group.name)
            summary[f"{group.name}_dir"] = str(path)
            summary[f"{group.name}_params"] = group.num_params
        return summary

    @classmethod
    def warm_keys(cls, recipe: Recipe) -> list[str]:
        return [*super().warm_keys(recipe), *(group_key(p) for p in recipe.mutual.peers)]

    def shutdown(self, keep: bool = False) -> None:
        for group in self.peers:
            group.shutdown(keep=keep)
