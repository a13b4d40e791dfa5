"""Which stage a run waits on, and letting the teachers yield shared cores to the ranks.

When the student ranks never wait for a teacher's signal, the ranks are the critical path
and the teachers only work ahead (`distill.prefetch_depth`). On a node they share, a rank
slowed by a teacher then makes its peer wait at the all-reduce while the teacher's window
is full and nothing else can run: cores idle. Given a lower priority (a higher nice value),
the teachers take what the ranks leave. A priority can be lowered but not raised back
without privilege, so it is decided once per run, after its first steps. Those first steps
do not count: the first starts everything up, and the next `prefetch_depth` take signals
the teachers wrote while the ranks started, so even teachers slower than the ranks look
idle there. The rule watches the steps after that window has drained.
"""

from __future__ import annotations

import statistics
from typing import Any

import ray

WATCHED_STEPS = 4  # steps looked at, after the start-up step and the prefetch window
WAIT_SHARE = 0.05  # the ranks waiting this share of the steps or less: they are the critical path


class TeacherPriority:
    def __init__(self, pools: list[Any], nice: int, prefetch_depth: int) -> None:
        self.pools, self.target = pools, nice
        self.skip = 1 + prefetch_depth  # start-up, then the signals written meanwhile
        self.nice = 0  # what the teachers' processes report, once they have
        self._shares: list[float] = []
        self._asked: list[ray.ObjectRef] = []

    def observe(self, metrics: dict[str, float]) -> None:
        """Add `teacher_nice` to a finished step's metrics; decide after the watched steps."""
        if self.target and self.pools and len(self._shares) < self.skip + WATCHED_STEPS:
            self._shares.append(metrics["signal_wait_s"] / max(metrics["step_time_s"], 1e-9))
            if len(self._shares) == self.skip + WATCHED_STEPS and self.waited() <= WAIT_SHARE:
                self._asked = [
                    actor.yield_cpu.remote(self.target)
                    for pool in self.pools
                    for actor in pool.actors().values()
                ]
        if self._asked and not ray.wait(self._asked, num_returns=len(self._asked), timeout=0)[1]:
            self.nice = min(ray.get(self._asked))  # queued behind scoring: a step or two
            self._asked = []
        metrics["teacher_nice"] = float(self.nice)

    def waited(self) -> float:
        """The share of the watched steps the ranks spent waiting for signals: a mean, since
        on-policy steps can alternate between waiting and not."""
        return statistics.mean(self._shares[self.skip :])
