"""Teachers as feedback: every teacher scores every shard of a step (logit targets).

All teachers are sent their work at once and run concurrently, `distill.prefetch_depth`
steps ahead of the students. A teacher is live replicas or a cache reader; both are the
same `TeacherPool` to this part.
"""

from __future__ import annotations

import numpy as np
import ray

from orchestrator.parts import InFlight, Part, TeacherPool


def signals_for(
    pools: list[TeacherPool],
    shards: list[ray.ObjectRef],
    routes: np.ndarray | None = None,
    examples: np.ndarray | None = None,
) -> list[list[ray.ObjectRef]]:
    """[rank][teacher] signal refs. With `routes` (each row's teacher,
    `distill.teacher_key`), a teacher scores only the rows routed to it. `examples`: each
    row's cache row (what a cached teacher reads; live ones ignore it)."""
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
            for i, pool in enumerate(pools)
        ]
        for shard, r, ex in zip(shards, routed, rows, strict=True)
    ]


class TeacherTargets(Part):
    def __init__(self, pools: list[TeacherPool]) -> None:
        self.pools = pools
        self.services = tuple(pools)

    def issued(self, item: InFlight) -> None:
        item.signals = signals_for(self.pools, item.shards, item.routes, item.rows)
