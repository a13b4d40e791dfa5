"""distill.mode: rlaif end to end through the real CLI, Ray, rollout engines, judge actors
and DeepSpeed ranks, on the toy language with a programmatic judge (the share of token 7
in a sample): the reward rises with RL alone (KD weight 0), failing judges cost samples
(counted), never the run, and with the RL weight at 0 the update is on-policy KD's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from conftest import base_recipe, write_recipe
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from actors.models import build_student, model_hash
from orchestrator.cli import main

K = 4


def _raw(tmp_path: Path, models: dict[str, str], **sections) -> dict:
    raw = base_recipe(
        tmp_path,
        models,
        student={"world_size": 1},
        data={"seq_len": 8, "heldout": 4},
        distill={"mode": "rlaif", "top_k": 16, "loss": "reverse_kl"},
        rollout={"samples_per_prompt": K, "max_new_tokens": 8, "temperature": 1.0},
        judges=[{"name": "sevens", "function": "actors.rewards:seven_share", "num_cpus": 0.1}],
        rlaif={"algorithm": "grpo", "kd_weight": 0.0, "kl_coef": 0.0},
        train={"steps": 24, "batch_size": 16, "micro_batch_size": 8, "lr": 0.03, "log_every": 8},
    )
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def _run(tmp_path: Path, raw: dict, name: str) -> Path:
    raw = {**raw, "run": {**raw["run"], "name": name}}
    assert main(["run", str(write_recipe(tmp_path, raw, f"{name}.yaml"))]) == 0
    (run_dir,) = (tmp_path / "runs").glob(f"{name}-*")
    return run_dir


def _history(run_dir: Path, key: str) -> list[float]:
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    run_id = json.loads((run_dir / "state.json").read_text())["run_id"]
    rows = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
    return [m.value for m in rows]


def test_reward_rises_with_rl_alone(ray_session, tiny_models, tmp_path):
    run_dir = _run(tmp_path, _raw(tmp_path, tiny_models, rlaif={"kl_coef": 0.01}), "grpo")
    reward = _history(run_dir, "reward_mean")
    assert len(reward) == 24
    early, late = np.mean(reward[:6]), np.mean(reward[-6:])
    assert late > early + 0.1, reward  # the share of 7s in the student's samples grows
    kl = _history(run_dir, "rl/kl_ref")
    assert kl[-1] > 0  # the student moved away from its reference...
    summary = json.loads((run_dir / "summary.json").read_text())
    start = build_student(tiny_models["student"], None)
    assert summary["reference_hash"] == model_hash(start)  # ...which stayed frozen
    assert _history(run_dir, "judge/sevens/dropped") == [0.0] * 24


def test_failing_judges_drop_samples_and_the_run_finishes(ray_session, tiny_models, tmp_path):
    judges = [  # 0.1 CPU each: everything fits the session's 2 CPUs
        {"name": "good", "function": "actors.rewards:seven_share", "num_cpus": 0.1},
        {"name": "raises", "function": "toy_judges:raises", "num_cpus": 0.1},
        {"name": "garbage", "function": "toy_judges:garbage", "num_cpus": 0.1},
        {"name": "hangs", "function": "toy_judges:hangs", "timeout_s": 2.0, "num_cpus": 0.1},
    ]
    raw = _raw(tmp_path, tiny_models, judges=judges, train={"steps": 2})
    run_dir = _run(tmp_path, raw, "faulty")
    per_step = K * 16 // K
    assert _history(run_dir, "judge/raises/dropped") == [float(per_step)] * 2
    assert _history(run_dir, "judge/garbage/dropped") == [float(per_step)] * 2
    assert _history(run_dir, "judge/hangs/dropped") == [float(per_step)] * 2
    assert _history(run_dir, "judge/hangs/retried") == [1.0, 1.0]  # once, then dropped
    assert _history(run_dir, "dropped_samples") == [0.0, 0.0]  # the good judge judged all
    assert len(_history(run_dir, "reward_mean")) == 2


def test_rl_weight_zero_is_the_on_policy_kd_update(ray_session, tiny_models, tmp_path):
    rl = _raw(
        tmp_path,
        tiny_models,
        rlaif={"rl_weight": 0.0, "kd_weight": 1.0, "kl_coef": 0.0},
        train={"steps": 3},
    )
    kd = json.loads(json.dumps(rl))
    kd["distill"] = {**kd["distill"], "mode": "on_policy", "lambda": 1.0}
    del kd["judges"], kd["rlaif"]
    a = load_file(str(_run(tmp_path, rl, "rl0") / "student" / "model.safetensors"))
    b = load_file(str(_run(tmp_path, kd, "kd") / "student" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dpo_pairs_each_prompts_best_and_worst(ray_session, tiny_models, tmp_path):
    raw = _raw(
        tmp_path, tiny_models, rlaif={"algorithm": "dpo", "dpo_beta": 0.5}, train={"steps": 6}
    )
    run_dir = _run(tmp_path, raw, "dpo")
    pairs = _history(run_dir, "rl/pairs")
    assert len(pairs) == 6 and all(0 <= p <= 16 // K for p in pairs)
    margins = _history(run_dir, "rl/margin")
    assert all(np.isfinite(margins))
    assert margins[-1] > 0  # the chosen samples became likelier than the rejected ones


def test_critique_rows_train_with_cross_entropy(ray_session, tiny_models, tmp_path):
    """A critique judge's rewrites are cross-entropy targets in the same step: with no
    reward signal and no KL, the step lowers the CE of the rewrite rows."""
    from actors.batch import Sample
    from actors.rollout import assemble
    from orchestrator.recipe import Recipe
    from orchestrator.rlaif import student_spec
    from orchestrator.students import StudentGroup

    raw = _raw(tmp_path, tiny_models, train={"batch_size": 8, "micro_batch_size": 4, "lr": 0.05})
    recipe = Recipe.model_validate(raw)
    group = StudentGroup(recipe, spec=student_spec(recipe)).ready()
    try:
        prompts = [np.array([1, 2, 3], np.int32)] * 8
        batch = assemble(prompts, [Sample([5, 6, 7, 8], [-4.0] * 4, "length")] * 8, 0)
        sft = assemble(prompts[:3], [Sample([40, 41, 42, 43, 44], [0.0] * 5, "stop")] * 3, 0)
        rl = [{"rewards": np.ones(8), "old_logp": np.full(32, -4.0, np.float32), "sft": sft}]
        ce = []
        for _ in range(4):
            (metrics,) = ray.get(group.train_step([ray.put(batch)], [[]], None, rl))
            ce.append(metrics["rl/sft_ce"] / metrics["rl/sft_tokens"])
        assert metrics["rl/sft_tokens"] == 15
        assert ce[-1] < ce[0] - 0.1, ce
    finally:
        group.shutdown()


def test_top_p_below_one_is_refused_for_rl(tmp_path, tiny_models):
    """The ratio and the KL need the log-probs of the distribution sampled from."""
    from orchestrator.recipe import RecipeError, load_recipe

    path = write_recipe(tmp_path, _raw(tmp_path, tiny_models))
    with pytest.raises(RecipeError) as err:
        load_recipe(path, ["rollout.top_p=0.9"])
    assert "rollout.top_p: 0.9 < 1 is refused for RL" in str(err.value)
    assert load_recipe(path, ["rollout.top_p=0.9", "rlaif.rl_weight=0"]).rollout.top_p == 0.9
