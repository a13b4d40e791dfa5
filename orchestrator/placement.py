"""Whether the Ray cluster can hold what a recipe asks for, checked before any actor starts.

Ray would otherwise queue an actor it cannot place and the run would wait forever for it.
Every actor of the run is alive at once (teachers, student ranks, rollout engines, judges),
so the sum of what they reserve (CPUs, GPUs, custom resources such as `teacher_node`) must
fit the cluster's totals, each actor must fit on some single node, and a `strict_pack`
student group on one node.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import ray

from orchestrator.actor_env import demand
from orchestrator.checkpoint import write_json
from orchestrator.config_base import Placed
from orchestrator.faults import RuntimeFault, gather
from orchestrator.recipe import Recipe, RecipeError


def requested(recipe: Recipe) -> list[tuple[str, int, Placed]]:
    """(recipe field, how many, placement) for every kind of actor the run starts."""
    out: list[tuple[str, int, Placed]] = []
    for i, t in enumerate(recipe.teachers):
        if recipe.from_cache(t):  # one reader actor, no model
            reader = t.model_copy(update={"num_cpus": min(t.num_cpus, 0.25), "num_gpus": 0.0})
            out.append((f"teachers.{i}", 1, reader))
        if recipe.runs_live(t):
            out.append((f"teachers.{i}", t.replicas, t))
    out.append(("student", recipe.student.world_size, recipe.student))
    mode = recipe.distill.mode
    if mode == "mutual":
        out += [(f"mutual.peers.{i}", p.world_size, p) for i, p in enumerate(recipe.mutual.peers)]
    if recipe.rolls_out:
        out.append(("rollout", recipe.rollout.replicas, recipe.rollout))
    if mode == "rlaif":
        out += [
            (f"judges.{i}", j.replicas, j) for i, j in enumerate(recipe.judges) if not j.teacher
        ]
    return out


_UNITS = {"CPU": "CPUs", "GPU": "GPUs"}


def _field(what: str, key: str) -> str:
    name = {"CPU": "num_cpus", "GPU": "num_gpus"}.get(key, f"resources.{key}")
    return f"{what}.{name}"


def check_resources(recipe: Recipe) -> None:
    """One line saying what is missing, or nothing."""
    total = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    asks = [(what, n, demand(cfg)) for what, n, cfg in requested(recipe)]
    for key in sorted({k for _, _, d in asks for k in d}):
        want = sum(n * d.get(key, 0.0) for _, n, d in asks)
        have = float(total.get(key, 0.0))
        if want > have + 1e-9:
            parts = ", ".join(f"{what} {n} x {d[key]:g}" for what, n, d in asks if key in d)
            raise RecipeError(
                "cluster",
                f"the run needs {want:g} {_UNITS.get(key, key)} at once ({parts}) but the Ray "
                f"cluster has {have:g}",
            )
    for what, _, d in asks:
        if nodes and not any(_fits(d, node) for node in nodes):
            key = next(k for k, v in d.items() if not any(n.get(k, 0.0) >= v for n in nodes))
            raise RecipeError(
                _field(what, key),
                f"one actor needs {_describe(d)}; no node of the cluster has {d[key]:g} {key}",
            )
    for what, n, cfg in requested(recipe):
        if getattr(cfg, "placement", None) != "strict_pack":  # student groups only
            continue
        whole = {k: n * v for k, v in demand(cfg).items()}
        if nodes and not any(_fits(whole, node) for node in nodes):
            raise RecipeError(
                f"{what}.placement",
                f"strict_pack puts all {n} ranks ({_describe(whole)}) on one node; none has that",
            )


def _fits(d: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) >= v - 1e-9 for k, v in d.items())


def _describe(d: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in d.items())


@ray.remote(num_cpus=0)
def _sees(path: str) -> bool:
    import os

    return os.path.exists(path)


def check_reachable(run_dir: Path, timeout_s: float = 60.0) -> None:
    """Every student rank writes its part of each checkpoint into the run directory, and any
    node may host a rank after a restore: the directory must be visible from every node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    marker = str(run_dir / "recipe.yaml")
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.get_runtime_context().get_node_id()
    if [n["NodeID"] for n in nodes] == [here]:  # one node, the driver's: it wrote the dir
        return
    refs = [
        _sees.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(marker)
        for n in nodes
    ]
    seen = ray.get(refs, timeout=timeout_s)
    for node, ok in zip(nodes, seen, strict=True):
        if not ok:
            raise RecipeError(
                "run.output_dir",
                f"{run_dir} is not visible from node {node['NodeManagerAddress']} "
                f"({node['NodeID'][:12]}): put it on storage every node mounts",
            )


def record(run_dir: Path, pools: list[Any], students: Any) -> dict[str, list[dict]]:
    """Write `placement.json`: the node of every teacher replica and student rank, and the
    model folder each loaded there."""
    what = {f"teacher {p.name}": p.replicas for p in pools}
    what[f"student {students.name}"] = students.workers
    bound = students.wait["timeout_s"]
    where = {k: _nodes(v, f"{k} node", bound) for k, v in what.items()}
    write_json(run_dir / "placement.json", where)
    return where


def _nodes(actors: list[Any], what: str, timeout_s: float) -> list[dict]:
    """Each actor's `node()`. A replica Ray is still restarting (its node was lost) answers
    "unavailable" until it is up again somewhere else: asked again, within the bound."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = max(1.0, deadline - time.monotonic())
        try:
            return gather([a.node.remote() for a in actors], what, timeout_s=left)
        except RuntimeFault as fault:
            restarting = isinstance(fault.__cause__, ray.exceptions.ActorUnavailableError)
            if not restarting or time.monotonic() > deadline:
                raise
        time.sleep(1.0)
