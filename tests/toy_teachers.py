"""Teacher actors with known delays, for the pool's routing and concurrency tests."""

from __future__ import annotations

import time

from actors.teacher import TeacherActor


class SlowFirstReplica(TeacherActor):
    """Replica 0 takes 0.4 s per shard, the others 0.05 s."""

    def score(self, batch, rows=None):
        time.sleep(0.4 if self.replica == 0 else 0.05)
        return super().score(batch, rows)


class Sleepy(TeacherActor):
    """Every shard takes at least `DELAY_S`."""

    DELAY_S = 0.6

    def score(self, batch, rows=None):
        time.sleep(self.DELAY_S)
        return super().score(batch, rows)
