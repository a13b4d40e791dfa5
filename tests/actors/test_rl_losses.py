"""RLAIF losses against hand-computed values, gradient signs, clipping, NaN rewards, and the
additivity that makes token sums independent of micro-batching."""

from __future__ import annotations

import math

import pytest
import torch

from actors.rl_losses import (
    dpo_sums,
    group_advantages,
    kl_penalty,
    pairs_from_rewards,
    policy_gradient_sums,
    sequence_sums,
)

F64 = torch.float64


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def leaf(*values: float) -> torch.Tensor:
    return t(*values).requires_grad_()


# --- group_advantages ------------------------------------------------------------------------


def test_grpo_hand_values_unbiased_std():
    # groups [1, 2] (mean 1.5, sample std sqrt(0.5)) and [3, 6] (mean 4.5, std sqrt(4.5))
    r2 = 1 / math.sqrt(2.0)
    adv = group_advantages(t(1, 2, 3, 6), 2, "grpo", eps=0.0)
    torch.testing.assert_close(adv, t(-r2, r2, -r2, r2))
    # default eps only shrinks by std / (std + 1e-6)
    torch.testing.assert_close(group_advantages(t(1, 2, 3, 6), 2, "grpo"), adv, rtol=1e-5, atol=0)
    # [0, 3, 6]: mean 3, sample std sqrt((9 + 0 + 9) / 2) = 3 (population std would be sqrt 6)
    torch.testing.assert_close(group_advantages(t(0, 3, 6), 3, "grpo", eps=0.0), t(-1, 0, 1))


def test_grpo_std_is_torch_std_as_in_trl():
    """TRL's GRPOTrainer: (r - mean) / (rewards.view(-1, K).std(dim=1) + eps), torch's
    default unbiased std (ddof 1); veRL uses torch.std too."""
    rewards = torch.rand(5 * 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    g = rewards.view(-1, 4)
    want = ((g - g.mean(1, keepdim=True)) / (g.std(dim=1, keepdim=True) + 1e-6)).reshape(-1)
    torch.testing.assert_close(group_advantages(rewards, 4, "grpo"), want, rtol=1e-12, atol=0)


def test_grpo_unscaled_is_dr_grpo():
    adv = group_advantages(t(1, 2, 3, 6), 2, "grpo", scale=False)
    torch.testing.assert_close(adv, t(-0.5, 0.5, -1.5, 1.5))


def test_rloo_hand_values():
    # leave-one-out: 1 - 2, 2 - 1, 3 - 6, 6 - 3
    torch.testing.assert_close(group_advantages(t(1, 2, 3, 6), 2, "rloo"), t(-1, 1, -3, 3))
    # [0, 3, 6]: others' means 4.5, 3, 1.5 -> K / (K - 1) * (r - mean) = 1.5 * [-3, 0, 3]
    torch.testing.assert_close(group_advantages(t(0, 3, 6), 3, "rloo"), t(-4.5, 0, 4.5))


@pytest.mark.parametrize(("kind", "scale"), [("grpo", True), ("grpo", False), ("rloo", True)])
def test_all_equal_group_is_exactly_zero(kind, scale):
    # 0.1 * 3 / 3 != 0.1 in floating point: the zero must not come from r - mean
    adv = group_advantages(t(0.1, 0.1, 0.1, 1, 2, 3), 3, kind, scale=scale)
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]
    assert not adv.isnan().any()
    assert (adv[3:] != 0).sum() == 2  # the live group still has signal (middle is 0)
    adv32 = group_advantages(torch.full((4,), 0.7, dtype=torch.float32), 4, kind, scale=scale)
    assert adv32.tolist() == [0.0] * 4


def test_nan_rewards_excluded_and_zeroed():
    nan = math.nan
    rewards = t(nan, 1, 3, 5, nan, nan)
    # group 0: valid [1, 3], mean 2, sample std sqrt 2; group 1: one valid reward -> all 0
    grpo = group_advantages(rewards, 3, "grpo", eps=0.0)
    r2 = 1 / math.sqrt(2.0)
    torch.testing.assert_close(grpo, t(0, -r2, r2, 0, 0, 0))
    rloo = group_advantages(rewards, 3, "rloo")
    torch.testing.assert_close(rloo, t(0, -2, 2, 0, 0, 0))
    all_nan = group_advantages(t(nan, nan), 2, "grpo")
    assert all_nan.tolist() == [0.0, 0.0]


