"""Shared by the benchmarks: small real models, a recipe dict, and reading metrics back."""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

import yaml
from mlflow.tracking import MlflowClient

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def models(root: Path, vocab: int, teacher_hidden: int, student_hidden: int) -> dict[str, str]:
    from actors.models import save_tiny_llama

    root.mkdir(parents=True, exist_ok=True)
    return {
        "teacher": save_tiny_llama(
            str(root / "teacher"), 1, vocab_size=vocab, hidden=teacher_hidden, layers=4
        ),
        "student": save_tiny_llama(
            str(root / "student"), 2, vocab_size=vocab, hidden=student_hidden, layers=2
        ),
    }


def run_recipe(path: Path, raw: dict[str, Any], overrides: list[str] | None = None):
    from orchestrator.driver import execute, new_run_dir
    from orchestrator.preflight import preflight
    from orchestrator.recipe import load_recipe

    path.write_text(yaml.safe_dump(raw))
    recipe = preflight(load_recipe(path, overrides or []))
    return execute(recipe, new_run_dir(recipe))


def history(result: Any, key: str) -> dict[int, float]:
    client = MlflowClient(tracking_uri=result.summary["tracking_uri"])
    rows = client.get_metric_history(result.summary["mlflow_run_id"], key)
    return {m.step: m.value for m in rows}


def median(values: list[float]) -> float:
    return statistics.median(values)
