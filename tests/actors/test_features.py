"""Feature distillation: the loss, the projections, and what leaves a rank."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from actors.features import FeatureSpec, FeatureTransfer, normalised_mse, uniform_pairs
from actors.objective import LossSpec
from actors.student import DistillStudent

KD = LossSpec(kind="forward_kl", temperature=1.0, alpha=1.0)  # CE only: the feature term alone


def _batch(seed: int = 0, rows: int = 3, length: int = 12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (rows, length), generator=g)
    attn = torch.ones_like(ids)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, -1] = False
    return ids, attn, mask


def _teacher_states(path: str, pairs, ids, attn, mask) -> dict[int, torch.Tensor]:
    teacher = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        out = teacher.model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    # what the wire carries: float16 at the loss positions
    return {t: out.hidden_states[t][mask].half() for _, t in pairs}


def _student(path: str, spec: FeatureSpec | None) -> DistillStudent:
    lm = AutoModelForCausalLM.from_pretrained(path)
    return DistillStudent(lm, KD, chunk_bytes=2**20, features=spec)


def test_uniform_pairs_meet_at_the_final_output():
    assert uniform_pairs(2, 4) == ((1, 2), (2, 4))
    assert uniform_pairs(6, 30) == ((1, 5), (2, 10), (3, 15), (4, 20), (5, 25), (6, 30))
    assert uniform_pairs(3, 3) == ((1, 1), (2, 2), (3, 3))


@pytest.mark.parametrize("loss", ["cosine", "mse"])
def test_feature_loss_is_zero_for_the_same_model_and_positive_otherwise(tiny_models, loss):
    ids, attn, mask = _batch()
    pairs = ((1, 1), (2, 2))
    spec = FeatureSpec(pairs, loss, 1.0, "tiny", teacher_width=48)
    same = _student(tiny_models["teacher"], spec)
    assert len(same.features.proj) == 0, "equal widths: the identity, nothing to learn"
    states = _teacher_states(tiny_models["teacher"], pairs, ids, attn, mask)
    # the teacher's own states at full precision: exactly zero
    with torch.no_grad():
        out = same.lm.model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    exact = {t: out.hidden_states[t][mask] for _, t in pairs}
    _, terms, _ = same(ids, attn, mask, [], teacher_hidden=exact)
    assert float(terms["feature"]) == pytest.approx(0.0, abs=1e-5 * mask.sum().item())
    # from the float16 wire copy: rounding only
    _, terms16, _ = same(ids, attn, mask, [], teacher_hidden=states)
    assert 0 <= float(terms16["feature"]) < 1e-3 * mask.sum().item()
    shifted = {t: h + 0.5 * torch.randn_like(h.float()).half() for t, h in states.items()}
    _, worse, _ = same(ids, attn, mask, [], teacher_hidden=shifted)
    assert float(worse["feature"]) > 100 * float(terms16["feature"]) + 1e-3


def test_feature_gradient_reaches_the_student_layers_and_the_projection(tiny_models):
    ids, attn, mask = _batch(seed=1)
    pairs = ((1, 2),)  # the 1-layer student's block output against the teacher's final one
    spec = FeatureSpec(pairs, "cosine", 0.5, "tiny", teacher_width=48)
    student = _student(tiny_models["student"], spec)
    assert set(student.features.proj) == {"1"}, "widths 32 -> 48: one projection"
    states = _teacher_states(tiny_models["teacher"], pairs, ids, attn, mask)
    loss, terms, _ = student(ids, attn, mask, [], teacher_hidden=states)
    plain, plain_terms, _ = student(ids, attn, mask, [])
    assert float(terms["feature"]) > 0
    assert loss.item() == pytest.approx(plain.item() + 0.5 * terms["feature"].item(), rel=1e-5)
    assert "feature" not in plain_terms
    student.zero_grad()
    (loss - plain).backward()  # the feature term alone
    proj = student.features.proj["1"].weight.grad
    block = student.lm.model.layers[0].mlp.down_proj.weight.grad
    assert proj is not None and proj.abs().sum() > 0
    assert block is not None and block.abs().sum() > 0
    head = student.lm.lm_head.weight.grad
    assert head is None or head.abs().sum() == 0, "the feature term does not touch the head"


def test_mse_is_normalised_per_channel():
    # one huge channel would rule raw MSE; divided by its spread it counts like the others
    teacher = torch.randn(64, 8)
    teacher[:, 0] *= 1000
    student = teacher.clone()
    student[:, 0] += 1000 * 0.1  # 0.1 spreads off on the huge channel
    student[:, 1] += 0.1  # 0.1 spreads off on an ordinary one
    per_position = normalised_mse(student, teacher)
    raw_share = 1000**2 / (1000**2 + 1)
    assert per_position.mean().item() == pytest.approx(2 * 0.01 / 8, rel=0.2)
    assert raw_share > 0.99  # what raw MSE would have made of it


def test_feature_transfer_needs_pairs():
    spec = FeatureSpec((), "cosine", 1.0, "tiny", teacher_width=8)
    with pytest.raises(AssertionError, match="no feature pairs"):
        FeatureTransfer(spec, 8)({}, {})
