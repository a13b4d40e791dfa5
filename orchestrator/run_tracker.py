"""A run's MLflow run: opened once the run is sure to start (a refused run leaves none
behind), and found again on a resume through the run's state.json."""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.checkpoint import write_json
from orchestrator.recipe import Recipe
from orchestrator.tracking import Tracker, default_tracking_uri


def open_tracker(recipe: Recipe, run_dir: Path, parent: str | None = None) -> Tracker:
    """The run's MLflow run (the one it had, on a resume); `parent`: a staged run's."""
    state_path = run_dir / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    uri = tracking_uri(recipe)
    artifacts = Path(recipe.run.output_dir).resolve() / "mlartifacts"
    name = run_dir.name if parent is None else f"{run_dir.parent.parent.name}/{run_dir.name}"
    exp = recipe.tracking.experiment
    tracker = Tracker(uri, exp, artifacts, name, state.get("run_id"), parent_run_id=parent)
    write_json(state_path, {**state, "run_id": tracker.run_id, "tracking_uri": uri})
    return tracker


def tracking_uri(recipe: Recipe) -> str:
    return recipe.tracking.uri or default_tracking_uri(recipe.run.output_dir)
