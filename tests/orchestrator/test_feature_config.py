"""`distill.features`: which recipes may ask for it, the pairs made explicit at preflight,
and a real run (Ray, DeepSpeed, MLflow) that trains the feature term and exports no
projection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import base_recipe, write_recipe
from mlflow.tracking import MlflowClient
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from orchestrator.cli import main
from orchestrator.preflight import preflight
from orchestrator.recipe import RecipeError, load_recipe


def _recipe(tmp_path, models, features, **sections):
    raw = base_recipe(tmp_path, models, distill={"top_k": 16, "features": features}, **sections)
    return write_recipe(tmp_path, raw)


def test_uniform_pairs_are_made_explicit_at_preflight(tiny_models, tmp_path):
    recipe = preflight(load_recipe(_recipe(tmp_path, tiny_models, {"loss": "mse"})))
    f = recipe.distill.features
    assert f.teacher == "tiny" and f.pairs == [(1, 2)]  # 1 student block, 2 teacher blocks


@pytest.mark.parametrize(
    ("features", "sections", "message"),
    [
        ({"pairs": [[1, 3]]}, {}, "distill.features.pairs: [1, 3] out of range"),
        ({"teacher": "other"}, {}, "'other' is not among ['tiny']"),
        ({"loss": "l1"}, {}, "unknown feature loss 'l1'"),
        ({}, {"teachers": [{"name": "tiny", "model": "M", "backend": "vllm"}]}, "served by vllm"),
    ],
)
def test_bad_feature_recipes_are_refused_naming_the_field(
    tiny_models, tmp_path, features, sections, message
):
    for s in sections.get("teachers", []):
        s["model"] = tiny_models["teacher"]
    with pytest.raises(RecipeError) as err:
        preflight(load_recipe(_recipe(tmp_path, tiny_models, features, **sections)))
    assert message in str(err.value)


def test_only_modes_where_a_teacher_or_its_cache_scores_every_batch(tiny_models, tmp_path):
    raw = base_recipe(tmp_path, tiny_models, distill={"mode": "mutual", "features": {}})
    with pytest.raises(RecipeError, match="distill.features: modes"):
        load_recipe(write_recipe(tmp_path, raw))


def _history(run_dir: Path, key: str) -> list[float]:
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    run_id = json.loads((run_dir / "state.json").read_text())["run_id"]
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_a_feature_run_trains_the_term_ships_the_states_and_exports_a_plain_model(
    ray_session, tiny_models, tmp_path
):
    path = _recipe(
        tmp_path,
        tiny_models,
        {"loss": "cosine", "weight": 1.0},
        train={"steps": 12, "log_every": 1},
    )
    assert main(["run", str(path)]) == 0
    (run_dir,) = (tmp_path / "runs").glob("t-*")
    feature = _history(run_dir, "feature")
    assert len(feature) == 12 and feature[-1] < 0.8 * feature[0], feature
    # per token: top-16 ids (uint16) and log-probs (float16), and the 48-wide state (float16)
    assert _history(run_dir, "signal_bytes_per_token")[0] == 16 * (2 + 2) + 48 * 2
    student = run_dir / "student"
    with safe_open(str(student / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any(k.startswith("features") or ".proj." in k for k in keys), keys
    model = AutoModelForCausalLM.from_pretrained(student)  # a plain HF model
    assert model.config.hidden_size == 32


@pytest.mark.parametrize(
    ("distill", "message"),
    [
        ({"mode": "offline"}, "distill.signal: 'hidden' in modes"),
        ({"aggregate": "mean"}, "with aggregate sum_of_losses, not 'mean'"),
    ],
)
def test_hidden_signal_recipes_that_cannot_work_are_refused(
    tiny_models, tmp_path, distill, message
):
    raw = base_recipe(tmp_path, tiny_models, distill={"signal": "hidden", **distill})
    with pytest.raises(RecipeError, match=message.replace("(", r"\(")):
        load_recipe(write_recipe(tmp_path, raw))


def test_a_hidden_signal_run_trains_on_the_teachers_exact_distribution(
    ray_session, tiny_models, tmp_path
):
    raw = base_recipe(
        tmp_path,
        tiny_models,
        distill={"top_k": 16, "signal": "hidden"},
        train={"steps": 12, "log_every": 1, "eval_every": 12},
    )
    assert main(["run", str(write_recipe(tmp_path, raw))]) == 0
    (run_dir,) = (tmp_path / "runs").glob("t-*")
    kl = _history(run_dir, "kl/tiny")
    assert len(kl) == 12 and kl[-1] < 0.8 * kl[0], kl
    assert _history(run_dir, "cover/tiny") == [1.0] * 12  # every position, the whole vocab
    # per token: the 48-wide final state (float16) and a top-1 entry nobody reads (4 bytes)
    assert _history(run_dir, "signal_bytes_per_token")[0] == 48 * 2 + 4
    assert _history(run_dir, "eval/kl")[-1] > 0
