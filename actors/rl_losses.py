"""RLAIF losses for a language-model student (pure torch): GRPO/RLOO, PPO clip, KL, DPO.

Inputs are per response token, flattened over the micro-batch: `logp` [P] is the student's
log-prob of the sampled token under the current weights (with grad), `old_logp` [P] the
behaviour log-prob recorded when the sample was written (older weights or another engine such
as vLLM), `ref_logp` [P] the frozen reference model's. `seq` [P] gives each token's sequence
(0..N-1); sequences come in groups of K consecutive samples of one prompt (group i // K).
Pass response tokens only: padding and prompt tokens must already be dropped.

Losses are token (or pair) SUMS, never means, and stats are detached float64 sums, so the
caller divides by a count of the whole optimizer step (response tokens, or DPO pairs) and the
result does not depend on how the step is cut into micro-batches. Signs: every loss is
minimised; a positive advantage pushes its tokens' log-probs up.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from actors.registry import Registry

Stats = dict[str, torch.Tensor]


def _float(x: torch.Tensor) -> torch.Tensor:
    """At least float32: exp of a bf16 log-ratio is too coarse for a clip at 1 +- 0.2."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[G, K] view of [N] rewards, refusing shapes that do not split into whole groups."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            f"group_size {group_size} must be >= 1 and divide the {rewards.numel()} rewards"
        )
    return _float(rewards.detach()).reshape(-1, group_size)


# (centred rewards [G, K], valid count per group [G, 1], scale, eps) -> advantages [G, K]
ADVANTAGES: Registry[Callable[[torch.Tensor, torch.Tensor, bool, float], torch.Tensor]] = Registry(
    "advantage estimator"
)


