"""How several teachers combine into what the student trains on (`distill.aggregate`).

Every aggregation maps the teachers' sparse targets at a micro-batch's loss positions to
the targets the objective trains on, with a weight per position, and says which teacher
counted most at each position (the `share/<teacher>` metric):

- `sum_of_losses`: one divergence per teacher, weighted by the recipe's weights.
- `mean` / `weighted`: ONE target per position, the mixture sum_i w_i p_i of the teachers'
  temperature-scaled distributions on the union of their top-k ids; `mean` takes equal
  weights, `weighted` the recipe's.
- `confidence`: the same mixture with per-position weights w_i(t) proportional to
  weight_i * exp(c_i(t) / tau), c the teacher's certainty: minus the entropy of its
  distribution (`confidence_by: entropy`) or its log-probability of the gold token
  (`confidence_by: gold`); tau is `distill.confidence_temperature`. So the surer teacher
  counts more where it is surer.
- `route`: one teacher per example. With `distill.teacher_key` the data says which, and only
  that teacher scored the example (its signal covers only its rows); without it, the teacher
  with the lowest cross-entropy on the example's gold continuation.

Weights: the recipe's weights are normalised to sum to one, and at every position again over
the teachers that sent something there (a cross-tokenizer teacher may not cover a position):
the weights a position trains with sum to one where some teacher covered it and to zero where
none did. A position nobody covered adds nothing to the KD sum or its gradient, whatever the
aggregation (CE still trains there when alpha > 0).

The mass outside a teacher's top-k (the rule every aggregation uses): a teacher that sent k
ids spreads its tail mass 1 - sum(top-k) evenly over the V - k ids it did not send, so its
probability of an id outside its top-k is tail / (V - k), V the student's vocab. The mixture
lives on the union of the ids; its own tail is whatever mass is left, which is exactly the
mixture of the teachers' spread tails over the ids outside the union.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from actors.losses import covered
from actors.objective import DenseTarget, SparseTarget, Target
from actors.registry import Registry
from actors.signal import FINAL, TeacherSignal
from actors.specs import WorkerSpec


@dataclass
class Context:
    """What an aggregation may look at besides the targets."""

    labels: torch.Tensor  # [P] gold (or sampled) next token per loss position
    rows: torch.Tensor  # [P] the batch row of each loss position
    vocab: int  # the student's vocab
    confidence_by: str = "entropy"
    confidence_temperature: float = 1.0
    routed_by_field: bool = False


@dataclass
class Blend:
    targets: list[SparseTarget]  # what trains (and, for a mixture, what only reports)
    top: torch.Tensor  # [T, P] bool: the teacher with the largest weight at each position


# (the teachers' targets at the loss positions, context) -> what the student trains on
Aggregation = Callable[[list[SparseTarget], Context], Blend]
AGGREGATIONS: Registry[Aggregation] = Registry("aggregation")


def _tail(t: SparseTarget, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tail mass [P], ids not sent [P]) of a teacher's top-k."""
    valid = torch.isfinite(t.logprobs)
    mass = torch.where(valid, t.logprobs.exp(), 0.0).sum(-1)
    unsent = (vocab - valid.sum(-1)).clamp(min=1)
    return (1.0 - mass).clamp(min=0.0), unsent


def probs_at(t: SparseTarget, query: torch.Tensor, vocab: int) -> torch.Tensor:
    """[P, K] the teacher's probability of each query id: its own where it sent the id, its
    spread tail elsewhere."""
    valid = torch.isfinite(t.logprobs)
    match = (query[:, :, None] == t.ids[:, None, :]) & valid[:, None, :]
    p = torch.where(valid, t.logprobs.exp(), 0.0)
    sent = (match * p[:, None, :]).sum(-1)
    tail, unsent = _tail(t, vocab)
    return torch.where(match.any(-1), sent, (tail / unsent)[:, None])


def gold_logprob(t: SparseTarget, labels: torch.Tensor, vocab: int) -> torch.Tensor:
    """[P] log p(gold) under the tail rule (-inf where the teacher sent nothing)."""
    p = probs_at(t, labels[:, None], vocab)[:, 0]
    return torch.where(covered(t.logprobs), p.clamp(min=1e-30).log(), -math.inf)


