"""Least-outstanding routing over the replicas of a pool (teachers, judges, rollout engines).

A request goes to the replica with the fewest requests still running, ties to the one that
has served fewest. Unlike round-robin, a slow or busy replica (a longer shard, a noisy
neighbour, a replica on a slower node) is sent less, and the others take up the slack.
"""

from __future__ import annotations

import ray


class LeastOutstanding:
    def __init__(self, replicas: int) -> None:
        self.outstanding: list[list[ray.ObjectRef]] = [[] for _ in range(replicas)]
        self.served = [0] * replicas

    def pick(self, avoid: int | None = None) -> int:
        """The replica for the next request (not `avoid` when there is another)."""
        depth = self.depths()
        order = sorted(range(len(depth)), key=lambda i: (depth[i], self.served[i], i))
        return next((i for i in order if i != avoid), order[0])

    def track(self, replica: int, ref: ray.ObjectRef) -> None:
        self.outstanding[replica].append(ref)
        self.served[replica] += 1

    def done(self, replica: int, ref: ray.ObjectRef) -> None:
        """A request the caller has finished with (collected, or given up on)."""
        if ref in self.outstanding[replica]:
            self.outstanding[replica].remove(ref)

    def reset(self, replica: int) -> None:
        self.outstanding[replica] = []

    def depths(self) -> list[int]:
        """Requests still running per replica (finished ones are dropped first; nothing is
        fetched or waited for)."""
        refs = [r for rs in self.outstanding for r in rs]
        if refs:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
            finished = set(ready)
            self.outstanding = [[r for r in rs if r not in finished] for rs in self.outstanding]
        return [len(rs) for rs in self.outstanding]
