"""The vLLM backend against transformers on the same model, with one vLLM engine (in a Ray
actor) for the whole module: exact top-k at T = 1 and T = 2, the same greedy ids, sampled
ids' log-probs at the sampling temperature, and a live weight load from real DeepSpeed
ranks that leaves the engine computing what the ranks compute. vLLM must be installed
(`make test` installs it): a missing vLLM fails here.

vLLM's CPU attention needs head sizes of 32 or more: these tiny models have hidden 128 and
4 heads."""

from __future__ import annotations

import numpy as np
import pytest
import ray
import torch
from conftest import base_recipe
from transformers import AutoModelForCausalLM

from actors.batch import TokenBatch
from actors.models import build_student, save_tiny_llama
from actors.rollout import HFSampler, assemble
from actors.teacher import TeacherActor
from actors.vllm_backend import VLLMEngine
from orchestrator.actor_env import actor_options
from orchestrator.recipe import Recipe
from orchestrator.students import StudentGroup

K = 8


@pytest.fixture(scope="module")
def vllm_model(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("vllm") / "model")
    return save_tiny_llama(path, seed=11, hidden=128, layers=2)


@pytest.fixture(scope="module")
def engine(ray_session, vllm_model):
    actor = ray.remote(VLLMEngine).options(**actor_options(0.5, 0, 1))
    handle = actor.remote(vllm_model, dtype=torch.float32, max_model_len=128, top_k=K)
    yield handle
    ray.kill(handle)


def _text(seed: int = 0) -> TokenBatch:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 96, size=(3, 14)).astype(np.int32)
    attn = np.ones_like(ids, dtype=np.int8)
    attn[1, 9:] = 0  # a shorter row
    loss = attn.astype(bool).copy()
    loss[:, -1] = False
    loss[1, 8:] = False
    loss[2, :4] = False  # a prompt that is not scored
    return TokenBatch(ids, attn, loss)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_equals_transformers(engine, vllm_model, temperature):
    batch = _text()
    ray.get(engine.set_temperature.remote(temperature))
    ids, lps = ray.get(engine.topk.remote(batch, K))
    model = AutoModelForCausalLM.from_pretrained(vllm_model, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(
            input_ids=torch.from_numpy(batch.input_ids.astype(np.int64)),
            attention_mask=torch.from_numpy(batch.attention_mask.astype(np.int64)),
        ).logits
    ref_lp, ref_ids = torch.topk(torch.log_softmax(logits / temperature, -1), K)
    mask = torch.from_numpy(batch.loss_mask)
    assert ids.shape == (int(mask.sum()), K)
    np.testing.assert_array_equal(ids, ref_ids[mask].numpy())
    np.testing.assert_allclose(lps, ref_lp[mask].numpy(), rtol=0, atol=1e-3)
    ray.get(engine.set_temperature.remote(1.0))


def test_greedy_ids_equal_transformers(engine, vllm_model):
    prompts = [np.array(p, dtype=np.int32) for p in ([5, 9, 11], [7], [3, 4, 5, 6, 8])]
    sampling = {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 10}
    got = ray.get(engine.sample.remote(prompts, [0, 1, 2], sampling, []))
    ref = HFSampler(build_student(vllm_model, None).eval(), torch.device("cpu"))
    want = ref.sample(prompts, [0, 1, 2], sampling, [], 0)
    assert [s.response for s in got] == [s.response for s in want]
    assert all(s.finish_reason == "length" for s in got)
    stop = want[0].response[2]  # an end-of-turn id: the sample ends on it, and keeps it
    (ended,) = ray.get(engine.sample.remote(prompts[:1], [0], sampling, [stop]))
    first = want[0].response.index(stop)
    assert ended.response == want[0].response[: first + 1] and ended.finish_reason == "stop"


def test_seeded_sampling_repeats(engine):
    prompts = [np.array([5, 9, 11], dtype=np.int32)] * 4
    sampling = {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 12}
    a = ray.get(engine.sample.remote(prompts, [1, 2, 3, 4], sampling, []))
    b = ray.get(engine.sample.remote(prompts, [1, 2, 3, 4], sampling, []))
    assert [s.response for s in a] == [s.response for s in b]
    assert len({tuple(s.response) for s in a}) > 1  # different seeds, different samples


def test_recorded_logprobs_are_of_the_sampling_distribution(engine, vllm_model):
    """At T = 0.7 each sampled id's recorded log-prob is log_softmax(logits / 0.7) of it, as
    transformers computes it on the whole text (vLLM's default would be T = 1's), the
    end-of-turn id included; the model's EOS (2) ends nothing that is not a stop id."""
    prompts = [np.array(p, dtype=np.int32) for p in ([5, 9, 11], [7], [3, 4, 5, 6, 8])]
    sampling = {"temperature": 0.7, "top_p": 1.0, "max_new_tokens": 10}
    free = ray.get(engine.sample.remote(prompts, [4, 5, 6], sampling, []))
    assert all(s.finish_reason == "length" and len(s.response) == 10 for s in free)
    stop = free[0].response[4]  # an end-of-turn id: the first sample ends on it
    samples = ray.get(engine.sample.remote(prompts, [4, 5, 6], sampling, [stop]))
    assert samples[0].response == free[0].response[: free[0].response.index(stop) + 1]
    batch = assemble(prompts, samples, pad=0)
    recorded = np.concatenate([s.logprobs for s in samples])
    model = AutoModelForCausalLM.from_pretrained(vllm_model, dtype=torch.float32).eval()
    ids, attn, mask = batch.to_torch(torch.device("cpu"))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits
    labels = torch.roll(ids, -1, 1)[..., None]
    at = {t: torch.log_softmax(logits / t, -1).gather(-1, labels)[..., 0][mask] for t in (0.7, 1)}
    np.testing.assert_allclose(recorded, at[0.7].numpy(), rtol=0, atol=1e-3)
    assert np.abs(recorded - at[1].numpy()).max() > 0.05  # T = 1 would not pass


def test_live_weight_load_from_the_ranks(engine, vllm_model, tiny_models, tmp_path):
    """Train the ranks (student = the engine's model) a few steps, load their snapshot into
    the running engine: the same text now scores as the ranks score it."""
    raw = base_recipe(
        tmp_path,
        {**tiny_models, "student": vllm_model},
        student={"world_size": 1},
        train={"steps": 3, "batch_size": 4, "micro_batch_size": 4, "lr": 0.05, "warmup_steps": 0},
        data={"heldout": 1},
    )
    teacher = TeacherActor("tiny", tiny_models["teacher"], top_k=16, temperature=1.0)
    group = StudentGroup(Recipe.model_validate(raw)).ready()
    try:
        text = _text(1)
        before = ray.get(engine.token_logprobs.remote(text))
        for step in range(3):
            batch = _text(10 + step)
            sig = [[ray.put(teacher.score(batch))]]
            ray.get(group.train_step([ray.put(batch)], sig, None))
        snapshot = group.snapshot()
        assert ray.get(engine.load_weights.remote(snapshot)) == "in_place"  # copies, no rebuild
        after = ray.get(engine.token_logprobs.remote(text))
        ranks = ray.get(group.token_logprobs(ray.put(text)))
        np.testing.assert_allclose(after, ranks, rtol=0, atol=1e-3)
        assert np.abs(after - before).max() > 1e-2  # scored differently after the sync
        # vLLM's own reload of the same snapshot: the very same numbers, and the in-place
        # path still works after it (its buffers beside what vLLM keeps)
        assert ray.get(engine.load_weights.remote(snapshot, in_place=False)) == "reload"
        np.testing.assert_array_equal(ray.get(engine.token_logprobs.remote(text)), after)
        assert ray.get(engine.load_weights.remote(snapshot)) == "in_place"
        np.testing.assert_array_equal(ray.get(engine.token_logprobs.remote(text)), after)
    finally:
        group.shutdown()


def test_in_place_load_refuses_a_snapshot_that_would_leave_old_rows(engine, vllm_model):
    """A snapshot without one part of a fused layer (k_proj of qkv_proj) cannot be placed
    whole: vLLM's reload takes it. A whole one is placed in place again, and the engine
    then scores as transformers does with those weights."""
    from actors.weights import WeightSnapshot

    model = AutoModelForCausalLM.from_pretrained(vllm_model, dtype=torch.float32).eval()
    state = model.state_dict()
    part = {k: v for k, v in state.items() if "layers.0.self_attn.k_proj" not in k}
    assert ray.get(engine.load_weights.remote(WeightSnapshot.of(part, 1, 0.0))) == "reload"
    assert ray.get(engine.load_weights.remote(WeightSnapshot.of(state, 2, 0.0))) == "in_place"
    text = _text(3)
    ids, attn, mask = text.to_torch(torch.device("cpu"))
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits, -1)
    want = logp.gather(-1, torch.roll(ids, -1, 1)[..., None])[..., 0][mask].numpy()
    got = ray.get(engine.token_logprobs.remote(text))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)