def test_group_advantages_refusals_and_detach():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(t(1, 2, 3), 1, "rloo")
    with pytest.raises(ValueError, match="divide"):
        group_advantages(t(1, 2, 3), 2, "grpo")
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
        group_advantages(t(1, 2), 2, "ppo")
    assert group_advantages(t(1, 2, 3), 1, "grpo").tolist() == [0.0, 0.0, 0.0]
    assert not group_advantages(leaf(1, 2), 2, "grpo").requires_grad


# --- policy_gradient_sums --------------------------------------------------------------------


def test_on_policy_gradient_is_minus_advantage():
    logp = leaf(-1.0, -2.0, -0.5)
    adv = t(2.0, -1.0, 0.5)
    loss, stats = policy_gradient_sums(logp, logp.detach().clone(), adv)
    torch.testing.assert_close(loss, t(-1.5)[0])  # -sum(rho A) with rho = 1
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv)
    assert logp.grad[0] < 0  # positive advantage: raising logp lowers the loss
    assert logp.grad[1] > 0
    assert stats["clip_frac"].item() == 0
    assert stats["ratio_mean"].item() == pytest.approx(3.0)
    assert stats["tokens"].item() == 3


def test_ppo_clipping():
    # rho = 1.5, 0.5, 0.5, 1.5 with A = +1, +1, -1, -1; eps 0.2, dual clip off
    old = t(-1.0, -1.0, -1.0, -1.0)
    logp = (old + t(math.log(1.5), math.log(0.5), math.log(0.5), math.log(1.5))).requires_grad_()
    adv = t(1.0, 1.0, -1.0, -1.0)
    loss, stats = policy_gradient_sums(logp, old, adv, clip_eps=0.2, ratio_cap=math.inf)
    # per token: -min(1.5, 1.2) = -1.2 (clipped), -min(0.5, 0.8) = -0.5,
    #            -min(-0.5, -0.8) = 0.8 (clipped), -min(-1.5, -1.2) = 1.5
    assert loss.item() == pytest.approx(-1.2 - 0.5 + 0.8 + 1.5)
    loss.backward()
    # d loss / d logp = -A rho where unclipped, 0 where the clip holds
    torch.testing.assert_close(logp.grad, t(0.0, -0.5, 0.0, 1.5))
    assert stats["clip_frac"].item() == 2
    assert stats["dual_clip_frac"].item() == 0
    assert stats["ratio_mean"].item() == pytest.approx(4.0)


def test_dual_clip_bounds_negative_advantage():
    old = t(-3.0, -3.0, -3.0)
    logp = (old + t(math.log(3.0), math.log(1.5), math.log(3.0))).requires_grad_()
    adv = t(-1.0, -1.0, 1.0)
    loss, stats = policy_gradient_sums(logp, old, adv, clip_eps=0.2, ratio_cap=2.0)
    # A < 0, rho 3 > cap 2: loss capped at 2 (no grad); rho 1.5: 1.5; A > 0, rho 3: -1.2
    assert loss.item() == pytest.approx(2.0 + 1.5 - 1.2)
    loss.backward()
    torch.testing.assert_close(logp.grad, t(0.0, 1.5, 0.0))
    assert stats["dual_clip_frac"].item() == 1
    assert stats["clip_frac"].item() == 1
    with pytest.raises(ValueError, match="ratio_cap"):
        policy_gradient_sums(logp, old, adv, ratio_cap=1.0)
    with pytest.raises(ValueError, match="shapes"):
        policy_gradient_sums(logp, old[:2], adv)


# --- kl_penalty ------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_zero_at_equality(estimator):
    logp = leaf(-0.1, -2.0, -7.5)
    kl = kl_penalty(logp, logp.detach().clone(), estimator)
    assert kl.tolist() == [0.0, 0.0, 0.0]


def test_kl_hand_values_and_gradient():
    # pi = 0.5, ref = 0.25 on the sampled token: log(ref / pi) = -log 2
    logp = leaf(math.log(0.5))
    ref = t(math.log(0.25))
    l2 = math.log(2.0)
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(l2)  # 0.6931
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * l2**2)  # 0.2402
    k3 = kl_penalty(logp, ref, "k3")
    assert k3.item() == pytest.approx(0.5 + l2 - 1.0)  # 0.1931
    k3.sum().backward()
    assert logp.grad.item() == pytest.approx(1.0 - 0.5)  # 1 - ref / pi: pulls logp down to ref
    with pytest.raises(ValueError, match="estimator"):
        kl_penalty(logp, ref, "k4")  # type: ignore[arg-type]


def test_k3_nonnegative():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(1000, generator=g, dtype=F64) * 10
    ref = -torch.rand(1000, generator=g, dtype=F64) * 10
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    assert (kl_penalty(logp, ref, "k2") >= 0).all()
    assert (kl_penalty(logp, ref, "k1") < 0).any()  # k1 is unbiased but not pointwise >= 0


