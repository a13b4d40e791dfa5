"""Each aggregation against targets computed by hand on small known distributions.

Vocab V = 4. Teacher A sends ids (0, 1) with p = (0.6, 0.2): tail 0.2, spread as 0.1 on each
of the ids 2 and 3 it did not send. Teacher B sends (1, 2) with (0.5, 0.3): tail 0.2, 0.1 on
ids 0 and 3. So in full: A = (.6, .2, .1, .1), B = (.1, .5, .3, .1).
"""

from __future__ import annotations

import math

import pytest
import torch

from actors.aggregate import Context, aggregate, entropy, gold_logprob, mixture
from actors.losses import LOSSES, per_position_divergence
from actors.objective import LossSpec, SparseTarget, objective_sums

V = 4
A_FULL = [0.6, 0.2, 0.1, 0.1]
B_FULL = [0.1, 0.5, 0.3, 0.1]


def _target(name: str, ids: list[int], probs: list[float], weight: float = 1.0, n: int = 1):
    ids_t = torch.tensor([ids] * n)
    lp = torch.tensor([probs] * n).log()
    return SparseTarget(name, ids_t, lp, weight)


def _teachers(wa: float = 1.0, wb: float = 1.0, n: int = 1) -> list[SparseTarget]:
    return [
        _target("a", [0, 1], [0.6, 0.2], wa, n),
        _target("b", [1, 2], [0.5, 0.3], wb, n),
    ]


def _ctx(labels: list[int], rows: list[int] | None = None, **kw) -> Context:
    return Context(
        labels=torch.tensor(labels),
        rows=torch.tensor(rows if rows is not None else [0] * len(labels)),
        vocab=V,
        **kw,
    )


def _dense(t: SparseTarget) -> torch.Tensor:
    """[P, V] the full distribution a (blend) target stands for: its entries, and the tail
    spread over the ids it did not send (here only id 3 is outside the union)."""
    out = torch.zeros(t.ids.shape[0], V)
    valid = torch.isfinite(t.logprobs)
    for p in range(t.ids.shape[0]):
        for j in range(t.ids.shape[1]):
            if valid[p, j]:
                out[p, t.ids[p, j]] += t.logprobs[p, j].exp()
        rest = [i for i in range(V) if out[p, i] == 0]
        out[p, rest] = (1 - out[p].sum()) / len(rest)
    return out


def test_mean_is_the_even_mixture_on_the_union_with_spread_tails():
    blend = aggregate("mean", _teachers(), _ctx([0]))
    mixed = blend.targets[0]
    assert mixed.train and not mixed.report
    expected = [(a + b) / 2 for a, b in zip(A_FULL, B_FULL, strict=True)]  # .35 .35 .2 .1
    torch.testing.assert_close(_dense(mixed)[0], torch.tensor(expected))
    # id 1 was sent by both: one entry carries it, the duplicate is an empty (-inf) entry
    valid = torch.isfinite(mixed.logprobs[0])
    assert sorted(mixed.ids[0][valid].tolist()) == [0, 1, 2]
    assert set(mixed.ids[0][~valid].tolist()) <= {0, 1, 2}
    # the teachers stay as report-only targets (their KL is still logged)
    assert [t.name for t in blend.targets[1:]] == ["a", "b"]
    assert not any(t.train for t in blend.targets[1:])


def test_weighted_normalises_weights_that_do_not_sum_to_one():
    blend = aggregate("weighted", _teachers(3.0, 1.0), _ctx([0]))
    expected = [0.75 * a + 0.25 * b for a, b in zip(A_FULL, B_FULL, strict=True)]
    torch.testing.assert_close(_dense(blend.targets[0])[0], torch.tensor(expected))
    assert blend.top[:, 0].tolist() == [True, False]  # a counted most


def test_a_student_equal_to_the_mixture_has_zero_loss():
    mixed = aggregate("weighted", _teachers(3.0, 1.0), _ctx([0])).targets[0]
    student = _dense(mixed).log()
    d = per_position_divergence(student, mixed.ids, mixed.logprobs, kind="forward_kl")
    assert abs(float(d)) < 1e-6
    other = torch.tensor([A_FULL]).log()
    assert (
        float(per_position_divergence(other, mixed.ids, mixed.logprobs, kind="forward_kl")) > 0.01
    )


