"""`raydistill judge check RECIPE`: start the teachers and judges a recipe names, run the
judge check (orchestrator/judge_check.py) on its held-out prompts and print each judge's
figures; exit 2 naming the first judge below its `min_agreement`."""

from __future__ import annotations

import ray

from orchestrator.data import build_dataset
from orchestrator.judge_check import CHECKED_KINDS, refuse_below, report, run_check, writer_for
from orchestrator.judges import JudgePool
from orchestrator.ray_env import ensure_ray
from orchestrator.recipe import Recipe, RecipeError
from orchestrator.rlaif import judge_model
from orchestrator.teachers import live_pool


def check_command(recipe: Recipe) -> int:
    if not any(j.kind in CHECKED_KINDS for j in recipe.judges):
        raise RecipeError("judges", "no score, pairwise or likelihood judge to check")
    rows = recipe.model_copy(deep=True)  # only the prompts are read: no teacher writes here
    rows.data.responses = "given"
    started = ensure_ray(recipe.cluster)
    pools, judges = [], []
    try:
        pools = [live_pool(recipe, t) for t in recipe.teachers if recipe.runs_live(t)]
        hosts = {p.name: p for p in pools}
        for j in recipe.judges:
            host = hosts.get(j.teacher) if j.teacher else None
            judges.append(JudgePool(j, judge_model(recipe, j), recipe.cluster, host))
        writer, prompts = writer_for(recipe, pools), build_dataset(rows, []).heldout_prompts
        if writer is None or not prompts:
            raise RecipeError(
                "judges", "the check needs a live teacher to write answers and data with prompts"
            )
        figures = run_check(judges, writer, prompts, recipe.rollout.max_new_tokens)
        print(report(figures), flush=True)
        refuse_below(recipe, figures)
        return 0
    finally:
        for judge in judges:
            judge.shutdown()
        for pool in pools:
            pool.shutdown()
        if started:
            ray.shutdown()
