"""Sparse top-k losses equal the dense textbook formulas when k is the whole vocab, and the
one objective (chunked, token sums) equals them whatever the chunking."""

from __future__ import annotations

import pytest
import torch

from actors.losses import LOSSES, per_position_divergence
from actors.objective import LossSpec, SparseTarget, chunk_positions, objective_sums

N, V = 6, 13


def _kl(log_a, log_b):
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def dense(kind, log_p, log_q, beta=0.5, skew=0.1):
    """Textbook divergences on full distributions (log p teacher, log q student)."""
    p, q = log_p.exp(), log_q.exp()
    if kind == "forward_kl":
        return _kl(log_p, log_q)
    if kind == "reverse_kl":
        return _kl(log_q, log_p)
    if kind == "jsd":
        log_m = torch.log(beta * p + (1 - beta) * q)
        return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    if kind == "skew_kl":
        return _kl(log_p, torch.log(skew * p + (1 - skew) * q))
    if kind == "skew_reverse_kl":
        return _kl(log_q, torch.log((1 - skew) * p + skew * q))
    return 0.5 * (p - q).abs().sum(-1)


def sparse_divergence(student, ids, lp, mask, *, kind, temperature=1.0, beta=0.5, skew=0.1):
    """Masked mean of the KD term through the one objective (identity head, chunk 2)."""
    target = SparseTarget("t", ids[mask], lp[mask], 1.0)
    spec = LossSpec(kind=kind, temperature=temperature, alpha=0.0, beta=beta, skew=skew)
    labels = torch.zeros(int(mask.sum()), dtype=torch.long)
    total, terms = objective_sums(student[mask], lambda x: x, labels, [target], spec, chunk=2)
    return total / mask.sum()


def _setup(temperature, k=V, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(N, V, dtype=torch.float64, generator=g).mul(2).requires_grad_()
    teacher = torch.randn(N, V, dtype=torch.float64, generator=g).mul(2)
    log_p = torch.log_softmax(teacher / temperature, -1)
    ids = torch.argsort(torch.rand(N, V, generator=g), -1)[:, :k]  # any order works
    if k < V:
        ids = log_p.topk(k, -1).indices
    return student, log_p, ids, log_p.gather(-1, ids)


@pytest.mark.parametrize("kind", LOSSES.names())
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_full_k_equals_dense_values_and_gradients(kind, temperature):
    student, log_p, ids, lp = _setup(temperature)
    mask = torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool)
    sparse = sparse_divergence(
        student, ids, lp, mask, kind=kind, temperature=temperature, beta=0.3, skew=0.2
    )
    log_q = torch.log_softmax(student / temperature, -1)
    ref = dense(kind, log_p, log_q, beta=0.3, skew=0.2)
    ref = (ref * mask).sum() / mask.sum() * temperature**2
    torch.testing.assert_close(sparse, ref, rtol=1e-9, atol=1e-12)
    (g_sparse,) = torch.autograd.grad(sparse, student)
    (g_dense,) = torch.autograd.grad(ref, student)
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-7, atol=1e-10)
    assert torch.all(g_sparse[~mask] == 0)  # masked positions get no gradient


@pytest.mark.parametrize("kind", LOSSES.names())
def test_masked_positions_do_not_change_the_value(kind):
    student, _, ids, lp = _setup(1.0)
    mask = torch.tensor([1, 0, 1, 0, 1, 1], dtype=torch.bool)
    a = sparse_divergence(student, ids, lp, mask, kind=kind)
    other = student.detach().clone()
    other[~mask] += 5.0
    torch.testing.assert_close(a, sparse_divergence(other, ids, lp, mask, kind=kind))


@pytest.mark.parametrize("kind", LOSSES.names())
def test_zero_when_student_equals_teacher(kind):
    _, log_p, ids, lp = _setup(1.0)
    value = sparse_divergence(log_p.clone(), ids, lp, torch.ones(N, dtype=torch.bool), kind=kind)
    assert abs(float(value)) < 1e-10


@pytest.mark.parametrize("k", [1, 4, 12])
def test_top_k_is_a_finite_lower_bound_of_dense_forward_kl(k):
    student, log_p, ids, lp = _setup(1.0, k=k)
    sparse = per_position_divergence(student, ids, lp, kind="forward_kl")
    full = dense("forward_kl", log_p, torch.log_softmax(student, -1))
    assert torch.all(sparse >= -1e-12) and torch.all(sparse <= full + 1e-12)
    for kind in LOSSES.names():
        value = per_position_divergence(student, ids, lp.half().double(), kind=kind).sum()
        (grad,) = torch.autograd.grad(value, student)
        assert torch.isfinite(value) and torch.isfinite(grad).all(), kind


