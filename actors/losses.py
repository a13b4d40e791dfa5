"""Distillation losses on sparse top-k teacher targets (pure torch).

Mass outside the top-k: both distributions are collapsed onto k+1 outcomes, the teacher's
k ids plus one tail bucket for every other id. The teacher's tail is 1 - sum(top-k probs);
the student's tail is its exact mass on the ids outside the teacher's top-k (logsumexp over
those ids, not 1 - sum, for stability). Every divergence is computed on these k+1 outcomes,
so it is a lower bound of the dense divergence (data-processing inequality) and equals the
dense textbook formula exactly when k equals the vocab (both tails are then zero).

Entries with log-prob -inf carry nothing: a blend of teachers on the union of their ids, or
a cross-tokenizer teacher's ids that have no student piece, pad rows with them. Such an
entry must repeat an id present in its row (so the student's tail still excludes exactly the
row's ids); a row with no finite entry is "not covered" and the caller gives it no weight.

Both sides use temperature T (the teacher's log-probs arrive already at T); the divergence
is multiplied by T**2 so gradient scale does not shrink with T (Hinton et al.).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from actors.registry import Registry

_NEG = -1e30  # log 0 stand-in that keeps gradients finite


def collapsed(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log q) over k+1 outcomes, the last one the tail; at least float32."""
    if student_logits.dim() != 2 or teacher_ids.shape != teacher_logprobs.shape:
        raise ValueError(
            f"shapes: student_logits {tuple(student_logits.shape)} must be [N, V], teacher ids "
            f"{tuple(teacher_ids.shape)} and log-probs {tuple(teacher_logprobs.shape)} [N, k]"
        )
    if teacher_ids.shape[0] != student_logits.shape[0]:
        raise ValueError("student_logits and teacher targets differ in the number of positions")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # never below fp32
    logits = student_logits.to(dtype) / temperature
    log_z = torch.logsumexp(logits, dim=-1, keepdim=True)
    valid = torch.isfinite(teacher_logprobs)
    q_top = torch.where(valid, logits.gather(-1, teacher_ids) - log_z, _NEG)
    rest = logits.scatter(-1, teacher_ids, _NEG)  # finite fill: no NaN gradient when k == V
    q_tail = (torch.logsumexp(rest, dim=-1, keepdim=True) - log_z).clamp(min=_NEG)
    p_top = torch.where(valid, teacher_logprobs.to(dtype), _NEG)
    # float16 log-probs cannot resolve a tail below ~1e-3; a floor keeps reverse KL finite.
    # Where the row's ids are the whole vocab there is no tail, whatever rounding says.
    p_tail_mass = (1.0 - p_top.exp().sum(-1, keepdim=True)).clamp(min=1e-6)
    whole = valid.sum(-1, keepdim=True) >= student_logits.shape[-1]
    p_tail = torch.where(whole, _NEG, p_tail_mass.log())
    log_q = torch.cat([q_top, q_tail], dim=-1)
    log_p = torch.cat([p_top, p_tail], dim=-1)
    return log_p, log_q


def covered(teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """[N] bool: the positions where the teacher sent at least one entry."""
    return torch.isfinite(teacher_logprobs).any(-1)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum a (log a - log b), with 0 log 0 = 0 (where a is 0 the term is masked out)."""
    a = log_a.exp()
    term = torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a))
    return term.sum(-1)


def _mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w a + (1 - w) b), stable in log space."""
    if w <= 0:
        return log_b
    if w >= 1:
        return log_a
    return torch.logaddexp(log_a + math.log(w), log_b + math.log(1 - w))


@dataclass(frozen=True)
class LossParams:
    """The settings a divergence may read (`distill.beta`, `distill.skew`)."""

    beta: float = 0.5  # generalized JSD's mixture weight
    skew: float = 0.1  # skew KL's mixture weight (DistiLLM); below 1

    def __post_init__(self) -> None:
        for name, value in (("beta", self.beta), ("skew", self.skew)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")


# (log p teacher, log q student, params) -> [N] divergence, both on the same support
Divergence = Callable[[torch.Tensor, torch.Tensor, LossParams], torch.Tensor]
LOSSES: Registry[Divergence] = Registry("loss")


@LOSSES.register("forward_kl")
def forward_kl(log_p: torch.Tensor, log_q: torch.Tensor, params: LossParams) -> torch.Tensor:
    return _kl(log_p, log_q)


@LOSSES.register("reverse_kl")
def reverse_kl(log_p: torch.Tensor, log_q: torch.Tensor, params: LossParams) -> torch.Tensor:
    return _kl(log_q, log_p)


@LOSSES.register("jsd")
def jsd(log_p: torch.Tensor, log_q: torch.Tensor, params: LossParams) -> torch.Tensor:
    """Generalized JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 -
    beta) q. Its limit at beta 0 and 1 is identically zero, so, like TRL's
    `generalized_jsd_loss`, the endpoints mean forward KL (beta 0) and reverse KL (beta 1):
    a ported recipe trains on something."""
    beta = params.beta
    if beta == 0.0:
        return _kl(log_p, log_q)
    if beta == 1.0:
        return _kl(log_q, log_p)
    log_m = _mix(log_p, log_q, beta)
    return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)


def _skew(params: LossParams, name: str) -> float:
    if params.skew >= 1.0:
        raise ValueError(f"skew 1 makes {name} zero whatever the student does; use skew < 1")
    return params.skew


@LOSSES.register("skew_kl")
def skew_kl(log_p: torch.Tensor, log_q: torch.Tensor, params: LossParams) -> torch.Tensor:
    return _kl(log_p, _mix(log_p, log_q, _skew(params, "skew_kl")))


@LOSSES.register("skew_reverse_kl")
def skew_reverse_kl(log_p: torch.Tensor, log_q: torch.Tensor, params: LossParams) -> torch.Tensor:
    return _kl(log_q, _mix(log_q, log_p, _skew(params, "skew_reverse_kl")))


@LOSSES.register("tvd")
def tvd(log_p: torch.Tensor, log_q: torch.Tensor, params: LossParams) -> torch.Tensor:
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def divergence(
    log_p: torch.Tensor, log_q: torch.Tensor, *, kind: str, beta: float = 0.5, skew: float = 0.1
) -> torch.Tensor:
    """[N] divergence of kind `kind` (a name in LOSSES) between teacher log p and student
    log q (same support)."""
    return LOSSES[kind](log_p, log_q, LossParams(beta=beta, skew=skew))


def per_position_divergence(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    kind: str,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
) -> torch.Tensor:
    """[N] divergence per position from dense student logits, no T**2 and no mask."""
    log_p, log_q = collapsed(student_logits, teacher_ids, teacher_logprobs, temperature)
    return divergence(log_p, log_q, kind=kind, beta=beta, skew=skew)
