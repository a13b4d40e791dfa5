"""Staged recipes: `stages` (e.g. expand -> label -> train offline KD -> train on-policy)
run in order inside one run directory, under one MLflow parent run with a nested run per
stage.

An elicitation stage (`orchestrator/elicit.py`) writes `stages/<name>/data.parquet`, which
the following stages read. A train stage is an ordinary run (its run directory is
`stages/<name>`, checkpoints and all) of the recipe with the stage's `overrides`, on the
current data, starting from the student the previous train stage exported; the optimizer
and schedule start afresh. An offline train stage builds its teacher cache first, in its own
folder. `stages.json` records each finished stage's outputs, so `raydistill resume` skips
them and continues inside the stage that stopped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import ray

from orchestrator.checkpoint import write_json
from orchestrator.faults import finish_tracking
from orchestrator.parts import RunResult
from orchestrator.recipe import Recipe, apply_overrides, to_yaml
from orchestrator.stage_config import StageConfig


def stage_recipe(recipe: Recipe, stage: StageConfig, data: str | None, student: dict) -> Recipe:
    """The recipe a train stage runs: the staged recipe, its overrides, the current data
    and the student carried over (or the recipe's own, the carried one teaching)."""
    raw = recipe.model_dump(mode="json", by_alias=True, exclude={"stages"})
    raw = apply_overrides(raw, [f"{k}={json.dumps(v)}" for k, v in stage.overrides.items()])
    if data is not None and data != recipe.data.path:  # written by an earlier stage
        raw["data"].update(source="file", path=data)
        if _has_responses(data):
            raw["data"]["responses"] = "given"
    for t in raw["teachers"]:
        if t["name"] == stage.previous_teaches:  # the assistant of a chain
            t["model"] = student["model"]
    if stage.starts_from == "previous":
        raw["student"].update(student)
    raw["run"]["name"] = stage.name
    train = [s for s in recipe.stages if s.kind == "train"]
    if stage is not train[-1]:  # only the final student is registered
        raw["run"]["register_as"] = None
    return Recipe.model_validate(raw)


def carried_student(folder: Path) -> dict[str, Any]:
    """The `student` fields of the stages after a train stage: the student it exported,
    whole (it is cut already: neither `layers` nor `init` applies to it again)."""
    return {"model": str(folder), "layers": None, "init": None}


def _has_responses(path: str) -> bool:
    import pyarrow.parquet as pq

    return Path(path).suffix == ".parquet" and "response" in pq.read_schema(path).names


class Execute(Protocol):
    """`driver.execute`: runs one train stage's recipe in its folder."""

    def __call__(
        self, recipe: Recipe, run_dir: Path, *, stop_after: int | None, parent: str
    ) -> RunResult: ...


def run_stages(
    recipe: Recipe,
    run_dir: Path,
    stop_after: int | None,
    execute: Execute,
    build_cache: Callable[[Recipe], object],
) -> RunResult:
    """Run the stages in order, each finished stage recorded in stages.json so a resume
    skips it. `execute` (the driver's) and `build_cache` (`offline.build_command`) are
    passed in by the caller, so stages sit below the driver in the import graph."""
    from orchestrator.ray_env import ensure_ray
    from orchestrator.run_tracker import open_tracker

    state_path = run_dir / "stages.json"
    state: dict[str, Any] = json.loads(state_path.read_text()) if state_path.exists() else {}
    done: dict[str, dict] = state.setdefault("done", {})
    started = ensure_ray(recipe.cluster)
    parent = open_tracker(recipe, run_dir)
    status = "FAILED"
    data, student = recipe.data.path, {"model": recipe.student.model}
    summaries: dict[str, Any] = {}
    try:
        if not done:
            from orchestrator.tracking import flatten

            parent.log_params(flatten(recipe.model_dump(mode="json", by_alias=True)))
            parent.log_artifact(run_dir / "recipe.yaml")
        for stage in recipe.stages:
            if stage.name in done:  # finished before a stop: its outputs carry on
                data, student = done[stage.name]["data"], done[stage.name]["student"]
                summaries[stage.name] = done[stage.name]["summary"]
                continue
            stage_dir = run_dir / "stages" / stage.name
            print(f"stage {stage.name} ({stage.kind})", flush=True)
            if stage.kind == "train":
                sub = _prepared(stage_recipe(recipe, stage, data, student), stage_dir, build_cache)
                result = execute(sub, stage_dir, stop_after=stop_after, parent=parent.run_id)
                if not result.finished:
                    status = "KILLED"
                    return RunResult(run_dir, result.steps_done, False, {"stages": summaries})
                student = carried_student(stage_dir / "student")
                summary = {k: result.summary[k] for k in ("eval_before", "eval_after")}
            else:
                data, summary = _elicit(recipe, stage, data or "", stage_dir, parent.run_id)
            summaries[stage.name] = summary
            done[stage.name] = {"data": data, "student": student, "summary": summary}
            write_json(state_path, {**state, "done": done})
        write_json(run_dir / "summary.json", {"stages": summaries})
        parent.log_artifact(run_dir / "summary.json")
        status = "FINISHED"
        return RunResult(run_dir, recipe.train.steps, True, {"stages": summaries})
    finally:
        if started:
            ray.shutdown()
        finish_tracking(parent, status)


def _prepared(sub: Recipe, stage_dir: Path, build_cache: Callable[[Recipe], object]) -> Recipe:
    """A train stage's recipe checked, with its folder, and its cache built if it reads one
    (an offline stage: its own cache of its own data)."""
    from orchestrator.cached_teachers import cached_teachers
    from orchestrator.preflight import preflight

    sub = preflight(sub)
    for t in cached_teachers(sub):
        t.source.path = t.source.path or str(stage_dir / "signal_cache" / t.name)
    if not (stage_dir / "recipe.yaml").exists():
        (stage_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (stage_dir / "recipe.yaml").write_text(to_yaml(sub))
    if cached_teachers(sub) and not _built(sub):
        build_cache(sub)
    return sub


def _built(recipe: Recipe) -> bool:
    from orchestrator.cached_teachers import cache_path, cached_teachers

    return all(
        (cache_path(recipe, t) / "manifest.json").is_file()
        and json.loads((cache_path(recipe, t) / "manifest.json").read_text()).get("complete")
        for t in cached_teachers(recipe)
    )


def _elicit(
    recipe: Recipe, stage: StageConfig, data: str, stage_dir: Path, parent: str
) -> tuple[str, dict[str, float]]:
    """Run an expand, label or curate stage; (its output file, its figures)."""
    from orchestrator import elicit
    from orchestrator.judges import JudgePool
    from orchestrator.run_tracker import open_tracker
    from orchestrator.teachers import live_pool

    teacher = stage.teacher or recipe.teachers[0].name
    out = stage_dir / "data.parquet"
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / "recipe.yaml").write_text(to_yaml(recipe))  # a run dir for its MLflow run
    cfg = next(t for t in recipe.teachers if t.name == teacher)
    if stage.kind == "curate":
        judge_cfg, model = elicit.curate_judge(stage, recipe, teacher)
        pool: Any = JudgePool(judge_cfg, None if judge_cfg.function else model, recipe.cluster)
    else:
        pool = live_pool(recipe, cfg)
    done = False
    try:
        if stage.kind == "expand":
            figures = elicit.expand(stage, pool, data, out, recipe.run.seed)
        elif stage.kind == "label":
            figures = elicit.label(stage, recipe, pool, data, out)
        else:
            figures = elicit.curate(stage, pool, data, out)
        done = True
    finally:
        pool.shutdown(keep=done)  # a later stage may take it (orchestrator/warm.py)
    tracker = open_tracker(recipe.model_copy(deep=True), stage_dir, parent=parent)
    tracker.log_metrics(0, figures)
    tracker.log_artifact(out)
    tracker.finish("FINISHED")
    print(f"stage {stage.name}: " + ", ".join(f"{k} {v:g}" for k, v in figures.items()))
    return str(out), figures
