"""Whether the Ray cluster can hold what a recipe asks for, checked before any actor starts.

Ray would otherwise queue an actor it cannot place and the run would wait forever for it.
Every actor of the run is alive at once (teachers, student ranks, rollout engines, judges),
so the sum of their CPUs and GPUs must fit the cluster's totals, and each actor must fit on
some single node.
"""

from __future__ import annotations

import ray

from orchestrator.recipe import Recipe, RecipeError


def requested(recipe: Recipe) -> list[tuple[str, int, float, float]]:
    """(what, how many, CPUs each, GPUs each) for every kind of actor the run starts."""
    out = [
        (f"teachers.{i}", t.replicas, t.num_cpus, t.num_gpus) for i, t in enumerate(recipe.teachers)
    ]
    s = recipe.student
    out.append(("student", s.world_size, s.num_cpus, s.num_gpus))
    mode = recipe.distill.mode
    if mode == "mutual":
        out += [
            (f"mutual.peers.{i}", p.world_size, p.num_cpus, p.num_gpus)
            for i, p in enumerate(recipe.mutual.peers)
        ]
    if mode in ("on_policy", "rlaif"):
        r = recipe.rollout
        out.append(("rollout", r.replicas, r.num_cpus, r.num_gpus))
    if mode == "rlaif":
        out += [
            (f"judges.{i}", j.replicas, j.num_cpus, j.num_gpus) for i, j in enumerate(recipe.judges)
        ]
    return out


def check_resources(recipe: Recipe) -> None:
    """One line saying what is missing, or nothing."""
    total = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    asks = requested(recipe)
    for kind in ("CPU", "GPU"):
        want = sum(n * (c if kind == "CPU" else g) for _, n, c, g in asks)
        have = float(total.get(kind, 0.0))
        if want > have + 1e-9:
            parts = ", ".join(
                f"{what} {n} x {c if kind == 'CPU' else g:g}"
                for what, n, c, g in asks
                if (c if kind == "CPU" else g) > 0
            )
            raise RecipeError(
                "cluster",
                f"the run needs {want:g} {kind}s at once ({parts}) but the Ray cluster has "
                f"{have:g}",
            )
    for what, _, cpus, gpus in asks:
        if nodes and not any(
            n.get("CPU", 0.0) >= cpus and n.get("GPU", 0.0) >= gpus for n in nodes
        ):
            raise RecipeError(
                f"{what}.num_cpus",
                f"one actor needs {cpus:g} CPUs and {gpus:g} GPUs; no node of the cluster has them",
            )
