"""JudgePool: the replicas of one judge, with bounded waits, one retry and counted drops.

A call goes to the replica with the fewest outstanding calls. The driver never waits on a
judge without a bound: a call that raises, runs past `timeout_s` or returns something
unusable is sent once more to another replica (never behind the call that hung: a hung
replica is replaced by a fresh actor), and if that fails too its samples are dropped (None)
and counted.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from actors.judge import JudgeActor
from orchestrator.balance import LeastOutstanding
from orchestrator.ray_env import service_options
from orchestrator.recipe import JudgeConfig


@dataclass
class Call:
    method: str
    args: tuple[Any, ...]
    size: int  # judgments asked for
    replica: int
    ref: ray.ObjectRef
    start: float
    tries: int = 1
    depth: int = 0  # outstanding calls on the pool when this one was sent


@dataclass
class Outcome:
    values: list[float | None]
    latency_s: float
    depth: int
    dropped: int
    retried: int
    errors: list[str] = field(default_factory=list)


class JudgePool:
    def __init__(self, cfg: JudgeConfig, model: str | None) -> None:
        self.cfg = cfg
        # a dead replica comes back; the pool itself re-issues a call that failed or timed out
        options = {**service_options(cfg, -1), "max_task_retries": 0}
        if cfg.function:  # the function's module imports in the actor as on the driver
            paths = [p for p in sys.path if p and os.path.isdir(p)]
            options["runtime_env"]["env_vars"]["PYTHONPATH"] = os.pathsep.join(paths)
        self._remote = ray.remote(JudgeActor).options(**options)
        self._model = model
        self.replicas = [self._start() for _ in range(cfg.replicas)]
        self.balance = LeastOutstanding(cfg.replicas)

    def _start(self) -> Any:
        c = self.cfg
        rubric = {f"{c.kind}_rubric" if c.kind != "score" else "rubric": c.rubric}
        return self._remote.remote(
            c.name,
            self._model,
            **rubric,
            rating_tokens=list(c.rating_tokens),
            min_mass=c.min_mass,
            threads=c.threads,
            function=c.function,
        )

    @property
    def name(self) -> str:
        return self.cfg.name

    def submit(self, method: str, *args: Any, avoid: int | None = None) -> Call:
        """Send `method(*args)` to the least-loaded replica (other than `avoid`)."""
        pick = self.balance.pick(avoid)
        ref = getattr(self.replicas[pick], method).remote(*args)
        self.balance.track(pick, ref)
        depth = sum(len(rs) for rs in self.balance.outstanding)
        return Call(method, args, len(args[0]), pick, ref, time.perf_counter(), depth=depth)

    def collect(self, call: Call) -> Outcome:
        """The call's judgments: None where a judgment was unusable or the call failed
        twice. Never waits longer than twice `timeout_s`."""
        errors: list[str] = []
        retried = 0
        while True:
            values, error = self._wait(call)
            if error is None:
                break
            errors.append(error)
            if call.tries >= 2:
                values = [None] * call.size
                break
            retried += 1
            if error == "timeout":
                self._restart(call.replica)  # a hung replica is replaced, not queued behind
            retry = self.submit(call.method, *call.args, avoid=call.replica)
            retry.tries = call.tries + 1
            retry.start, retry.depth = call.start, call.depth
            call = retry
        dropped = sum(v is None for v in values)
        latency = time.perf_counter() - call.start
        return Outcome(values, latency, call.depth, dropped, retried, errors)

    def _wait(self, call: Call) -> tuple[list[float | None], str | None]:
        ready, _ = ray.wait([call.ref], timeout=self.cfg.timeout_s)
        self.balance.done(call.replica, call.ref)
        if not ready:
            ray.cancel(call.ref, force=False)
            return [], "timeout"
        try:
            values = ray.get(call.ref)
        except Exception as exc:  # the judge raised or died: retried, then dropped
            return [], f"{type(exc).__name__}"
        if not isinstance(values, list) or len(values) != call.size:
            return [], "malformed"
        return [_usable(v) for v in values], None

    def _restart(self, i: int) -> None:
        ray.kill(self.replicas[i], no_restart=True)
        self.replicas[i] = self._start()
        self.balance.reset(i)

    def shutdown(self) -> None:
        for actor in self.replicas:
            ray.kill(actor)


def _usable(value: Any) -> float | None:
    """A judgment is a finite number; anything else is unusable."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)
