"""RolloutEngine: real batched sampling and live weight sync from DeepSpeed ranks.

The sampler is checked against transformers' own greedy generation and for per-row seeds;
a sync through the object store must leave the engine computing exactly what the ranks
compute, for ZeRO 0 and ZeRO 3 (gathered)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import ray
import torch
from conftest import base_recipe
from transformers import AutoModelForCausalLM

from actors.batch import Sample, TokenBatch
from actors.chat import LENGTH, STOP
from actors.models import build_student
from actors.rollout import HFSampler, RolloutEngine, _top_p_filter, assemble, request_seed
from actors.specs import EngineSpec
from actors.teacher import TeacherActor
from orchestrator.recipe import Recipe
from orchestrator.students import StudentGroup

SAMPLING = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8}


def _sampler(path: str) -> HFSampler:
    return HFSampler(build_student(path, None).eval(), torch.device("cpu"))


def _prompts() -> list[np.ndarray]:
    return [np.array(p, dtype=np.int32) for p in ([5, 9, 11], [7], [3, 4, 5, 6, 8])]


def test_greedy_matches_transformers_generate(tiny_models):
    sampler = _sampler(tiny_models["teacher"])
    samples = sampler.sample(_prompts(), [0, 1, 2], {**SAMPLING, "temperature": 0.0}, [], 0)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"]).eval()
    for prompt, sample in zip(_prompts(), samples, strict=True):
        ids = torch.tensor([prompt.tolist()], dtype=torch.long)
        ref = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)
        assert sample.response == ref[0, len(prompt) :].tolist()
        assert sample.finish_reason == LENGTH and len(sample.response) == 8


def test_each_row_draws_from_its_own_seed(tiny_models):
    """A row's sample depends on its seed only, not on the rows batched with it."""
    sampler = _sampler(tiny_models["teacher"])
    prompts, seeds = _prompts(), [request_seed(0, 3, i) for i in range(3)]
    together = sampler.sample(prompts, seeds, SAMPLING, [], 0)
    alone = sampler.sample(prompts[1:2], seeds[1:2], SAMPLING, [], 0)
    assert together[1].response == alone[0].response
    again = sampler.sample(prompts, [request_seed(0, 4, i) for i in range(3)], SAMPLING, [], 0)
    assert [s.response for s in again] != [s.response for s in together]
    # at T = 1 the recorded log-probs are the policy's own for the sampled ids
    batch = assemble(prompts, together, pad=0)
    recorded = np.concatenate([s.logprobs for s in together])
    np.testing.assert_allclose(sampler.token_logprobs(batch), recorded, rtol=0, atol=1e-5)


def _logprobs_at(model: torch.nn.Module, batch: TokenBatch, temperature: float) -> np.ndarray:
    """log_softmax(logits / T) of each loss position's next token, from one plain forward."""
    ids, attn, mask = batch.to_torch(torch.device("cpu"))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits.float()
    lp = torch.log_softmax(logits / temperature, -1)
    return lp.gather(-1, torch.roll(ids, -1, 1)[..., None])[..., 0][mask].numpy()


def test_recorded_logprobs_are_of_the_sampling_distribution(tiny_models):
    """At T = 0.7 each recorded log-prob is log_softmax(logits / 0.7) of the sampled id: the
    distribution it was drawn from, which the PPO ratio and the k3 KL estimate need."""
    sampler = _sampler(tiny_models["teacher"])
    prompts, seeds = _prompts(), [request_seed(0, 5, i) for i in range(3)]
    samples = sampler.sample(prompts, seeds, {**SAMPLING, "temperature": 0.7}, [], 0)
    batch = assemble(prompts, samples, pad=0)
    recorded = np.concatenate([s.logprobs for s in samples])
    np.testing.assert_allclose(recorded, _logprobs_at(sampler.model, batch, 0.7), atol=1e-5)
    assert np.abs(recorded - _logprobs_at(sampler.model, batch, 1.0)).max() > 0.05  # T matters
    # top-p (on_policy only; RLAIF refuses it): the truncated, renormalised distribution's
    nucleus = sampler.sample(prompts, seeds, {**SAMPLING, "temperature": 0.7, "top_p": 0.5}, [], 0)
    assert all(lp <= 0 and np.isfinite(lp) for s in nucleus for lp in s.logprobs)
    truncated = np.concatenate([s.logprobs for s in nucleus])
    full = _logprobs_at(sampler.model, assemble(prompts, nucleus, pad=0), 0.7)
    assert (truncated >= full - 1e-6).all() and (truncated > full + 1e-3).any()


