"""End to end through real Ray actors and real DeepSpeed engines (gloo, CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import base_recipe, write_recipe
from transformers import AutoModelForCausalLM

from orchestrator.driver import execute, new_run_dir
from orchestrator.preflight import preflight
from orchestrator.recipe import load_recipe


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_kl_falls_for_each_zero_stage(ray_session, tiny_models, tmp_path, zero_stage):
    raw = base_recipe(tmp_path, tiny_models, student={"zero_stage": zero_stage, "world_size": 2})
    recipe = preflight(load_recipe(write_recipe(tmp_path, raw)))
    result = execute(recipe, new_run_dir(recipe))
    assert result.finished and result.steps_done == 30
    before, after = result.summary["eval_before"], result.summary["eval_after"]
    assert after["kl"] < 0.7 * before["kl"], (before, after)
    assert after["kl/tiny"] == after["kl"]

    # the export is a plain HF folder holding the trained (gathered, for ZeRO-3) weights
    exported = AutoModelForCausalLM.from_pretrained(result.summary["student_dir"])
    initial = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    assert sum(p.numel() for p in exported.parameters()) == result.summary["student_params"]
    changed = [
        not torch.equal(a, b)
        for a, b in zip(exported.state_dict().values(), initial.state_dict().values(), strict=True)
    ]
    assert all(changed)
