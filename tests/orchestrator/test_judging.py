"""How judges' scores become the samples' rewards (`orchestrator/judging.py`): each judge
standardised within a prompt's group, a single judge passed through unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.judging import combine_rewards


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
