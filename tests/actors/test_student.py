"""StudentWorker through real DeepSpeed engines in Ray actors: the step's objective is
token-weighted whatever the batching, and a cut, tied student trains and exports under ZeRO-3.

Gradients are read as a one-step SGD update with clipping off (AdamW's first step is about
lr * sign(g) and would hide a wrong scale).
"""

from __future__ import annotations

import numpy as np
import pytest
import ray
import torch
from conftest import base_recipe
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from actors.batch import TokenBatch
from actors.models import backbone, build_student, output_head, save_tiny_llama
from actors.objective import LossSpec, SparseTarget, objective_sums
from actors.teacher import TeacherActor
from orchestrator.recipe import Recipe
from orchestrator.students import StudentGroup

LR = 0.5


def _ragged_batch(rows: int = 4, width: int = 20, seed: int = 0) -> TokenBatch:
    """Rows of very different lengths and loss spans (as chat responses are)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 96, size=(rows, width)).astype(np.int32)
    attn = np.zeros_like(ids, dtype=np.int8)
    loss = np.zeros_like(ids, dtype=bool)
    for r, (length, prompt) in enumerate([(20, 2), (6, 3), (14, 10), (9, 1)][:rows]):
        attn[r, :length] = 1
        loss[r, prompt : length - 1] = True
    return TokenBatch(ids, attn, loss)


def _recipe(tmp_path, models, world: int, micro: int, stage: int, **student) -> Recipe:
    raw = base_recipe(
        tmp_path,
        models,
        student={"world_size": world, "zero_stage": stage, **student},
        train={
            "steps": 1,
            "batch_size": 4,
            "micro_batch_size": micro,
            "lr": LR,
            "warmup_steps": 0,
            "grad_clip": 0.0,
            "optimizer": "sgd",
        },
        distill={"top_k": 16, "loss": "reverse_kl", "alpha": 0.3, "temperature": 2.0},
        data={"heldout": max(world, 1)},
    )
    return Recipe.model_validate(raw)


def _one_step(recipe: Recipe, batch: TokenBatch, teacher: TeacherActor, out_dir):
    """One real optimizer step on the group; returns (exported weights, logged loss)."""
    group = StudentGroup(recipe).ready()
    try:
        shards = batch.shard(len(group))
        shard_refs = [ray.put(s) for s in shards]
        signals = [[ray.put(teacher.score(s))] for s in shards]
        metrics = ray.get(group.train_step(shard_refs, signals, batch.num_tokens))
        group.export(str(out_dir), recipe.student.model)
    finally:
        group.shutdown(keep=True)  # the next group of this size sets these ranks up again
    tokens = sum(m["tokens"] for m in metrics)
    logged = sum(m["loss"] * m["tokens"] for m in metrics) / tokens
    return load_file(str(out_dir / "model.safetensors")), logged


def _reference(student_path: str, batch: TokenBatch, teacher: TeacherActor, layers=None):
    """The token-weighted objective of the whole batch in one process, and its SGD update."""
    model = build_student(student_path, layers)
    ids, attn, mask = batch.to_torch(torch.device("cpu"))
    sig = teacher.score(batch)
    t_ids, t_lp = sig.torch_targets()
    feats = backbone(model)(input_ids=ids, attention_mask=attn).last_hidden_state[mask]
    labels = torch.roll(ids, -1, 1)[mask]
    spec = LossSpec(kind="reverse_kl", temperature=2.0, alpha=0.3)
    total, _ = objective_sums(
        feats, output_head(model), labels, [SparseTarget("tiny", t_ids, t_lp, 1.0)], spec, chunk=7
    )
    loss = total / batch.num_tokens
    loss.backward()
    with torch.no_grad():
        expected = {k: (p - LR * p.grad).clone() for k, p in model.named_parameters()}
    return expected, float(loss.detach())


@pytest.mark.parametrize("stage", [0, 2])
def test_same_gradient_whatever_world_size_and_micro_batch(
    ray_session, tiny_models, tmp_path, stage
):
    teacher = TeacherActor("tiny", tiny_models["teacher"], top_k=16, temperature=2.0)
    batch = _ragged_batch()
    expected, ref_loss = _reference(tiny_models["student"], batch, teacher)
    for world, micro in [(1, 4), (1, 1), (2, 1), (2, 2)]:
        recipe = _recipe(tmp_path, tiny_models, world, micro, stage)
        out = tmp_path / f"export-{stage}-{world}-{micro}"
        weights, logged = _one_step(recipe, batch, teacher, out)
        assert logged == pytest.approx(ref_loss, rel=1e-5), (world, micro)
        for name, value in expected.items():
            torch.testing.assert_close(
                weights[name], value, rtol=1e-5, atol=1e-6, msg=f"{name} {(world, micro)}"
            )


def test_cut_tied_student_under_zero3_trains_and_exports(ray_session, tiny_models, tmp_path):
    """A student keeping layers [2, 0] of a tied 3-layer model, built under zero.Init on 2
    ranks, takes exactly the single-process step and exports the gathered, tied weights."""
    tied = save_tiny_llama(str(tmp_path / "tied"), seed=5, hidden=32, layers=3)
    model = AutoModelForCausalLM.from_pretrained(tied)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(tied)
    models = {**tiny_models, "student": tied}
    teacher = TeacherActor("tiny", tiny_models["teacher"], top_k=16, temperature=2.0)
    batch = _ragged_batch()
    expected, ref_loss = _reference(tied, batch, teacher, layers=[2, 0])
    recipe = _recipe(tmp_path, models, 2, 1, 3, layers=[2, 0])
    weights, logged = _one_step(recipe, batch, teacher, tmp_path / "export")
    assert logged == pytest.approx(ref_loss, rel=1e-5)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert exported.config.num_hidden_layers == 2 and exported.config.tie_word_embeddings
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()
    for name, value in expected.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_deepspeed_is_imported_without_the_parts_training_never_uses():
    """No shared-memory all-reduce build on CPU (its only user is tensor-parallel
    inference), and MLflow stays importable after being hidden from DeepSpeed's autotuner."""
    import importlib
    import sys

    from actors.student import import_deepspeed

    deepspeed = import_deepspeed(cpu=True)
    assert importlib.import_module("deepspeed.comm.torch").build_shm_op() is None
    assert deepspeed.init_distributed is not None
    assert sys.modules.get("mlflow", "absent") is not None  # never left hidden
    import mlflow  # noqa: F401
