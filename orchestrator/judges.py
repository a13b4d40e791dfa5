"""JudgePool: the replicas of one judge, with bounded waits, one retry and counted drops.

A call goes to the replica with the fewest outstanding calls. The driver never waits on a
judge without a bound: a call that raises, runs past `timeout_s` or returns something
unusable is sent once more to another replica (never behind the call that hung: a hung
replica is restarted), and if that fails too its samples are dropped (None) and counted.
A replica is restarted at most `cluster.max_restarts` times, whether it died or hung; past
that it is stopped for good and its calls fail at once (dropped, counted): a judge costs
samples, never the run, and never an unbounded wait.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from actors.judge import JUDGE_GROUP, JudgeActor, judge_kwargs
from orchestrator import warm
from orchestrator.actor_env import service_options
from orchestrator.balance import LeastOutstanding
from orchestrator.faults import probe
from orchestrator.recipe import ClusterConfig
from orchestrator.rlaif_config import JudgeConfig


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
    def __init__(
        self,
        cfg: JudgeConfig,
        model: str | None,
        cluster: ClusterConfig | None = None,
        host: Any = None,
    ) -> None:
        """`host`: the live pool of the teacher whose replicas serve this judge (their own
        weights, `judges[i].teacher`); the judge then starts no actor of its own, and its
        restarts are the teacher's (one count per actor, whichever role found it hung)."""
        self.cfg, self.host = cfg, host
        self.max_restarts = (cluster or ClusterConfig()).max_restarts
        self.restarts: dict[str, int] = {}  # by replica name: hung ones the pool restarted
        if host is not None:
            self.replicas, self.restarts, self.key = host.replicas, host.restarts, ""
        else:
            options, args = _replica(cfg, model, self.max_restarts)
            self.key = judge_key(cfg, model, cluster)
            remote = ray.remote(JudgeActor).options(**options)
            self.replicas = [
                warm.take(self.key) or remote.remote(**args) for _ in range(cfg.replicas)
            ]
        self.balance = LeastOutstanding(len(self.replicas))

    @property
    def name(self) -> str:
        return self.cfg.name

    def submit(self, method: str, *args: Any, avoid: int | None = None) -> Call:
        """Send `method(*args)` to the least-loaded replica (other than `avoid`)."""
        pick = self.balance.pick(avoid)
        replica = self.replicas[pick]
        if self.host is not None:  # beside the replica's scoring, not queued behind it
            ref = replica.judge.options(concurrency_group=JUDGE_GROUP).remote(
                self.name, method, *args
            )
        else:
            ref = getattr(replica, method).remote(*args)
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
            if error == "timeout" and self._restart(call.replica):  # never queued behind
                name = self.replica_name(call.replica)
                print(
                    f"{name} did not answer judge {self.name}'s call within "
                    f"{self.cfg.timeout_s:g}s: restarted it ({self.restarts[name]}/"
                    f"{self.max_restarts}), its calls run again",
                    flush=True,
                )
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

    def replica_name(self, i: int) -> str:
        if self.host is not None:
            return self.host.replica_name(i)
        return f"judge {self.name} replica {i}"

    def actors(self) -> dict[str, Any]:
        """The replicas by name (what a fault names)."""
        return {self.replica_name(i): r for i, r in enumerate(self.replicas)}

    def restart_unresponsive(self, timeout_s: float) -> list[str]:
        """Restart the replicas that do not answer within `timeout_s`; the names of those
        restarted (not of those past their restarts, stopped for good)."""
        if self.host is not None:
            return []  # the teacher's pool probes and restarts its replicas
        silent = probe(self.actors(), timeout_s)
        names = list(self.actors())
        return [name for name in silent if self._restart(names.index(name))]

    def _restart(self, i: int) -> bool:
        """Kill replica i and let Ray start it again (one restart of its budget, which Ray
        also spends on crashes); past `max_restarts` stop it for good. True if restarted."""
        name = self.replica_name(i)
        done = self.restarts.get(name, 0)
        self.balance.reset(i)
        if done > self.max_restarts:  # stopped already
            return False
        if self.host is not None and done >= self.max_restarts:
            return False  # a teacher's replica is never stopped by its judge role
        self.restarts[name] = done + 1
        if done == self.max_restarts:
            ray.kill(self.replicas[i], no_restart=True)
            print(
                f"{name} hung again after {done} restarts (cluster.max_restarts): stopped, "
                "its judgments are dropped and counted",
                flush=True,
            )
            return False
        ray.kill(self.replicas[i], no_restart=False)
        return True

    def shutdown(self, keep: bool = False) -> None:
        """Kill the replicas, or with `keep` park them for the next run in this Ray
        (orchestrator/warm.py), unless the pool restarted one."""
        if self.host is not None:
            return  # the teacher's replicas: its pool stops or parks them
        for actor in self.replicas:
            warm.park_or_kill(self.key, actor, keep and not self.restarts)


def _replica(
    cfg: JudgeConfig, model: str | None, max_restarts: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Ray options, arguments) of each replica. A dead replica comes back (as often as a
    hung one may); the pool itself re-issues a call that failed or timed out."""
    options = {**service_options(cfg, max_restarts), "max_task_retries": 0}
    if cfg.function:  # the function's module imports in the actor as on the driver
        paths = [p for p in sys.path if p and os.path.isdir(p)]
        options["runtime_env"]["env_vars"]["PYTHONPATH"] = os.pathsep.join(paths)
    args = {
        "name": cfg.name,
        "model": model,
        **judge_kwargs(cfg.kind, cfg.rubric, cfg.rating_tokens, cfg.min_mass),
        "threads": cfg.threads,
        "function": cfg.function,
        "backend": cfg.backend,
    }
    return options, args


def judge_key(cfg: JudgeConfig, model: str | None, cluster: ClusterConfig | None = None) -> str:
    """The warm key of a judge's replicas (all alike), with its model's files."""
    options, args = _replica(cfg, model, (cluster or ClusterConfig()).max_restarts)
    return warm.key(JudgeActor, options, args, warm.folder_stamp(model))


def _usable(value: Any) -> Any:
    """A judgment is a finite number, a rewrite (critique: a non-empty string), or a tuple
    of numbers and Nones (a rating with its mass, a preference in each order); anything
    else is unusable (None)."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, tuple | list):
        parts = tuple(None if v is None else _usable(v) for v in value)
        ok = all(p is None or isinstance(p, float) for p in parts) and any(parts)
        return parts if ok else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)
