"""The RLAIF objective of one micro-batch, outside the engine that runs it:
kd_weight * KD + rl_weight * (the algorithm's term) + kl_coef * KL(pi || ref)
+ sft_weight * CE(critique rewrites), in one backward.

An RL algorithm is a registered pair: what a step needs from its rewards (`plan`: GRPO/RLOO
advantages over whole groups, DPO pairs) and its term on one micro-batch (`term`). A new
algorithm is those two functions and a registration; `rlaif.algorithm` accepts the names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from actors.batch import TokenBatch
from actors.registry import Registry
from actors.rl_losses import (
    dpo_sums,
    group_advantages,
    kl_penalty,
    pairs_from_rewards,
    policy_gradient_sums,
    sequence_sums,
)
from actors.specs import RLSpec


@dataclass
class Micro:
    """One micro-batch's share of a step, as an algorithm's term reads it."""

    rows: tuple[int, int]  # its row range [a, b) in the rank's batch
    logp: torch.Tensor  # [P] the policy's log-probs of the sampled tokens (with grad)
    old_logp: torch.Tensor  # [P] the behaviour log-probs the samples were drawn with
    ref_logp: torch.Tensor  # [P] the frozen reference's
    seq: torch.Tensor  # [P] each position's row within the micro-batch
    scale: float  # world_size / the step's loss tokens
    world_size: int


@dataclass(frozen=True)
class RLAlgorithm:
    # (rewards [N], group size, settings) -> what every micro-batch of the step reads
    plan: Callable[[torch.Tensor, int, RLSpec], dict[str, Any]]
    # (plan, micro-batch, settings) -> (its term, already scaled to the step; stats)
    term: Callable[[dict[str, Any], Micro, RLSpec], tuple[torch.Tensor, dict]]
    min_group: int = 2  # samples per prompt it compares (1: it reads each sample alone)


ALGORITHMS: Registry[RLAlgorithm] = Registry("RL algorithm")


def _advantage_plan(kind: str) -> Callable[[torch.Tensor, int, RLSpec], dict]:
    def plan(rewards: torch.Tensor, k: int, cfg: RLSpec) -> dict[str, Any]:
        return {"advantages": group_advantages(rewards, k, kind, scale=cfg.scale_std)}

    return plan


def _policy_gradient(plan: dict[str, Any], m: Micro, cfg: RLSpec):
    a, b = m.rows
    adv = plan["advantages"][a:b].to(m.logp.device, torch.float32)[m.seq]
    pg, st = policy_gradient_sums(m.logp, m.old_logp, adv, cfg.clip_eps)
    return pg * m.scale, {"rl/clip_frac": st["clip_frac"], "rl/ratio_mean": st["ratio_mean"]}


def _dpo_plan(rewards: torch.Tensor, k: int, cfg: RLSpec) -> dict[str, Any]:
    return {"pairs": pairs_from_rewards(rewards, k)}


def _dpo(plan: dict[str, Any], m: Micro, cfg: RLSpec):
    """Pairs whose both rows are in this micro-batch; normalised by the step's pairs."""
    a, b = m.rows
    pairs = [(i - a, j - a) for i, j in plan["pairs"] if a <= i < b and a <= j < b]
    stats: dict[str, Any] = {"rl/pairs": 0.0, "rl/margin": 0.0, "rl/accuracy": 0.0}
    if not pairs:
        return m.logp.new_zeros(()), stats
    seq_lp = sequence_sums(m.logp, m.seq, b - a)
    seq_ref = sequence_sums(m.ref_logp, m.seq, b - a)
    c = torch.tensor([p[0] for p in pairs], device=m.logp.device)
    r = torch.tensor([p[1] for p in pairs], device=m.logp.device)
    dpo, st = dpo_sums(seq_lp[c], seq_lp[r], seq_ref[c], seq_ref[r], cfg.dpo_beta)
    stats.update({f"rl/{k}": v for k, v in st.items()})
    return dpo * m.world_size / max(plan["step_pairs"], 1.0), stats


ALGORITHMS.register("grpo")(RLAlgorithm(_advantage_plan("grpo"), _policy_gradient))
ALGORITHMS.register("rloo")(RLAlgorithm(_advantage_plan("rloo"), _policy_gradient))
ALGORITHMS.register("dpo")(RLAlgorithm(_dpo_plan, _dpo))


def rl_plan(batch: TokenBatch, rl: dict[str, Any], cfg: RLSpec, parts: int) -> dict:
    """What every micro-batch of an RLAIF step needs: the algorithm's plan over this rank's
    whole groups, the behaviour log-probs and the critique rows split over `parts`
    micro-batches; the caller adds the step's pair and critique-token counts (all ranks)."""
    rewards = torch.as_tensor(np.asarray(rl["rewards"], dtype=np.float64))
    plan = ALGORITHMS[cfg.algorithm].plan(rewards, cfg.group_size, cfg)
    sft: TokenBatch | None = rl.get("sft")
    plan.update(
        old_logp=torch.from_numpy(np.asarray(rl["old_logp"])),
        sft=sft,
        sft_parts=np.array_split(np.arange(len(sft)), parts) if sft is not None else None,
        part=0,
        offsets=batch.row_offsets(),
    )
    return plan


def next_critique_rows(plan: dict[str, Any]) -> TokenBatch | None:
    """The critique rows that go with the next micro-batch (None: none)."""
    rows = None
    if plan["sft_parts"] is not None:
        idx = plan["sft_parts"][plan["part"]]
        if idx.size:
            rows = plan["sft"].rows(int(idx[0]), int(idx[-1]) + 1).trimmed()
    plan["part"] += 1
    return rows


def rl_objective(
    plan: dict[str, Any],
    cfg: RLSpec,
    m: Micro,
    kd: tuple[torch.Tensor, dict[str, Any]],
    sft: tuple[torch.Tensor, int] | None,
    tokens: int,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The micro-batch's whole objective and its detached terms. `kd`: the engine's KD sum
    and terms; `sft`: the critique rows' CE sum and token count; `tokens`: the micro-batch's
    loss tokens."""
    loss, terms = kd
    rl, stats = ALGORITHMS[cfg.algorithm].term(plan, m, cfg)
    kl = kl_penalty(m.logp, m.ref_logp, cfg.kl_estimator)
    total = cfg.kd_weight * loss * m.scale + cfg.rl_weight * rl
    total = total + cfg.kl_coef * kl.sum() * m.scale
    out = {**terms, **stats, "rl/kl_ref": kl.detach().sum()}
    out["rl/tokens"] = torch.tensor(float(tokens))
    if sft is not None:
        ce, sft_tokens = sft
        total = total + cfg.sft_weight * ce * m.world_size / max(plan["step_sft_tokens"], 1.0)
        out["rl/sft_ce"] = ce.detach()
        out["rl/sft_tokens"] = torch.tensor(float(sft_tokens))
    return total, out