def entropy(t: SparseTarget, vocab: int) -> torch.Tensor:
    """[P] entropy of the teacher's distribution under the tail rule."""
    valid = torch.isfinite(t.logprobs)
    lp = torch.where(valid, t.logprobs, 0.0)
    h = -(torch.where(valid, lp.exp() * lp, 0.0)).sum(-1)
    tail, unsent = _tail(t, vocab)
    spread = torch.where(tail > 0, tail * (tail.clamp(min=1e-30) / unsent).log(), 0.0)
    return h - spread


def mixture(targets: list[SparseTarget], weights: torch.Tensor, vocab: int) -> SparseTarget:
    """One target: sum_i weights[i] p_i on the union of the teachers' ids ([T, P] weights,
    summing to one where a position is covered, zero where it is not). Duplicate union
    entries (an id two teachers sent) become -inf entries that repeat it, as the loss
    expects. Its weight is 1 where some teacher covered the position and 0 where none did:
    there the mixture is empty and must train nothing."""
    ids = torch.cat([t.ids for t in targets], dim=-1)  # [P, K]
    valid = torch.cat([torch.isfinite(t.logprobs) for t in targets], dim=-1)
    same = (ids[:, :, None] == ids[:, None, :]) & valid[:, None, :]
    earlier = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool, device=ids.device).tril(-1)
    keep = valid & ~(same & earlier).any(-1)
    mixed = sum(w[:, None] * probs_at(t, ids, vocab) for w, t in zip(weights, targets, strict=True))
    any_kept = keep.any(-1, keepdim=True)
    first = ids.gather(-1, keep.float().argmax(-1, keepdim=True))  # the row's first kept id
    out_ids = torch.where(keep | ~any_kept, ids, first)
    out_lp = torch.where(keep, mixed.clamp(min=1e-30).log(), -math.inf)
    covering = (weights.sum(0) > 0).float()
    return SparseTarget("blend", out_ids, out_lp.float(), covering, report=False)


def _normalised(raw: torch.Tensor) -> torch.Tensor:
    """[T, P] weights over the teachers at each position (zero where nobody is covered)."""
    total = raw.sum(0, keepdim=True)
    return torch.where(total > 0, raw / total.clamp(min=1e-30), 0.0)


def _covering(targets: list[SparseTarget], scale: list[float]) -> torch.Tensor:
    return torch.stack(
        [s * covered(t.logprobs).float() for s, t in zip(scale, targets, strict=True)]
    )


def _top(weights: torch.Tensor) -> torch.Tensor:
    """[T, P] one-hot of the (first) largest weight at covered positions."""
    top = torch.zeros_like(weights, dtype=torch.bool)
    best = weights.argmax(0)
    top[best, torch.arange(weights.shape[1], device=weights.device)] = True
    return top & (weights.sum(0, keepdim=True) > 0)


def _recipe_weights(targets: list[SparseTarget]) -> list[float]:
    w = [float(t.weight) for t in targets]
    total = sum(w)
    return [x / total for x in w]


def _reporting(targets: list[SparseTarget]) -> list[SparseTarget]:
    return [
        SparseTarget(t.name, t.ids, t.logprobs, 0.0, t.temperature, train=False) for t in targets
    ]


def _per_teacher(targets: list[SparseTarget], weights: torch.Tensor) -> Blend:
    trained = [
        SparseTarget(t.name, t.ids, t.logprobs, w, t.temperature)
        for t, w in zip(targets, weights, strict=True)
    ]
    return Blend(trained, _top(weights))


@AGGREGATIONS.register("sum_of_losses")
def sum_of_losses(targets: list[SparseTarget], ctx: Context) -> Blend:
    return _per_teacher(targets, _normalised(_covering(targets, _recipe_weights(targets))))


def _mixed(targets: list[SparseTarget], weights: torch.Tensor, ctx: Context) -> Blend:
    return Blend([mixture(targets, weights, ctx.vocab), *_reporting(targets)], _top(weights))


@AGGREGATIONS.register("mean")
def mean(targets: list[SparseTarget], ctx: Context) -> Blend:
    return _mixed(targets, _normalised(_covering(targets, [1.0] * len(targets))), ctx)


@AGGREGATIONS.register("weighted")
def weighted(targets: list[SparseTarget], ctx: Context) -> Blend:
    return _mixed(targets, _normalised(_covering(targets, _recipe_weights(targets))), ctx)


