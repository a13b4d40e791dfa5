"""The student groups of a run: the driver's first group (`student`) and a mode's peers.

Every group is its own DeepSpeed group (own model, own size) and trains on the same shards
each step, with its own metrics (`<name>/loss`, `<name>/kl/<teacher>`, `eval/<name>/ppl`),
checkpoint (`checkpoints/<tag>/peers/` for the peers) and exported folder (`student/` for
the first, `<name>/` for a peer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray

from orchestrator.faults import gather
from orchestrator.parts import InFlight, TeacherPool
from orchestrator.step_metrics import pool_eval, step_metrics

PEER_KEYS = ("loss", "ce", "kd", "kl", "student_busy_s", "student_cpu_s")


class Cohort:
    def __init__(self, first: Any, peers: list[Any], step_timeout_s: float) -> None:
        self.first, self.peers = first, peers
        self.groups = [first, *peers]
        self.world = len(first)
        self.step_timeout_s = step_timeout_s

    def ranks(self) -> list[str]:
        """Every group's ranks by name, in group order (what a fault names)."""
        return [rank for group in self.groups for rank in group.ranks()]

    def train(self, item: InFlight) -> list[list[ray.ObjectRef]]:
        """Refs of per-rank metrics, [group][rank]; RL inputs go to the first group."""
        out = []
        for g, group in enumerate(self.groups):
            args = (item.shards, item.signals_of(g), item.tokens)
            out.append(
                group.train_step(*args, item.rl) if g == 0 and item.rl else group.train_step(*args)
            )
        return out

    def peer_metrics(
        self, step: int, refs: list[list[ray.ObjectRef]], pools: list[TeacherPool], wall: float
    ) -> dict[str, float]:
        """The peers' figures of a finished step, by name."""
        out: dict[str, float] = {"actors_cpu_s": 0.0}
        for group, mine in zip(self.peers, refs, strict=True):
            per_rank = gather(
                mine,
                f"{group.name} train step {step + 1}",
                timeout_s=self.step_timeout_s,
                students=True,
            )
            peer = step_metrics(per_rank, pools, wall, 0)
            for key in [*PEER_KEYS, *(k for k in peer if k.startswith("kl/"))]:
                out[f"{group.name}/{key}"] = peer[key]
            out["actors_cpu_s"] += sum(m["student_cpu_s"] for m in per_rank)
        return out

    def evaluate(self, shards: list[ray.ObjectRef], signals: list[list[ray.ObjectRef]]) -> list:
        return [ref for g in self.groups for ref in g.evaluate(shards, signals)]

    def eval_result(self, parts: list[dict[str, float]]) -> dict[str, float]:
        out = pool_eval(parts[: self.world])
        for g, group in enumerate(self.peers, start=1):
            mine = pool_eval(parts[g * self.world : (g + 1) * self.world])
            out.update({f"{group.name}/{k}": v for k, v in mine.items()})
        return out

    def save(self, folder: Path, tag: str) -> list[ray.ObjectRef]:
        """A checkpoint of every group, queued behind its current work."""
        refs = self.first.save(str(folder), tag)
        for group in self.peers:
            refs += group.save(str(folder / tag / "peers"), group.name)
        return refs

    def load_peers(self, folder: Path, tag: str) -> None:
        for group in self.peers:
            group.load_checkpoint(str(folder / tag / "peers"), group.name)

    def export_peers(self, run_dir: Path, models: list[str], tracker: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for group, model in zip(self.peers, models, strict=True):
            path = run_dir / group.name
            group.export(str(path), model)
            tracker.log_artifact(path, group.name)
            out[f"{group.name}_dir"] = str(path)
            out[f"{group.name}_params"] = group.num_params
        return out

    def shutdown_peers(self, keep: bool) -> None:
        for group in self.peers:
            group.shutdown(keep=keep)