@ADVANTAGES.register("grpo")
def _grpo(centred: torch.Tensor, count: torch.Tensor, scale: bool, eps: float) -> torch.Tensor:
    if not scale:
        return centred
    std = (centred.square().sum(-1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
    return centred / (std + eps)


@ADVANTAGES.register("rloo")
def _rloo(centred: torch.Tensor, count: torch.Tensor, scale: bool, eps: float) -> torch.Tensor:
    return centred * count / (count - 1).clamp(min=1)


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    kind: str,
    eps: float = 1e-6,
    scale: bool = True,
) -> torch.Tensor:
    """[N] per-sequence advantages, baselined within each group of K samples of one prompt.

    grpo: (r - mean) / (std + eps), std the UNBIASED sample std over the group's valid
    rewards (divide by count - 1, ddof 1), as TRL's GRPOTrainer (torch.std) and veRL compute
    it. Std scaling up-weights low-variance groups (nearly solved or nearly hopeless prompts,
    where rewards differ only by judge noise); scale=False gives the Dr. GRPO advantage
    r - mean, which avoids that bias.
    rloo: r_i - mean of the other valid samples = c / (c - 1) * (r_i - mean) with c valid
    samples, an unbiased leave-one-out baseline; group_size 1 has no other sample and raises.

    A NaN reward (a dropped judgment) gets advantage 0 and is left out of its group's mean and
    std. Groups with fewer than 2 valid rewards, or with all valid rewards equal, get exactly
    0 (no NaN, no eps-sized noise). The result is detached: advantages are constants.
    """
    estimate = ADVANTAGES[kind]
    if kind == "rloo" and group_size < 2:
        raise ValueError(f"rloo needs group_size >= 2 (a leave-one-out baseline), got {group_size}")
    r = _groups(rewards, group_size)
    valid = ~r.isnan()
    count = valid.sum(-1, keepdim=True).to(r.dtype)
    r0 = r.nan_to_num(0.0)
    mean = r0.sum(-1, keepdim=True) / count.clamp(min=1)
    centred = torch.where(valid, r - mean, torch.zeros_like(r))
    hi = torch.where(valid, r, torch.full_like(r, -math.inf)).amax(-1, keepdim=True)
    lo = torch.where(valid, r, torch.full_like(r, math.inf)).amin(-1, keepdim=True)
    live = (count >= 2) & (hi > lo)  # [G, 1]: groups that carry a learning signal
    adv = estimate(centred, count, scale, eps)
    adv = torch.where(live & valid, adv, torch.zeros_like(adv))
    return adv.reshape(-1)


def policy_gradient_sums(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages_tok: torch.Tensor,
    clip_eps: float = 0.2,
    ratio_cap: float = 2.0,
) -> tuple[torch.Tensor, Stats]:
    """(loss summed over tokens, stats) of the PPO clipped surrogate, with dual clip.

    loss_t = -min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = exp(logp - old_logp) with grad
    through logp; on-policy (logp == old_logp) its gradient is -A d logp (REINFORCE). The clip
    is what handles staleness: once rho leaves the trust region in the direction A favours, the
    token's gradient is zero. `ratio_cap` is the dual clip (Ye et al. 2020): for A < 0 the loss
    is also bounded by -ratio_cap A, so a token far likelier now than when sampled (rho huge,
    typical of stale or other-engine samples) cannot dominate the step; math.inf disables it.

    `advantages_tok` [P] is the sequence advantage repeated over its tokens (detached here).
    The token-level sum gives longer responses more weight; divide by the total response tokens
    of the optimizer step (DAPO-style token-level normalisation), which avoids GRPO's per-sequence
    1/|o| length bias. Stats (detached sums): "clip_frac" tokens the PPO clip zeroes,
    "dual_clip_frac" tokens the dual clip zeroes, "ratio_mean" sum of rho, "tokens" P.
    """
    if not logp.shape == old_logp.shape == advantages_tok.shape:
        raise ValueError(
            f"shapes differ: logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)}, "
            f"advantages_tok {tuple(advantages_tok.shape)}"
        )
    if not 0.0 <= clip_eps < 1.0:
        raise ValueError(f"clip_eps must be in [0, 1), got {clip_eps}")
    if ratio_cap <= 1.0:
        raise ValueError(f"ratio_cap (dual clip) must be > 1, got {ratio_cap}")
    adv = _float(advantages_tok.detach())
    rho = (_float(logp) - _float(old_logp.detach())).exp()
    surrogate = torch.minimum(rho * adv, rho.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv)
    loss = -surrogate
    r = rho.detach()
    clipped = ((adv > 0) & (r > 1.0 + clip_eps)) | ((adv < 0) & (r < 1.0 - clip_eps))
    dual = torch.zeros_like(clipped)
    if math.isfinite(ratio_cap):
        dual = (adv < 0) & (r > ratio_cap)
        loss = torch.where(dual, -ratio_cap * adv, loss)  # constant there: no gradient
    stats = {
        "clip_frac": clipped.sum().double(),
        "dual_clip_frac": dual.sum().double(),
        "ratio_mean": r.sum().double(),
        "tokens": torch.tensor(float(r.numel()), dtype=torch.float64, device=r.device),
    }
    return loss.sum(), stats


KL_ESTIMATORS: Registry[Callable[[torch.Tensor], torch.Tensor]] = Registry("KL estimator")


@KL_ESTIMATORS.register("k1")
def _k1(d: torch.Tensor) -> torch.Tensor:
    return -d


@KL_ESTIMATORS.register("k2")
def _k2(d: torch.Tensor) -> torch.Tensor:
    return 0.5 * d.square()


@KL_ESTIMATORS.register("k3")
def _k3(d: torch.Tensor) -> torch.Tensor:
    return torch.expm1(d) - d  # expm1: exact near 0, where exp(d) - 1 loses digits


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """[P] per-token estimate of KL(pi || ref) from tokens sampled from pi (Schulman 2020),
    by the estimator registered under that name, of d = log(ref / pi).

    k1 = logp - ref (unbiased, can be negative); k2 = (logp - ref)^2 / 2 (biased, >= 0);
    k3 = exp(ref - logp) - (ref - logp) - 1 (unbiased and >= 0). All are 0 when logp == ref.
    The term goes into the LOSS (GRPO-style, coefficient and token sum applied by the caller),
    not into the reward, with gradient through logp. As loss gradients on on-policy samples
    (Tang & Munos 2025): k1's expected gradient is zero, k2's is grad KL(pi || ref), k3's is
    grad KL(ref || pi). k3 grows like exp(ref - logp) on tokens ref finds far likelier.
    """
    if logp.shape != ref_logp.shape:
        raise ValueError(f"shapes differ: logp {tuple(logp.shape)}, ref {tuple(ref_logp.shape)}")
    estimate = KL_ESTIMATORS[estimator]
    return estimate(_float(ref_logp.detach()) - _float(logp))


def dpo_sums(
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, Stats]:
    """(DPO loss summed over M pairs, stats); inputs are SEQUENCE log-prob sums [M].

    loss = -logsigmoid(beta ((chosen - ref_chosen) - (rejected - ref_rejected))) per pair
    (Rafailov et al. 2023); divide by the pairs of the whole optimizer step. Stats (detached
    sums): "margin" sum of the beta-scaled margins, "accuracy" pairs with margin > 0, "pairs" M.
    """
    shapes = {tuple(t.shape) for t in (chosen_logp, rejected_logp, ref_chosen, ref_rejected)}
    if len(shapes) != 1 or chosen_logp.dim() != 1:
        raise ValueError(f"DPO inputs must all be 1-D [M] of one shape, got {sorted(shapes)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen = _float(chosen_logp) - _float(ref_chosen.detach())
    rejected = _float(rejected_logp) - _float(ref_rejected.detach())
    margin = beta * (chosen - rejected)
    loss = -torch.nn.functional.logsigmoid(margin)
    m = margin.detach()
    stats = {
        "margin": m.sum().double(),
        "accuracy": (m > 0).sum().double(),
        "pairs": torch.tensor(float(m.numel()), dtype=torch.float64, device=m.device),
    }
    return loss.sum(), stats


def sequence_sums(values: torch.Tensor, seq: torch.Tensor, n: int) -> torch.Tensor:
    """[n] per-sequence sums of per-token `values` (e.g. DPO's sequence log-probs), with grad.

    Sequences with no token get 0. Sums, not means: DPO's log-prob is that of the whole text.
    """
    if values.shape != seq.shape or values.dim() != 1:
        raise ValueError(f"values {tuple(values.shape)} and seq {tuple(seq.shape)}: want [P]")
    return values.new_zeros(n).index_add(0, seq.long(), values)


def pairs_from_rewards(rewards: torch.Tensor, group_size: int) -> list[tuple[int, int]]:
    """(best, worst) global sample indices per group, for DPO pairs built from judged rollouts.

    A group gives a pair only when its best valid reward is strictly above its worst: groups
    with fewer than 2 valid (non-NaN) rewards or all-equal rewards carry no preference and are
    skipped. Ties for best or worst go to the lowest index (deterministic pairs).
    """
    r = _groups(rewards, group_size).cpu()
    pairs: list[tuple[int, int]] = []
    for g, row in enumerate(r.tolist()):
        valid = [(v, i) for i, v in enumerate(row) if not math.isnan(v)]
        if len(valid) < 2:
            continue
        best = min(valid, key=lambda vi: (-vi[0], vi[1]))
        worst = min(valid, key=lambda vi: (vi[0], vi[1]))
        if best[0] > worst[0]:
            pairs.append((g * group_size + best[1], g * group_size + worst[1]))
    return pairs