@AGGREGATIONS.register("confidence")
def confidence(targets: list[SparseTarget], ctx: Context) -> Blend:
    """Softmax over teachers of log w_i + c_i / tau at each position."""
    if ctx.confidence_by == "gold":
        certainty = torch.stack([gold_logprob(t, ctx.labels, ctx.vocab) for t in targets])
    else:
        certainty = torch.stack([-entropy(t, ctx.vocab) for t in targets])
    logw = torch.tensor(_recipe_weights(targets), device=certainty.device).log()[:, None]
    score = logw + certainty / ctx.confidence_temperature
    score = torch.where(_covering(targets, [1.0] * len(targets)) > 0, score, -math.inf)
    weights = torch.where(torch.isfinite(score).any(0), torch.softmax(score, dim=0), 0.0)
    return _mixed(targets, weights.nan_to_num(0.0), ctx)


@AGGREGATIONS.register("route")
def route(targets: list[SparseTarget], ctx: Context) -> Blend:
    """By data field: each teacher covers only its examples. Else the teacher with the
    lowest mean cross-entropy on the example's gold tokens takes the whole example."""
    cover = _covering(targets, [1.0] * len(targets))
    if ctx.routed_by_field:
        return _per_teacher(targets, _normalised(cover))
    n_rows = int(ctx.rows.max()) + 1 if ctx.rows.numel() else 0
    ce = torch.full((len(targets), n_rows), math.inf, device=cover.device)
    for i, t in enumerate(targets):
        nll = -gold_logprob(t, ctx.labels, ctx.vocab)
        ok = torch.isfinite(nll)
        sums = torch.zeros(n_rows, device=cover.device).index_add_(0, ctx.rows[ok], nll[ok])
        count = torch.zeros(n_rows, device=cover.device).index_add_(
            0, ctx.rows[ok], torch.ones_like(nll[ok])
        )
        ce[i] = torch.where(count > 0, sums / count.clamp(min=1), math.inf)
    best = ce.argmin(0)[ctx.rows]  # [P]
    chosen = torch.arange(len(targets), device=cover.device)[:, None] == best[None, :]
    return _per_teacher(targets, _normalised(cover * chosen))


def aggregate(kind: str, targets: list[SparseTarget], ctx: Context) -> Blend:
    return AGGREGATIONS[kind](targets, ctx)


def signal_targets(
    signals: list[TeacherSignal],
    spec: WorkerSpec,
    ids: torch.Tensor,
    mask: torch.Tensor,
    vocab: int,
    train: bool = True,
    heads: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> tuple[list[Target], dict[str, float]]:
    """A micro-batch's targets as `spec.aggregate` combines the signals (training; with the
    recipe's weights) and how many positions each teacher counted most at; `ids`, `mask`:
    the micro-batch on the device. Evaluation (held-out teachers only, no peers) reads only
    each signal's KL. With `heads` (distill.signal: hidden, sum_of_losses) every teacher's
    exact distribution, rebuilt from its final hidden state."""
    weights = spec.teacher_weights if train else [0.0] * len(signals)
    if heads:
        return [
            DenseTarget(
                s.teacher,
                torch.from_numpy(s.hidden.layers[FINAL]).to(ids.device),
                heads[s.teacher],
                float(w),
                s.temperature,
                train,
            )
            for w, s in zip(weights, signals, strict=True)
        ], {}
    out = []
    for weight, sig in zip(weights, signals, strict=True):
        t_ids, t_lp = (x.to(ids.device) for x in sig.torch_targets())
        out.append(SparseTarget(sig.teacher, t_ids, t_lp, float(weight), sig.temperature, train))
    if not train:
        return out, {}
    ctx = Context(
        labels=torch.roll(ids, shifts=-1, dims=1)[mask],
        rows=torch.nonzero(mask)[:, 0],
        vocab=vocab,
        confidence_by=spec.confidence_by,
        confidence_temperature=spec.confidence_temperature,
        routed_by_field=spec.routed_by_field,
    )
    blend = aggregate(spec.aggregate, out, ctx)
    counts = blend.top.sum(1).tolist()
    top = {f"top/{t.name}": float(n) for t, n in zip(out, counts, strict=True)}
    return blend.targets, top