def test_entropy_and_gold_use_the_spread_tail():
    a = _target("a", [0, 1], [0.6, 0.2])
    h = -sum(p * math.log(p) for p in A_FULL)
    assert float(entropy(a, V)) == pytest.approx(h, rel=1e-5)
    assert float(gold_logprob(a, torch.tensor([3]), V)) == pytest.approx(math.log(0.1), rel=1e-5)
    assert float(gold_logprob(a, torch.tensor([1]), V)) == pytest.approx(math.log(0.2), rel=1e-5)


def test_confidence_by_entropy_weights_the_surer_teacher_more():
    h_a = -sum(p * math.log(p) for p in A_FULL)
    h_b = -sum(p * math.log(p) for p in B_FULL)
    tau = 0.5
    wa = math.exp(-h_a / tau) / (math.exp(-h_a / tau) + math.exp(-h_b / tau))
    blend = aggregate("confidence", _teachers(), _ctx([0], confidence_temperature=tau))
    expected = [wa * a + (1 - wa) * b for a, b in zip(A_FULL, B_FULL, strict=True)]
    torch.testing.assert_close(_dense(blend.targets[0])[0], torch.tensor(expected))
    assert h_a < h_b and blend.top[:, 0].tolist() == [True, False]


def test_confidence_by_gold_is_per_token():
    # token 1: A gives 0.2, B 0.5 -> weights 2/7, 5/7; token 3: both 0.1 -> even
    blend = aggregate("confidence", _teachers(n=2), _ctx([1, 3], confidence_by="gold"))
    dense = _dense(blend.targets[0])
    first = [2 / 7 * a + 5 / 7 * b for a, b in zip(A_FULL, B_FULL, strict=True)]
    second = [(a + b) / 2 for a, b in zip(A_FULL, B_FULL, strict=True)]
    torch.testing.assert_close(dense, torch.tensor([first, second]))
    assert blend.top[:, 0].tolist() == [False, True]  # b counted most at token 1
    assert blend.top.sum(0).tolist() == [1, 1]  # one teacher counts most at each position


def test_sum_of_losses_normalises_and_reweights_where_a_teacher_sent_nothing():
    a, b = _teachers(3.0, 1.0, n=2)
    b.logprobs[1] = -math.inf  # b has nothing at position 1 (a cross-tokenizer gap)
    blend = aggregate("sum_of_losses", [a, b], _ctx([0, 0]))
    ta, tb = blend.targets
    torch.testing.assert_close(ta.weight, torch.tensor([0.75, 1.0]))
    torch.testing.assert_close(tb.weight, torch.tensor([0.25, 0.0]))


def test_route_by_lowest_gold_cross_entropy_takes_whole_examples():
    # row 0's gold tokens are 0, 0 (A: 0.6, B: 0.1); row 1's are 1, 2 (A: .2/.1, B: .5/.3)
    blend = aggregate("route", _teachers(n=4), _ctx([0, 0, 1, 2], rows=[0, 0, 1, 1]))
    ta, tb = blend.targets
    assert ta.weight.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert tb.weight.tolist() == [0.0, 0.0, 1.0, 1.0]


def test_route_by_field_trains_each_teacher_where_it_scored():
    a, b = _teachers(n=3)
    a.logprobs[2] = -math.inf  # row 1 (position 2) was routed to b, rows 0 to a
    b.logprobs[:2] = -math.inf
    blend = aggregate("route", [a, b], _ctx([0, 0, 0], rows=[0, 0, 1], routed_by_field=True))
    assert blend.targets[0].weight.tolist() == [1.0, 1.0, 0.0]
    assert blend.targets[1].weight.tolist() == [0.0, 0.0, 1.0]