def test_stop_id_ends_the_sample_and_is_its_last_target(tiny_models):
    sampler = _sampler(tiny_models["teacher"])
    free = sampler.sample(_prompts(), [0, 1, 2], {**SAMPLING, "temperature": 0.0}, [], 0)
    stop = free[0].response[3]  # the greedy row's 4th token: make it the end of turn
    out = sampler.sample(_prompts(), [0, 1, 2], {**SAMPLING, "temperature": 0.0}, [stop], 0)
    first = free[0].response.index(stop)
    assert out[0].response == free[0].response[: first + 1]
    assert out[0].finish_reason == STOP


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = _top_p_filter(probs, 0.7)
    assert torch.allclose(kept, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    assert torch.equal(_top_p_filter(probs, 1.0), probs)


def test_assemble_masks_the_prompt_and_adds_nothing_to_a_cut_sample():
    prompts = [np.array([1, 2, 3], dtype=np.int32), np.array([4], dtype=np.int32)]
    samples = [Sample([7, 8], [-1.0, -1.0], LENGTH), Sample([9, 2], [-1.0, -1.0], STOP)]
    batch = assemble(prompts, samples, pad=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 7, 8], [4, 9, 2, 0, 0]]
    # position t predicts t+1: the targets are exactly the sampled ids
    targets = [np.roll(batch.input_ids[i], -1)[batch.loss_mask[i]].tolist() for i in range(2)]
    assert targets == [[7, 8], [9, 2]]
    assert batch.attention_mask.sum(1).tolist() == [5, 3]


def _fixed_text() -> TokenBatch:
    rng = np.random.default_rng(7)
    ids = rng.integers(0, 96, size=(2, 12)).astype(np.int32)
    attn = np.ones_like(ids, dtype=np.int8)
    loss = np.ones_like(ids, dtype=bool)
    loss[:, -1] = False
    return TokenBatch(ids, attn, loss)


def _spec(model: str) -> EngineSpec:
    return EngineSpec(
        model=model,
        layers=None,
        backend="hf",
        dtype="auto",
        threads=1,
        weight_sync="auto",
        num_gpus=0.0,
        stop_ids=[],
        pad=0,
        seed=0,
        max_model_len=512,
    )


@pytest.mark.parametrize("stage", [0, 3])
def test_sync_gives_the_engine_the_ranks_weights(ray_session, tiny_models, tmp_path, stage):
    raw = base_recipe(
        tmp_path,
        tiny_models,
        student={"world_size": 2, "zero_stage": stage},
        train={"steps": 3, "batch_size": 4, "micro_batch_size": 2, "lr": 0.05, "warmup_steps": 0},
    )
    recipe = Recipe.model_validate(raw)
    teacher = TeacherActor("tiny", tiny_models["teacher"], top_k=16, temperature=1.0)
    engine = ray.remote(RolloutEngine).options(num_cpus=0.25).remote(_spec(tiny_models["student"]))
    group = StudentGroup(recipe).ready()
    try:
        text = ray.put(_fixed_text())
        initial = group.snapshot()
        before = ray.get(engine.token_logprobs.remote(text, 0, [initial]))
        for step in range(3):  # N real training steps
            batch = _fixed_text()
            batch.input_ids[:] = (batch.input_ids + step + 1) % 96
            shards = batch.shard(2)
            sigs = [[ray.put(teacher.score(s))] for s in shards]
            ray.get(group.train_step([ray.put(s) for s in shards], sigs, None))
        snapshot = group.snapshot()
        assert ray.get(snapshot).version == 3
        after = ray.get(engine.token_logprobs.remote(text, 3, [snapshot]))
        ranks = ray.get(group.token_logprobs(text))
        assert ray.get(engine.get_version.remote()) == 3
        np.testing.assert_allclose(after, ranks, rtol=0, atol=1e-5)
        assert np.abs(after - before).max() > 1e-3  # the sync really changed the weights
    finally:
        group.shutdown(keep=True)  # the other stage's group sets these ranks up again
        ray.kill(engine)


def test_a_restarted_engine_resyncs_before_it_serves(ray_session, tiny_models):
    """Kill the engine: Ray restarts it and re-runs the call, and the new process loads the
    call's snapshot first, so it writes exactly what the old one wrote."""
    from actors.weights import WeightSnapshot

    engine = (
        ray.remote(RolloutEngine)
        .options(num_cpus=0.25, max_restarts=1, max_task_retries=1)
        .remote(_spec(tiny_models["student"]))
    )
    model = build_student(tiny_models["student"], None)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # weights the engine cannot have from its own start
    snapshot = ray.put(WeightSnapshot.of(model.state_dict(), version=7, gather_s=0.0))
    prompts = [_prompts()]
    seeds = [[11, 12, 13]]
    try:
        *_, first = ray.get(
            engine.generate.options(num_returns=2).remote(prompts, seeds, SAMPLING, 7, [snapshot])
        )
        assert first["version"] == 7 and first["sync_bytes"] > 0
        ray.kill(engine, no_restart=False)
        deadline = time.monotonic() + 60
        while True:  # until the restarted process answers: it holds no weights yet
            try:
                if ray.get(engine.get_version.remote()) == -1:
                    break
            except ray.exceptions.RayActorError:
                pass
            assert time.monotonic() < deadline, "the engine did not come back"
            time.sleep(0.2)
        *_, again = ray.get(
            engine.generate.options(num_returns=2).remote(prompts, seeds, SAMPLING, 7, [snapshot])
        )
        assert again["version"] == 7 and again["sync_bytes"] > 0  # loaded again after restart
        assert again["responses"] == first["responses"]
    finally:
        ray.kill(engine)
