"""distill.signal: hidden on the ranks: the teacher's exact distribution rebuilt from its
shipped final hidden state and a frozen copy of its head, chunk by chunk."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from actors.models import frozen_head, output_head
from actors.objective import DenseTarget, LossSpec, SparseTarget, objective_sums


def _states(path: str, rows: int = 3, length: int = 10, seed: int = 0):
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(0, 96, (rows, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state.reshape(-1, model.config.hidden_size)
        logits = model(input_ids=ids).logits.reshape(-1, model.config.vocab_size)
    return model, ids, hidden, logits


@pytest.mark.parametrize("tied", [True, False])
def test_the_frozen_head_gives_the_teachers_own_logits(tiny_models, tmp_path, tied):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"])
    if not tied:  # an untied copy whose head differs from its embeddings
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 1.5)
    model.save_pretrained(tmp_path / "t")
    _, _, hidden, logits = _states(str(tmp_path / "t"))
    head = frozen_head(str(tmp_path / "t"), torch.device("cpu"), torch.float32, vocab=96)
    assert torch.allclose(head(hidden), logits, atol=1e-5, rtol=0)
    assert torch.equal(
        head(hidden), output_head(AutoModelForCausalLM.from_pretrained(tmp_path / "t"))(hidden)
    )


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_hidden_signal_loss_is_dense_kd_from_the_same_float16_state(tiny_models, kind, chunk):
    _, _, t_hidden, _ = _states(tiny_models["teacher"])
    shipped = t_hidden.half()  # what the wire carries
    student = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    ids = torch.randint(0, 96, (3, 10), generator=torch.Generator().manual_seed(0))
    features = student.model(input_ids=ids).last_hidden_state.reshape(-1, 32)
    labels = torch.roll(ids, -1, 1).reshape(-1)
    head = frozen_head(tiny_models["teacher"], torch.device("cpu"), torch.float32, vocab=96)
    spec = LossSpec(kind=kind, temperature=2.0, alpha=0.0)
    target = DenseTarget("tiny", shipped, head, 1.0)
    loss, terms = objective_sums(
        features, output_head(student), labels, [target], spec, chunk=chunk
    )
    # reference: the full [positions, vocab] logits at once, from the same float16 state
    t = 2.0
    log_p = F.log_softmax(head(shipped.float()) / t, -1)
    log_q = F.log_softmax(output_head(student)(features) / t, -1)
    a, b = (log_p, log_q) if kind == "forward_kl" else (log_q, log_p)
    ref = t**2 * F.kl_div(b, a, log_target=True, reduction="sum")
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    forward = F.kl_div(log_q, log_p, log_target=True, reduction="sum")
    assert terms["kl/tiny"].item() == pytest.approx(forward.item(), rel=1e-5)
    assert terms["cover/tiny"].item() == features.shape[0]
    loss.backward()  # the gradient reaches the student, never the frozen head
    assert student.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0


def test_hidden_signal_beats_topk_to_the_exact_kl(tiny_models):
    """Top-k with a small k misses the tail the hidden signal keeps: their KLs differ, the
    hidden one equals the exact full-vocab KL."""
    _, _, t_hidden, t_logits = _states(tiny_models["teacher"])
    student = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    ids = torch.randint(0, 96, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = student.model(input_ids=ids).last_hidden_state.reshape(-1, 32)
    labels = torch.roll(ids, -1, 1).reshape(-1)
    spec = LossSpec(kind="forward_kl", temperature=1.0, alpha=0.0)
    head = frozen_head(tiny_models["teacher"], torch.device("cpu"), torch.float32, vocab=96)
    dense = DenseTarget("tiny", t_hidden.half(), head, 1.0)
    lp, top = torch.log_softmax(head(t_hidden.half().float()), -1).topk(4)
    sparse = SparseTarget("tiny", top, lp, 1.0)
    head_s = output_head(student)
    with torch.no_grad():
        exact = F.kl_div(
            F.log_softmax(head_s(features), -1),
            F.log_softmax(head(t_hidden.half().float()), -1),
            log_target=True,
            reduction="sum",
        )
        _, d = objective_sums(features, head_s, labels, [dense], spec, chunk=8)
        _, s = objective_sums(features, head_s, labels, [sparse], spec, chunk=8)
    assert d["kl/tiny"].item() == pytest.approx(exact.item(), rel=1e-5)
    assert abs(s["kl/tiny"].item() - exact.item()) > 1e-3 * exact.item()