def test_kl_estimators_expectation_and_expected_gradient():
    """Exact expectation over a 3-outcome pi: values estimate KL(pi || ref) (k1, k3), and as
    losses k1 has zero expected gradient, k2 that of KL(pi || ref), k3 that of KL(ref || pi)."""
    logits = t(0.3, -0.2, 0.9).requires_grad_()
    ref = torch.log(t(0.4, 0.4, 0.2))
    logp = torch.log_softmax(logits, -1)
    pi = logp.exp().detach()  # sampling distribution: no score-function term
    kl_pi_ref = (pi * (logp.detach() - ref)).sum()
    for est in ("k1", "k3"):
        assert (pi * kl_penalty(logp.detach(), ref, est)).sum().item() == pytest.approx(
            kl_pi_ref.item()
        )

    def grad(fn):
        (g,) = torch.autograd.grad(fn(), logits)
        return g

    logp_fn = lambda: torch.log_softmax(logits, -1)  # noqa: E731
    expected = {
        "k1": torch.zeros(3, dtype=F64),
        "k2": grad(lambda: (logp_fn().exp() * (logp_fn() - ref)).sum()),
        "k3": grad(lambda: (ref.exp() * (ref - logp_fn())).sum()),
    }
    for est, want in expected.items():
        got = grad(lambda est=est: (pi * kl_penalty(logp_fn(), ref, est)).sum())
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-9)


# --- DPO -------------------------------------------------------------------------------------


def test_dpo_hand_values():
    # pair 0: (-10 - -12) - (-15 - -13) = 4 -> margin 0.4; pair 1: (-5 - -4) - (-6 - -8) = -3
    chosen = leaf(-10.0, -5.0)
    rejected = leaf(-15.0, -6.0)
    ref_c, ref_r = t(-12.0, -4.0), t(-13.0, -8.0)
    loss, stats = dpo_sums(chosen, rejected, ref_c, ref_r, beta=0.1)
    # -logsigmoid(0.4) = log(1 + e^-0.4) = 0.513015; -logsigmoid(-0.3) = log(1 + e^0.3) = 0.854355
    assert loss.item() == pytest.approx(0.5130152524 + 0.8543552444, abs=1e-9)
    assert stats["margin"].item() == pytest.approx(0.1)
    assert stats["accuracy"].item() == 1
    assert stats["pairs"].item() == 2
    loss.backward()
    assert (chosen.grad < 0).all()  # raising the chosen log-prob lowers the loss
    assert (rejected.grad > 0).all()
    # d/d chosen = -beta * sigmoid(-margin)
    torch.testing.assert_close(chosen.grad, -0.1 * torch.sigmoid(-t(0.4, -0.3)))
    torch.testing.assert_close(rejected.grad, -chosen.grad)


def test_dpo_at_reference_is_log2_and_refusals():
    x = t(-3.0, -4.0)
    loss, stats = dpo_sums(x, x - 1, x, x - 1, beta=0.5)
    assert loss.item() == pytest.approx(2 * math.log(2.0))
    assert stats["accuracy"].item() == 0
    with pytest.raises(ValueError, match="beta"):
        dpo_sums(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="shape"):
        dpo_sums(x, x[:1], x, x, beta=0.1)


# --- sequence_sums and pairs_from_rewards ----------------------------------------------------


def test_sequence_sums():
    values = leaf(1, 2, 3, 4, 5)
    seq = torch.tensor([0, 0, 2, 2, 2])
    out = sequence_sums(values, seq, 4)
    torch.testing.assert_close(out, t(3, 0, 12, 0))  # sequences 1 and 3 have no token
    out.sum().backward()
    torch.testing.assert_close(values.grad, t(1, 1, 1, 1, 1))


def test_pairs_from_rewards():
    nan = math.nan
    rewards = t(1, 3, 3, 0, 2, 2, 2, 2, nan, 1, nan, nan, nan, 4, 1, 4)
    # group 0: best 3 (tie 1, 2 -> 1), worst 0 at 3; group 1 all equal; group 2 one valid;
    # group 3: best 4 (tie 13, 15 -> 13), worst 1 at 14
    assert pairs_from_rewards(rewards, 4) == [(1, 3), (13, 14)]
    assert pairs_from_rewards(t(5, 0, 0), 3) == [(0, 1)]  # worst tie -> lowest index
    assert pairs_from_rewards(t(1, 1, 1, 1), 2) == []


# --- micro-batching independence -------------------------------------------------------------


