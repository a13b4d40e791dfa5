"""Evaluation on held-out prompts (`orchestrator/win_rate.py`): the win rate is counted by
the judge with role evaluator, never a judge the policy trains on unless the recipe says
`rlaif.win_rate_by: training_judge`; held-out constraint satisfaction where the prompts
state constraints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import tiny_kd_rlaif, write_recipe
from mlflow.tracking import MlflowClient
from pydantic import ValidationError

from orchestrator.cli import main
from orchestrator.recipe import Recipe
from orchestrator.win_rate import evaluator_of, satisfaction

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
RATER = {"name": "rater", "kind": "likelihood", "teacher": "smollm2"}
EVAL = {"name": "eval", "kind": "pairwise", "teacher": "smollm2", "role": "evaluator"}


def _recipe(judges: list[dict], **rlaif) -> Recipe:
    raw = yaml.safe_load((RECIPES / "kd_rlaif.yaml").read_text())
    raw["judges"] = judges
    raw["rlaif"].update({"win_rate_by": "evaluator", **rlaif})
    return Recipe.model_validate(raw)


def test_the_evaluator_counts_the_wins_and_never_the_training_judge_by_default():
    assert evaluator_of(_recipe([RATER, EVAL])) == "eval"
    assert evaluator_of(_recipe([EVAL, RATER])) == "eval"
    assert evaluator_of(_recipe([RATER])) is None  # no evaluator: no win rate
    said = _recipe([RATER], win_rate_by="training_judge")
    assert evaluator_of(said) == "rater"  # only where the recipe says so
    function = {"name": "f", "function": "actors.rewards:length_reward"}
    assert evaluator_of(_recipe([function], win_rate_by="training_judge")) is None


@pytest.mark.parametrize(
    ("judges", "rlaif", "message"),
    [
        ([EVAL], {}, "needs at least one judge with role reward"),
        ([RATER, EVAL, {**EVAL, "name": "e2"}], {}, "one judge with role evaluator"),
        ([RATER, EVAL], {"win_rate_by": "training_judge"}, "choose one"),
        ([RATER, {**EVAL, "kind": "critique"}], {}, "an evaluator compares two samples"),
    ],
)
def test_evaluator_recipes_that_cannot_work_are_refused(judges, rlaif, message):
    with pytest.raises(ValidationError, match=message):
        _recipe(judges, **rlaif)


def test_satisfaction_overall_and_per_family():
    from actors.verifiers import Constraint

    constraints = [
        [Constraint("lowercase")],
        [Constraint("lowercase")],
        [Constraint("bullets", n=2)],
    ]
    got = satisfaction(constraints, ["all small.", "Not small.", "- a\n- b"])
    assert got == {
        "eval/constraints": pytest.approx(2 / 3),
        "eval/constraints/bullets": 1.0,
        "eval/constraints/lowercase": 0.5,
    }


def test_an_evaluator_with_its_own_model_counts_wins_and_is_shut_down_with_the_run(
    ray_session, chat_models, tmp_path, capsys
):
    """An evaluator of its own (a judge actor, not a teacher's replica): the run prints that
    it does not train the policy, logs the win rate, and parks or kills its actor at the
    end like every other judge: it is parked for the next run, under its own key."""
    from orchestrator import warm
    from orchestrator.judges import judge_key

    rater = {"name": "rater", "kind": "likelihood", "teacher": "smollm2", "min_agreement": 0}
    own = {"name": "other", "kind": "likelihood", "model": chat_models["teacher"]}
    judges = [rater, {**own, "role": "evaluator", "min_agreement": 0, "num_cpus": 0.1}]
    raw = tiny_kd_rlaif(tmp_path, chat_models, "quickstart_prompts.jsonl", 4, judges)
    raw["rlaif"].update(win_rate_prompts=2, win_rate_by="evaluator")
    warm.release()
    assert main(["run", str(write_recipe(tmp_path, raw))]) == 0
    assert "win rate: counted by judge other (does not train the policy)" in capsys.readouterr().out
    recipe = Recipe.model_validate(raw)
    key = judge_key(recipe.judges[1], chat_models["teacher"], recipe.cluster)
    assert warm._parked.get(key), "the evaluator's actor was neither parked nor killed"
    warm.release()


def test_a_run_on_the_instruction_set_counts_held_out_constraints(
    ray_session, chat_models, tmp_path, capsys
):
    """A verifier trains the policy and no judge is the evaluator: no win rate is counted,
    and the held-out constraint satisfaction of the greedy answers is, before and after."""
    verifier = "actors.verifiers:follows_instructions"
    judges = [{"name": "follows", "kind": "verifier", "function": verifier}]
    raw = tiny_kd_rlaif(tmp_path, chat_models, "instructions_train.jsonl", 8, judges)
    raw["rlaif"].update(win_rate_prompts=8, kd_weight=0.0)
    assert main(["run", str(write_recipe(tmp_path, raw))]) == 0
    out = capsys.readouterr().out
    assert "win rate: not counted (no judge with role: evaluator)" in out
    assert "judge check" not in out  # a verifier is checked on fixtures, not at the start
    (run_dir,) = (tmp_path / "runs").glob("kd_rlaif-*")
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    run_id = json.loads((run_dir / "state.json").read_text())["run_id"]
    final = client.get_run(run_id).data.metrics
    assert "eval/win_rate" not in final
    for key in ("eval/constraints", "eval/start_constraints", "eval/empty"):
        assert 0 <= final[key] <= 1, key
    families = {k for k in final if k.startswith("eval/constraints/")}
    assert families and all(0 <= final[k] <= 1 for k in families)
    assert len(json.loads((run_dir / "win_rate_start.json").read_text())) == 8