def test_objective_weights_per_position_and_reports_kl_where_covered():
    """The objective trains on per-position weights and reports each teacher's KL over the
    positions it covered (with the count)."""
    torch.manual_seed(0)
    logits = torch.randn(3, V, requires_grad=True)
    a, b = _teachers(n=3)
    b.logprobs[2] = -math.inf
    blend = aggregate("sum_of_losses", [a, b], _ctx([0, 1, 2]))
    spec = LossSpec(kind="forward_kl", temperature=1.0, alpha=0.0)
    total, terms = objective_sums(
        logits, lambda x: x, torch.tensor([0, 1, 2]), blend.targets, spec, chunk=2
    )
    d_a = per_position_divergence(logits, a.ids, a.logprobs, kind="forward_kl")
    d_b = per_position_divergence(logits, b.ids, b.logprobs, kind="forward_kl")
    expected = 0.5 * d_a[:2].sum() + 0.5 * d_b[:2].sum() + d_a[2]
    torch.testing.assert_close(total, expected)
    assert float(terms["cover/b"]) == 2 and float(terms["cover/a"]) == 3
    torch.testing.assert_close(terms["kl/b"].float(), d_b[:2].sum().detach())
    total.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_mixture_of_one_teacher_is_that_teacher():
    a = _target("a", [0, 1], [0.6, 0.2], n=2)
    mixed = mixture([a], torch.ones(1, 2), V)
    torch.testing.assert_close(_dense(mixed), torch.tensor([A_FULL, A_FULL]))


def _with_gaps(n: int = 5) -> list[SparseTarget]:
    """Both teachers at n positions; nobody covered positions 1 and 3 (a cross-tokenizer
    teacher's unaligned positions: -inf log-probs, ids 0 as the padding carries), and b
    alone left position 2 empty."""
    a, b = _teachers(3.0, 1.0, n=n)
    for t in (a, b):
        t.logprobs[[1, 3]] = -math.inf
        t.ids[[1, 3]] = 0
    b.logprobs[2] = -math.inf
    return [a, b]


def _subset(targets: list[SparseTarget], keep: torch.Tensor) -> list[SparseTarget]:
    return [SparseTarget(t.name, t.ids[keep], t.logprobs[keep], t.weight) for t in targets]


@pytest.mark.parametrize("kind", LOSSES.names())
@pytest.mark.parametrize("how", ["sum_of_losses", "mean", "weighted", "confidence", "route"])
def test_positions_no_teacher_covered_add_no_kd_and_no_gradient(how, kind):
    """The loss with uncovered positions equals the loss over the covered positions alone
    (KD), those positions get exactly zero KD gradient, and CE still trains there."""
    torch.manual_seed(0)
    logits = torch.randn(5, V, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 2, 1, 3, 2])
    rows = [0, 0, 0, 1, 1]
    keep = torch.tensor([True, False, True, False, True])
    targets = _with_gaps()
    full = aggregate(how, targets, _ctx(labels.tolist(), rows))
    alone = aggregate(how, _subset(targets, keep), _ctx(labels[keep].tolist(), [0, 0, 1]))
    only_kd = LossSpec(kind=kind, temperature=1.0, alpha=0.0, beta=0.3)
    kd, _ = objective_sums(logits[keep], lambda x: x, labels[keep], alone.targets, only_kd, chunk=2)
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
    for alpha in (0.0, 0.4):
        spec = LossSpec(kind=kind, temperature=1.0, alpha=alpha, beta=0.3)
        total, terms = objective_sums(logits, lambda x: x, labels, full.targets, spec, chunk=2)
        torch.testing.assert_close(terms["kd"], kd.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(total, alpha * ce + (1 - alpha) * kd, rtol=1e-12, atol=1e-12)
        (grad,) = torch.autograd.grad(total, logits)
        (grad_ce,) = torch.autograd.grad(alpha * ce, logits, retain_graph=True)
        if alpha == 0:
            assert torch.equal(grad[~keep], torch.zeros_like(grad[~keep])), grad[~keep]
        torch.testing.assert_close(grad[~keep], grad_ce[~keep], rtol=1e-12, atol=1e-12)
        assert grad[keep].abs().sum() > 0
