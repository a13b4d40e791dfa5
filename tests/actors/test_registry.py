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
