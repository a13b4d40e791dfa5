"""Who counts the win rate (`orchestrator/win_rate.py`): the judge with role evaluator,
never a judge the policy trains on unless the recipe says `rlaif.win_rate_by:
training_judge`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from orchestrator.recipe import Recipe
from orchestrator.win_rate import evaluator_of

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
