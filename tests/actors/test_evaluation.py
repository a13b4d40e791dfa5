"""The eval figures: the same whatever the chunking, the top-k KL equal to what a training
run's held-out evaluation computes (teacher top-k signal, student objective sums)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from actors.batch import TokenBatch
from actors.evaluation import score_rows
from actors.models import backbone, output_head
from actors.objective import LossSpec, SparseTarget, objective_sums
from actors.signal import topk_signal


def _batch() -> TokenBatch:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 96, size=(5, 20)).astype(np.int32)
    attn = np.ones_like(ids, dtype=np.int8)
    attn[1, 14:] = 0  # a shorter row, right-padded
    loss = attn.astype(bool)
    loss[:, :3] = False  # a prompt
    loss[:, -1] = False
    loss[1, 13:] = False
    return TokenBatch(ids, attn, loss)


@pytest.fixture(scope="module")
def pair(tiny_models):
    return tuple(
        AutoModelForCausalLM.from_pretrained(tiny_models[m]).eval() for m in ("teacher", "student")
    )


def test_figures_do_not_depend_on_the_chunk(pair):
    kw = {"vocab": 96, "top_k": 8, "temperature": 1.0}
    whole = score_rows(*pair, _batch(), chunk=10_000, **kw)
    small = score_rows(*pair, _batch(), chunk=3, **kw)
    assert whole.positions == small.positions == _batch().num_tokens
    assert (whole.covered, whole.agree) == (small.covered, small.agree)
    for key in ("ce_student", "ce_teacher", "kl_dense", "kl_topk"):
        assert getattr(small, key) == pytest.approx(getattr(whole, key), rel=1e-5)


@torch.no_grad()
def test_topk_kl_is_the_training_runs_held_out_kl(pair):
    """As a teacher actor scores a shard and a student rank evaluates on it (at T = 2)."""
    teacher, student = pair
    batch = _batch()
    ids, attn, mask = batch.to_torch(torch.device("cpu"))
    t_feat = backbone(teacher)(input_ids=ids, attention_mask=attn).last_hidden_state[mask]
    signal = topk_signal(
        t_feat, output_head(teacher), k=8, temperature=2.0, teacher="t", vocab_size=96, chunk=7
    )
    t_ids, t_lp = signal.torch_targets()
    s_feat = backbone(student)(input_ids=ids, attention_mask=attn).last_hidden_state[mask]
    labels = torch.roll(ids, shifts=-1, dims=1)[mask]
    target = SparseTarget("t", t_ids, t_lp, 0.0, 2.0, train=False)
    spec = LossSpec(kind="forward_kl", temperature=2.0, alpha=0.0)
    _, run = objective_sums(s_feat, output_head(student), labels, [target], spec, chunk=5)
    got = score_rows(teacher, student, batch, vocab=96, top_k=8, temperature=2.0, chunk=4)
    figures = got.figures()
    assert figures["kl_topk"] == pytest.approx(float(run["kl/t"] / run["cover/t"]), rel=1e-5)
    assert figures["ce_student"] == pytest.approx(float(run["ce"]) / batch.num_tokens, rel=1e-6)
    assert 0 < figures["kl_topk"] < figures["kl_dense"]  # k + 1 outcomes: a lower bound


def test_topk_over_the_whole_vocab_is_the_dense_kl(pair):
    got = score_rows(*pair, _batch(), vocab=96, top_k=96, temperature=1.0, chunk=16).figures()
    assert got["kl_topk"] == pytest.approx(got["kl_dense"], rel=2e-3)  # float16 log-probs