def test_a_vllm_judge_reads_what_the_transformers_judge_reads(ray_session, tmp_path_factory):
    """`judges[i].backend: vllm`: the same likelihoods, ratings and preferences as the
    transformers judge on the same weights (float32), and the same greedy rewrite."""
    from chat_tokenizers import build_tokenizer

    from actors.judge import JudgeActor

    tok = build_tokenizer("smollm")
    folder = str(tmp_path_factory.mktemp("vllm_judge") / "judge")
    save_tiny_llama(folder, seed=5, vocab_size=len(tok), hidden=128, layers=2)
    tok.save_pretrained(folder)
    prompts = ["What is 2+2?", "Name a colour."]
    responses = ["It is 4.", "Blue, I think. Blue, I think."]
    hf = JudgeActor("j", folder, min_mass=0.0)
    remote = ray.remote(JudgeActor).options(**actor_options(0.5, 0, 1))
    vllm = remote.remote("j", folder, min_mass=0.0, backend="vllm")
    for method, args in [
        ("likelihood", (prompts, responses)),
        ("score", (prompts, responses)),
        ("pairwise", (prompts, responses, responses[::-1])),
    ]:
        want = getattr(hf, method)(*args)
        got = ray.get(getattr(vllm, method).remote(*args))
        assert got == pytest.approx(want, abs=1e-4), method
    assert ray.get(vllm.critique.remote(prompts, responses, 6)) == hf.critique(
        prompts, responses, 6
    )
    assert ray.get(vllm.info.remote())["model_hash"] == hf.info()["model_hash"]
    ray.kill(vllm)
