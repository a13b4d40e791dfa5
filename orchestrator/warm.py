"""Actors kept warm between the runs of one driver process (the stages of a staged recipe, a
notebook, a test session).

Starting an actor costs its process 6-7 s of CPU (torch, transformers and DeepSpeed imports)
plus its model load, often more than the run itself. A run that ends cleanly parks its
teacher replicas, cache readers, student groups, rollout engines and judges here, and a
later run in the same Ray cluster takes those whose key matches exactly: a service actor's
class, Ray options, arguments and model files (a folder rewritten in place does not match);
a student group's size, placement and options (its ranks are set up again from the new
run's spec). Parked actors hold at most SHARE of the cluster's resources, and before a run
places its own, the oldest it will not take are killed until what it needs is free. A run
that failed, a replica that Ray or the driver restarted (its restart budget is partly
spent) and a driver that started Ray itself (Ray ends with it) park nothing.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

PING_S = 2.0  # an idle actor answers a no-op at once: one that does not is killed
SHARE = 0.5  # parked actors hold at most this share of each of the cluster's resources
MAX_PARKED = 8  # entries (an actor, or a student group)


@dataclass
class _Parked:
    key: str
    value: Any  # what the owner gets back (a handle, or a group's (pg, workers))
    actors: list[Any]  # the handles to ping before it is handed out
    kill: Callable[[], None]
    footprint: dict[str, float]  # what it holds of the cluster


_parked: list[_Parked] = []  # oldest first
_cluster: str | None = None  # the Ray node the parked actors belong to


def key(*parts: Any) -> str:
    """What must be equal for a parked actor to serve again (JSON: options and arguments)."""
    return json.dumps(parts, sort_keys=True, default=repr)


def footprint(options: dict[str, Any], n: int = 1) -> dict[str, float]:
    """What `n` actors started with these Ray options hold of the cluster."""
    out = {"CPU": float(options.get("num_cpus") or 0.0) * n}
    if options.get("num_gpus"):
        out["GPU"] = float(options["num_gpus"]) * n
    for name, amount in (options.get("resources") or {}).items():
        out[name] = out.get(name, 0.0) + float(amount) * n
    return out


def folder_stamp(path: str | None) -> list[list[Any]]:
    """Name, size and mtime of each file of a model folder: a model rewritten in place
    (retrained, another checkpoint) does not reuse a replica that loaded the old one."""
    root = Path(path or "")
    if not path or not root.is_dir():
        return []  # no model (a function judge), or a hub or registry name: the name is it
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return [[str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _here() -> str | None:
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _same_cluster() -> bool:
    """Parked handles belong to one Ray: after a new `ray.init` they are forgotten."""
    global _cluster
    here = _here()
    if here != _cluster:
        _parked.clear()
        _cluster = here
    return here is not None


def take(k: str) -> Any | None:
    """The newest parked value with key `k` whose actors all answer, or None."""
    while _same_cluster():
        entry = next((e for e in reversed(_parked) if e.key == k), None)
        if entry is None:
            return None
        _parked.remove(entry)
        try:
            ray.get([a.__ray_ready__.remote() for a in entry.actors], timeout=PING_S)
            return entry.value
        except Exception:
            _kill(entry)
    return None


def park(
    k: str, value: Any, actors: list[Any], kill: Callable[[], None], holds: dict[str, float]
) -> None:
    """Keep `value` for a later run in this Ray that asks for `k`; the oldest parked ones
    go when more than MAX_PARKED, or more than SHARE of a resource, would be held."""
    if not _same_cluster():
        kill()
        return
    _parked.append(_Parked(k, value, actors, kill, holds))
    total = ray.cluster_resources()
    while len(_parked) > MAX_PARKED or any(
        held > SHARE * float(total.get(r, 0.0)) + 1e-9 for r, held in _held(_parked).items()
    ):
        _kill(_parked.pop(0))


def parked() -> bool:
    """Whether anything is parked in this Ray (a run's keys are worked out only then)."""
    return _same_cluster() and bool(_parked)


def park_or_kill(k: str, actor: Any, keep: bool, options: dict[str, Any]) -> None:
    """A service actor (teacher replica, rollout engine, judge) at the end of a run: parked
    when `keep` and its `park()` says it may serve again (it answered, reset its per-run
    counts and was never restarted: a restart spends part of its budget); else killed."""
    try:
        keep = keep and bool(ray.get(actor.park.remote(), timeout=PING_S))
    except Exception:
        keep = False
    if keep:
        park(k, actor, [actor], lambda: ray.kill(actor), footprint(options))
    else:
        ray.kill(actor)


def release(keep: Iterable[str] = (), need: dict[str, float] | None = None) -> int:
    """Before a run places its actors: keep the parked ones it will take (`keep`, one key
    per actor or group); kill the others, oldest first, until what is free covers `need`
    (all of them when `need` is None). How many were killed."""
    wanted = Counter(keep)
    kept, others = [], []
    for entry in reversed(_parked):  # the newest of a key are the ones taken
        if wanted[entry.key] > 0:
            wanted[entry.key] -= 1
            kept.append(entry)
        else:
            others.append(entry)
    others.reverse()  # oldest first
    free: dict[str, float] = {}
    if need is not None:
        free = dict(ray.available_resources())
        for r, amount in _held(kept).items():
            free[r] = free.get(r, 0.0) + amount
    killed = 0
    for entry in others:
        if need is not None and all(free.get(r, 0.0) + 1e-9 >= n for r, n in need.items()):
            break
        _parked.remove(entry)
        _kill(entry)
        killed += 1
        for r, amount in entry.footprint.items():
            free[r] = free.get(r, 0.0) + amount
    return killed


def _held(entries: list[_Parked]) -> dict[str, float]:
    out: dict[str, float] = {}
    for entry in entries:
        for r, amount in entry.footprint.items():
            out[r] = out.get(r, 0.0) + amount
    return out


def _kill(entry: _Parked) -> None:
    try:
        entry.kill()
    except Exception:  # its Ray is gone, or it died already
        pass