def test_sums_are_additive_over_token_splits():
    g = torch.Generator().manual_seed(1)
    n, k, p = 4, 2, 23
    rewards = torch.rand(n, generator=g, dtype=F64)
    seq = torch.sort(torch.randint(0, n, (p,), generator=g)).values
    adv_tok = group_advantages(rewards, k, "grpo")[seq]
    logp = (-torch.rand(p, generator=g, dtype=F64) * 3).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(p, generator=g, dtype=F64)
    ref = logp.detach() + 0.3 * torch.randn(p, generator=g, dtype=F64)

    def total(idx):
        pg, stats = policy_gradient_sums(logp[idx], old[idx], adv_tok[idx])
        return pg + 0.05 * kl_penalty(logp[idx], ref[idx]).sum(), stats

    whole, whole_stats = total(slice(None))
    (g_whole,) = torch.autograd.grad(whole, logp)
    cut = 9
    first, s1 = total(slice(0, cut))
    second, s2 = total(slice(cut, None))
    torch.testing.assert_close(first + second, whole)
    (g_split,) = torch.autograd.grad(first + second, logp)
    torch.testing.assert_close(g_split, g_whole)
    for name, value in whole_stats.items():
        torch.testing.assert_close(s1[name] + s2[name], value)

    # DPO: sequence sums then pair sums, split over pairs
    seq_lp = sequence_sums(logp, seq, n)
    seq_ref = sequence_sums(ref, seq, n)
    c, r = torch.tensor([0, 2]), torch.tensor([1, 3])
    full, _ = dpo_sums(seq_lp[c], seq_lp[r], seq_ref[c], seq_ref[r], beta=0.1)
    a, _ = dpo_sums(seq_lp[c[:1]], seq_lp[r[:1]], seq_ref[c[:1]], seq_ref[r[:1]], beta=0.1)
    b, _ = dpo_sums(seq_lp[c[1:]], seq_lp[r[1:]], seq_ref[c[1:]], seq_ref[r[1:]], beta=0.1)
    torch.testing.assert_close(a + b, full)


# --- the log-probs the RL terms take, from the student's one forward ------------------------


def test_rl_logprobs_of_policy_and_reference_are_at_the_sampling_temperature():
    """The policy's log-probs in the RL terms (the student's forward, chunked, with grad)
    and the reference's are log_softmax(logits / T) at the rollouts' T = 0.7, the
    distribution the behaviour log-probs are of; the hard-label CE stays at T = 1."""
    from transformers import AutoModelForCausalLM

    from actors.batch import TokenBatch
    from actors.models import tiny_llama_config
    from actors.objective import LossSpec, label_logprobs
    from actors.student import DistillStudent

    temp = 0.7
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(tiny_llama_config(hidden=32, layers=1)).float()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (2, 9), generator=g)
    attn = torch.ones_like(ids)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, -1] = False
    mask[0, :3] = False  # a prompt: no loss there
    spec = LossSpec(kind="reverse_kl", temperature=1.0, alpha=1.0)
    # 2 positions per chunk (1536 bytes each at vocab 96): the log-probs come chunk by chunk
    student = DistillStudent(lm, spec, chunk_bytes=3 * 1536, logp_temperature=temp)
    loss, terms, extras = student(ids, attn, mask, [], True)
    logits = lm(input_ids=ids, attention_mask=attn).logits.float()
    labels = torch.roll(ids, -1, 1)[mask]
    want = torch.log_softmax(logits[mask] / temp, -1).gather(-1, labels[:, None])[:, 0]
    torch.testing.assert_close(extras["logp"], want, rtol=0, atol=1e-5)
    ce = torch.nn.functional.cross_entropy(logits[mask], labels, reduction="sum")
    torch.testing.assert_close(terms["ce"].float(), ce.detach(), rtol=1e-5, atol=1e-4)
    # the gradient the RL terms send back is that of the T-scaled log-probs
    (got,) = torch.autograd.grad(extras["logp"].sum(), lm.lm_head.weight)
    (ref,) = torch.autograd.grad(want.sum(), lm.lm_head.weight)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    # the frozen reference, at the same T
    batch = TokenBatch(ids.int().numpy(), attn.to(torch.int8).numpy(), mask.numpy())
    torch.testing.assert_close(label_logprobs(lm, batch, 2, temp), want.detach(), atol=1e-5, rtol=0)
    at_one = torch.log_softmax(logits[mask], -1).gather(-1, labels[:, None])[:, 0]
    assert (want - at_one).abs().max() > 0.05  # T = 0.7 and T = 1 really differ here
