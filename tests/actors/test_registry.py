"""Registries: a new loss or aggregation is one function and its registration, and the
recipe accepts exactly the registered names."""

from __future__ import annotations

import pytest
import torch
from conftest import base_recipe
from pydantic import ValidationError

from actors.aggregate import AGGREGATIONS
from actors.losses import LOSSES, LossParams, divergence
from actors.registry import Registry
from orchestrator.recipe import Recipe


def test_a_name_is_registered_once_and_an_unknown_one_names_the_known():
    reg: Registry = Registry("thing")
    reg.register("a")(len)
    with pytest.raises(ValueError, match="thing 'a' is registered twice"):
        reg.register("a")(len)
    with pytest.raises(ValueError, match=r"unknown thing 'b'; expected one of \('a',\)"):
        reg["b"]
    assert reg.names() == ("a",) and "a" in reg and reg["a"] is len


def test_a_registered_loss_is_what_the_recipe_accepts_and_what_runs(tmp_path, monkeypatch):
    def half_forward(log_p, log_q, params: LossParams):
        return 0.5 * (log_p.exp() * (log_p - log_q)).sum(-1)

    models = {"teacher": "t", "student": "s"}
    with pytest.raises(ValidationError, match="unknown loss 'half_forward'"):
        Recipe.model_validate(base_recipe(tmp_path, models, distill={"loss": "half_forward"}))
    monkeypatch.setitem(LOSSES._items, "half_forward", half_forward)
    recipe = Recipe.model_validate(base_recipe(tmp_path, models, distill={"loss": "half_forward"}))
    assert recipe.distill.loss == "half_forward"
    log_p = torch.log_softmax(torch.randn(3, 5), -1)
    log_q = torch.log_softmax(torch.randn(3, 5), -1)
    torch.testing.assert_close(
        divergence(log_p, log_q, kind="half_forward"),
        0.5 * divergence(log_p, log_q, kind="forward_kl"),
    )


def test_the_recipe_lists_every_registered_aggregation(tmp_path):
    models = {"teacher": "t", "student": "s"}
    for name in AGGREGATIONS.names():
        raw = base_recipe(tmp_path, models, distill={"aggregate": name})
        if name == "route":  # routing by the lowest gold CE needs no data field
            raw["teachers"].append({"name": "other", "model": "t2"})
        assert Recipe.model_validate(raw).distill.aggregate == name
    with pytest.raises(ValidationError, match="unknown aggregation 'median'"):
        Recipe.model_validate(base_recipe(tmp_path, models, distill={"aggregate": "median"}))


def test_rl_pieces_come_from_their_registries(tmp_path, monkeypatch):
    """An RL algorithm (its plan and term), an advantage estimator and a KL estimator are
    each accepted by the recipe once registered, and refused by name before."""
    from actors.rl_losses import ADVANTAGES, KL_ESTIMATORS, group_advantages, kl_penalty
    from actors.rl_objective import ALGORITHMS, RLAlgorithm

    raw = base_recipe(tmp_path, {"teacher": "t", "student": "s"}, distill={"mode": "rlaif"})
    raw["judges"] = [{"name": "j", "function": "actors.rewards:seven_share"}]
    raw["rollout"] = {"samples_per_prompt": 2}
    raw["rlaif"] = {"algorithm": "solo", "kl_estimator": "k0"}
    with pytest.raises(ValidationError, match="unknown RL algorithm 'solo'"):
        Recipe.model_validate(raw)
    solo = RLAlgorithm(plan=lambda r, k, cfg: {}, term=lambda plan, m, cfg: (0, {}), min_group=1)
    monkeypatch.setitem(ALGORITHMS._items, "solo", solo)
    with pytest.raises(ValidationError, match="unknown KL estimator 'k0'"):
        Recipe.model_validate(raw)
    monkeypatch.setitem(KL_ESTIMATORS._items, "k0", torch.zeros_like)
    raw["rollout"] = {"samples_per_prompt": 1}  # one sample per prompt: solo compares none
    rlaif = Recipe.model_validate(raw).rlaif
    assert (rlaif.algorithm, rlaif.kl_estimator) == ("solo", "k0")
    logp = torch.randn(4)
    assert kl_penalty(logp, logp + 1, "k0").tolist() == [0.0] * 4
    monkeypatch.setitem(ADVANTAGES._items, "raw", lambda centred, count, scale, eps: centred)
    rewards = torch.tensor([1.0, 3.0, 0.0, 4.0])
    assert group_advantages(rewards, 2, "raw").tolist() == [-1.0, 1.0, -2.0, 2.0]
