"""Actors kept warm between the runs of one driver process (the stages of a staged recipe, a
notebook, a test session).

Starting an actor costs its process 6-7 s of CPU (torch, transformers and DeepSpeed imports)
plus its model load, often more than the run itself. A run that ends cleanly parks its
teacher replicas, cache readers, student groups, rollout engines and judges here, and the
next run in the same Ray cluster takes those whose key matches exactly: a service actor's
class, Ray options, arguments and model or cache files (a folder rewritten in place does
not match); a student group's size, placement and options (its ranks are set up again from
the new run's spec). What a run will not take is killed before it places its own actors,
so parked actors never hold resources a run needs. A run that failed, a replica that Ray or
the driver restarted (its restart budget is partly spent) and a driver that started Ray
itself (Ray ends with it) park nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

PING_S = 2.0  # an idle actor answers a no-op at once: one that does not is killed


@dataclass
class _Parked:
    value: Any  # what the owner gets back (a handle, or a group's (pg, workers))
    actors: list[Any]  # the handles to ping before it is handed out
    kill: Callable[[], None]


_parked: dict[str, list[_Parked]] = {}
_cluster: str | None = None  # the Ray node the parked actors belong to


def key(*parts: Any) -> str:
    """What must be equal for a parked actor to serve again (JSON: options and arguments)."""
    return json.dumps(parts, sort_keys=True, default=repr)


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
    """A parked value with key `k` whose actors all answer, or None."""
    if not _same_cluster():
        return None
    while _parked.get(k):
        entry = _parked[k].pop()
        try:
            ray.get([a.__ray_ready__.remote() for a in entry.actors], timeout=PING_S)
            return entry.value
        except Exception:
            _kill(entry)
    return None


def park(k: str, value: Any, actors: list[Any], kill: Callable[[], None]) -> None:
    """Keep `value` for the next run in this Ray that asks for `k`."""
    if _same_cluster():
        _parked.setdefault(k, []).append(_Parked(value, actors, kill))
    else:
        kill()


def parked() -> bool:
    """Whether anything is parked in this Ray (a run's keys are worked out only then)."""
    return _same_cluster() and any(_parked.values())


def park_or_kill(k: str, actor: Any, keep: bool) -> None:
    """A service actor (teacher replica, rollout engine, judge) at the end of a run: parked
    when `keep` and its `park()` says it may serve again (it answered, reset its per-run
    counts and was never restarted: a restart spends part of its budget); else killed."""
    try:
        keep = keep and bool(ray.get(actor.park.remote(), timeout=PING_S))
    except Exception:
        keep = False
    if keep:
        park(k, actor, [actor], lambda: ray.kill(actor))
    else:
        ray.kill(actor)


def release(keep: set[str] | frozenset[str] = frozenset()) -> None:
    """Kill whatever is parked under a key not in `keep` (a run, before it places its own
    actors, keeps what it will take)."""
    entries = [e for k, group in _parked.items() if k not in keep for e in group]
    for k in [k for k in _parked if k not in keep]:
        del _parked[k]
    for entry in entries:
        _kill(entry)


def _kill(entry: _Parked) -> None:
    try:
        entry.kill()
    except Exception:  # its Ray is gone, or it died already
        pass
