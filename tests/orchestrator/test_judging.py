"""How judges' scores become the samples' rewards (`orchestrator/judging.py`): each judge
standardised within a prompt's group, a single judge passed through unchanged, a relative
likelihood judge minus the student's own log-probs."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import tiny_kd_rlaif, write_recipe
from mlflow.tracking import MlflowClient

from orchestrator.cli import main
from orchestrator.judging import combine_rewards

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def test_judges_on_different_scales_are_standardised_per_group():
    """A 1..9 rating and a 0/1 check on one prompt's 4 samples; the rating dropped the 4th
    sample, which the check finds correct. Mixed raw, that sample gets the lowest reward of
    the group although only it and the first are correct; standardised per judge within
    the group, both correct samples rank above both wrong ones."""
    rating = np.array([9.0, 5.0, 3.0, np.nan])
    check = np.array([1.0, 0.0, 0.0, 1.0])
    rewards = combine_rewards([(1.0, rating), (1.0, check)], 4, 4)
    assert min(rewards[0], rewards[3]) > max(rewards[1], rewards[2]), rewards
    # each judge's z-scores (ddof 1) averaged: the 4th sample has the check's alone
    z_check = (check - 0.5) / np.std(check, ddof=1)
    z_rating = (rating[:3] - rating[:3].mean()) / np.std(rating[:3], ddof=1)
    np.testing.assert_allclose(rewards[:3], (z_rating + z_check[:3]) / 2, atol=1e-12)
    assert rewards[3] == pytest.approx(z_check[3])
    # a group a judge scored all alike adds 0 from it; a sample no judge scored has none
    flat = combine_rewards([(1.0, np.full(4, 7.0)), (3.0, np.array([1, 0, np.nan, np.nan]))], 4, 4)
    np.testing.assert_allclose(flat[:2], [0.75 * 0.7071067811865476, -0.75 * 0.7071067811865476])
    assert flat[2] == 0 and flat[3] == 0
    none = combine_rewards([(1.0, np.array([1.0, np.nan])), (1.0, np.array([0.0, np.nan]))], 2, 2)
    assert np.isnan(none[1])


def test_one_judge_reaches_the_advantage_raw():
    """With a single judge nothing is rescaled: its rewards are the samples' rewards."""
    rating = np.array([9.0, 5.0, np.nan, 3.0, 2.0, 2.0, 8.0, 1.0])
    np.testing.assert_array_equal(combine_rewards([(2.0, rating)], 8, 4), rating)


def test_a_relative_likelihood_judge_subtracts_the_students_own_logprobs(
    ray_session, chat_models, tmp_path
):
    """recipes/kd_rlaif.yaml with two likelihood judges served by the teacher, one of them
    relative, and a third as the evaluator (it counts the win rate, gives no reward): per
    step, the plain judge's mean reward minus the relative one's is the mean of the
    student's own log-probs of the step's samples, as the rollout files record them."""
    base = {"kind": "likelihood", "teacher": "smollm2", "timeout_s": 120, "min_agreement": 0}
    evaluator = {"name": "eval", "role": "evaluator", **base}  # counts wins, gives no reward
    judges = [{"name": "plain", **base}, {"name": "rel", "relative": True, **base}, evaluator]
    raw = tiny_kd_rlaif(tmp_path, chat_models, "quickstart_prompts.jsonl", 4, judges)
    raw["rlaif"].update(win_rate_prompts=2, win_rate_by="evaluator")
    assert main(["run", str(write_recipe(tmp_path, raw))]) == 0
    (run_dir,) = (tmp_path / "runs").glob("kd_rlaif-*")
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    run_id = json.loads((run_dir / "state.json").read_text())["run_id"]

    def history(key: str) -> list[float]:
        rows = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        return [m.value for m in rows]

    plain, rel = history("reward/plain"), history("reward/rel")
    assert history("reward/eval") == [] and len(history("eval/win_rate")) == 1
    # curves.png: loss, kl, tokens/s, then a reward curve per rewarding judge and the win rate
    width = matplotlib.image.imread(run_dir / "curves.png").shape[1]
    assert width == 5 * 6 * 110
    assert 0 <= history("eval/empty")[0] <= 1
    files = sorted((run_dir / "rollouts").glob("step_*.parquet"))
    assert len(plain) == len(rel) == len(files) == 2
    assert all(p < 0 for p in plain)  # mean log-probs
    for p, r, f in zip(plain, rel, files, strict=True):
        own = [np.mean(lp) for lp in pq.read_table(f).column("logprobs").to_pylist()]
        assert p - r == pytest.approx(np.mean(own), abs=1e-4)
