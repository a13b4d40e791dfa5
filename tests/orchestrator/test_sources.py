"""distill.mode: on_policy end to end, through the real CLI, Ray, DeepSpeed and MLflow.

lambda 0 is the off-policy run exactly; with lambda 1 the ranks train on exactly the ids
the rollout engine wrote, every sample's staleness stays within max_staleness, and a
strictly on-policy run resumes to the same weights as an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
import torch
from conftest import base_recipe, write_recipe
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from orchestrator.checkpoint import read_ledger
from orchestrator.cli import main
from orchestrator.sources import is_on_policy_step
from orchestrator.students import StudentGroup

STEPS = 6


def _raw(tmp_path: Path, models: dict[str, str], **sections):
    base = base_recipe(
        tmp_path,
        models,
        train={"steps": STEPS, "batch_size": 4, "micro_batch_size": 2, "log_every": 2},
        checkpoint={"every": 3},
        data={"seq_len": 16},
        distill={"top_k": 16, "loss": "reverse_kl"},
    )
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return base


def _run(tmp_path: Path, raw: dict, name: str, *extra: str) -> Path:
    raw = {**raw, "run": {**raw["run"], "name": name}}
    path = write_recipe(tmp_path, raw, f"{name}.yaml")
    assert main(["run", str(path), *extra]) == 0
    (run_dir,) = (tmp_path / "runs").glob(f"{name}-*")
    return run_dir


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "student" / "model.safetensors"))


def _metric(run_dir: Path, key: str) -> list[float]:
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    run_id = __import__("json").loads((run_dir / "state.json").read_text())["run_id"]
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_lambda_draws_depend_on_seed_and_step_only():
    draws = [is_on_policy_step(3, s, 0.3) for s in range(2000)]
    assert draws == [is_on_policy_step(3, s, 0.3) for s in range(2000)]
    assert 0.25 < np.mean(draws) < 0.35
    assert all(is_on_policy_step(3, s, 1.0) for s in range(50))
    assert not any(is_on_policy_step(3, s, 0.0) for s in range(50))


def test_lambda_zero_is_the_off_policy_run(ray_session, tiny_models, tmp_path):
    raw = _raw(tmp_path, tiny_models)
    off = _run(tmp_path, raw, "off")
    zero = _run(
        tmp_path, {**raw, "distill": {**raw["distill"], "mode": "on_policy", "lambda": 0}}, "zero"
    )
    a, b = _weights(off), _weights(zero)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (zero / "rollouts").exists()  # no step drew the student's samples


def test_lambda_one_trains_on_the_engines_ids(ray_session, tiny_models, tmp_path, monkeypatch):
    trained: list[list[ray.ObjectRef]] = []
    real = StudentGroup.train_step

    def spy(self, shards, signals, step_tokens):
        trained.append(list(shards))  # what the ranks were handed, as refs
        return real(self, shards, signals, step_tokens)

    monkeypatch.setattr(StudentGroup, "train_step", spy)
    raw = _raw(
        tmp_path,
        tiny_models,
        distill={"mode": "on_policy", "lambda": 1},
        rollout={"max_new_tokens": 6, "samples_per_prompt": 2, "max_staleness": 1, "sync_every": 2},
    )
    run_dir = _run(tmp_path, raw, "onp")
    assert len(trained) == STEPS
    for step, shards in enumerate(trained):
        rows = pq.read_table(run_dir / "rollouts" / f"step_{step + 1:06d}.parquet").to_pylist()
        got = []
        for batch in ray.get(shards):
            for i in range(len(batch)):
                targets = np.roll(batch.input_ids[i], -1)[batch.loss_mask[i]]
                got.append(targets.tolist())  # the response ids the loss is on
        assert got == [r["response"] for r in rows]
        assert all(len(r["response"]) == 6 and r["finish_reason"] == "length" for r in rows)
        # one-step-off with sync_every 2: versions 0, 2, 2, 4, 4, 6 for steps 0..5 would
        # be too new; the oldest version within max_staleness is used
        assert all(0 <= step - r["version"] <= 1 for r in rows)
    staleness = _metric(run_dir, "rollout/staleness")
    assert len(staleness) == STEPS and max(staleness) == 1 and min(staleness) == 0
    assert _metric(run_dir, "sync/bytes")[0] > 0
    prompts = ray.get(trained[0])[0]
    # a prompt's samples_per_prompt samples are adjacent rows with the same prompt
    first = int(np.argmax(prompts.loss_mask[0]))
    assert np.array_equal(prompts.input_ids[0, : first + 1], prompts.input_ids[1, : first + 1])


def test_strict_on_policy_resume_is_exact(ray_session, tiny_models, tmp_path):
    raw = _raw(
        tmp_path,
        tiny_models,
        distill={"mode": "on_policy", "lambda": 1},
        rollout={"max_new_tokens": 6, "max_staleness": 0},
        student={"world_size": 2},  # each rank's share of the samples, resumed
    )
    full = _run(tmp_path, raw, "full")
    stopped = _run(tmp_path, raw, "part", "--stop-after", "3")
    assert read_ledger(stopped)["step"] == 3
    assert main(["resume", str(stopped)]) == 0
    a, b = _weights(full), _weights(stopped)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _metric(full, "rollout/staleness") == [0.0] * STEPS
    assert len(_metric(stopped, "loss")) == STEPS  # each step logged once


def test_vllm_rollouts_scored_by_a_vllm_teacher(ray_session, tmp_path):
    """The same loop with `rollout.backend=vllm teachers.0.backend=vllm` (as the recipe's
    override): real vLLM engines write the samples, take each snapshot live and score."""
    from actors.models import save_tiny_llama

    models = {  # vLLM's CPU attention needs head sizes >= 32: hidden 128, 4 heads
        "teacher": save_tiny_llama(str(tmp_path / "vt"), seed=5, hidden=128, layers=2),
        "student": save_tiny_llama(str(tmp_path / "vs"), seed=6, hidden=128, layers=1),
    }
    raw = _raw(
        tmp_path,
        models,
        distill={"mode": "on_policy", "lambda": 1},
        rollout={"backend": "vllm", "max_new_tokens": 6, "max_staleness": 1},
        train={"steps": 4},
    )
    raw["teachers"][0]["backend"] = "vllm"
    run_dir = _run(tmp_path, raw, "vllm")
    rows = pq.read_table(run_dir / "rollouts").to_pylist()
    assert len(rows) == 4 * 4 and all(len(r["response"]) == 6 for r in rows)
    assert sorted({r["version"] for r in rows}) == [0, 1, 2]  # step t written with t - 1
    assert _metric(run_dir, "rollout/staleness") == [0.0, 1.0, 1.0, 1.0]
    assert all(b > 0 for b in _metric(run_dir, "sync/bytes"))
    kl = _metric(run_dir, "kl")
    assert len(kl) == 4 and all(np.isfinite(kl))