@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_objective_sums_ce_kd_blend_and_metrics(chunk):
    student, _, ids, lp = _setup(1.0)
    _, log_p2, ids2, lp2 = _setup(1.0, seed=1)
    labels = torch.arange(N) % V
    targets = [SparseTarget("a", ids, lp, 0.25), SparseTarget("b", ids2, lp2, 0.75)]
    ce_ref = torch.nn.functional.cross_entropy(student, labels, reduction="sum")
    kd_a = per_position_divergence(student, ids, lp, kind="jsd", temperature=2.0).sum()
    kd_b = per_position_divergence(student, ids2, lp2, kind="jsd", temperature=2.0).sum()
    kd_ref = (0.25 * kd_a + 0.75 * kd_b) * 4.0
    for alpha in (0.0, 0.3, 1.0):
        spec = LossSpec(kind="jsd", temperature=2.0, alpha=alpha)
        total, terms = objective_sums(student, lambda x: x, labels, targets, spec, chunk=chunk)
        torch.testing.assert_close(total, alpha * ce_ref + (1 - alpha) * kd_ref)
        torch.testing.assert_close(terms["loss"], total.detach().double())
        torch.testing.assert_close(terms["ce"], ce_ref.detach().double())
        torch.testing.assert_close(terms["kd"], kd_ref.detach().double())
        fkl = per_position_divergence(student, ids2, lp2, kind="forward_kl", temperature=2.0)
        torch.testing.assert_close(terms["kl/b"], fkl.sum().detach().double())
        (g,) = torch.autograd.grad(total, student)
        ref = alpha * ce_ref + (1 - alpha) * kd_ref
        (g_ref,) = torch.autograd.grad(ref, student, retain_graph=True)
        torch.testing.assert_close(g, g_ref)


def test_weighted_terms_are_the_weighted_sum_of_each_term():
    """`terms`: each registered divergence to the same targets and CE, with its weight; the
    loss/alpha form is the same objective bit for bit."""
    student, _, ids, lp = _setup(1.0)
    labels = torch.arange(N) % V
    targets = [SparseTarget("a", ids, lp, 1.0)]
    ce = torch.nn.functional.cross_entropy(student, labels, reduction="sum")
    rkl = per_position_divergence(student, ids, lp, kind="reverse_kl", temperature=2.0).sum()
    fkl = per_position_divergence(student, ids, lp, kind="forward_kl", temperature=2.0).sum()
    terms = (("reverse_kl", 0.7), ("forward_kl", 0.3), ("ce", 0.1))
    spec = LossSpec(kind="jsd", temperature=2.0, alpha=0.0, terms=terms)
    total, parts = objective_sums(student, lambda x: x, labels, targets, spec, chunk=4)
    want = 0.1 * ce + 4.0 * (0.7 * rkl + 0.3 * fkl)  # T^2 = 4
    torch.testing.assert_close(total, want)
    torch.testing.assert_close(parts["kd"], (4.0 * (0.7 * rkl + 0.3 * fkl)).detach().double())
    (g,) = torch.autograd.grad(total, student)
    (g_ref,) = torch.autograd.grad(want, student)
    torch.testing.assert_close(g, g_ref)
    old = LossSpec(kind="reverse_kl", temperature=2.0, alpha=0.25)
    new = LossSpec(
        kind="jsd", temperature=2.0, alpha=0.0, terms=(("reverse_kl", 0.75), ("ce", 0.25))
    )
    a, _ = objective_sums(student, lambda x: x, labels, targets, old, chunk=4)
    b, _ = objective_sums(student, lambda x: x, labels, targets, new, chunk=4)
    assert torch.equal(a, b)


def test_chunked_head_gets_the_same_gradient():
    torch.manual_seed(0)
    feats = torch.randn(9, 8, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(8, V, bias=False, dtype=torch.float64)
    labels = torch.randint(0, V, (9,))
    with torch.no_grad():
        t_lp, t_ids = torch.log_softmax(torch.randn(9, V, dtype=torch.float64), -1).topk(5)
    spec = LossSpec(kind="reverse_kl", temperature=1.0, alpha=0.5)
    grads = []
    for chunk in (1, 4, 9):
        total, _ = objective_sums(feats, head, labels, [SparseTarget("t", t_ids, t_lp, 1.0)],
                                  spec, chunk=chunk)  # fmt: skip
        grads.append(torch.autograd.grad(total, [feats, head.weight]))
    for g in grads[1:]:
        torch.testing.assert_close(g[0], grads[0][0])
        torch.testing.assert_close(g[1], grads[0][1])


def test_chunk_positions_shrinks_with_vocab_and_teachers():
    assert chunk_positions(151936, 1) < chunk_positions(49152, 1)
    assert chunk_positions(49152, 3) < chunk_positions(49152, 1)
    assert chunk_positions(10**9, 4) == 1


def test_jsd_endpoints_follow_trl_and_skew_one_is_refused():
    student, _, ids, lp = _setup(1.0, k=5)
    fkl = per_position_divergence(student, ids, lp, kind="forward_kl")
    rkl = per_position_divergence(student, ids, lp, kind="reverse_kl")
    torch.testing.assert_close(per_position_divergence(student, ids, lp, kind="jsd", beta=0.0), fkl)
    torch.testing.assert_close(per_position_divergence(student, ids, lp, kind="jsd", beta=1.0), rkl)
    assert (
        float(per_position_divergence(student, ids, lp, kind="jsd", beta=1e-9).sum().detach())
        < 1e-6
    )
    for kind in ("skew_kl", "skew_reverse_kl"):
        with pytest.raises(ValueError, match="skew 1"):
            per_position_divergence(student, ids, lp, kind=kind, skew=1.0)


def test_bad_arguments_raise():
    student, _, ids, lp = _setup(1.0)
    with pytest.raises(ValueError, match="unknown loss .kl_fancy.; expected one of"):
        per_position_divergence(student, ids, lp, kind="kl_fancy")
    with pytest.raises(ValueError, match="beta"):
        per_position_divergence(student, ids, lp, kind="jsd", beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        per_position_divergence(student, ids, lp, kind="tvd", temperature=0.0)
