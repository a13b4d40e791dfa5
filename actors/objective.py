"""The distillation objective, one function for training, evaluation and tests.

It returns token SUMS, never means: the caller divides by the loss tokens of the whole
optimizer step (all micro-batches, all ranks), so the optimised objective is token-weighted
whatever the batching.

Memory does not grow with vocab x positions: the vocab projection runs over chunks of
positions from the hidden states, each chunk recomputed in backward (activation
checkpointing), so at most one chunk's [chunk, vocab] buffers live at a time, however many
positions and teachers there are. The KL metric comes out of the same pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from actors.batch import TokenBatch
from actors.losses import collapsed, covered, divergence
from actors.models import backbone, output_head

DEFAULT_CHUNK_BYTES = 256 * 2**20


@dataclass
class SparseTarget:
    """A top-k distribution at the loss positions (one teacher's, or a blend of several) and
    its weight per position. `temperature` None: the loss spec's. A target that does not
    `train` only reports its KL; one that does not `report` (a blend) only trains."""

    name: str
    ids: torch.Tensor  # [P, k] int64
    logprobs: torch.Tensor  # [P, k] float32, log_softmax(teacher logits / T); -inf: no entry
    weight: torch.Tensor | float  # [P] or one weight for every position
    temperature: float | None = None
    train: bool = True
    report: bool = True

    def chunk(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ids[a:b], self.logprobs[a:b]

    @staticmethod
    def compare(
        logits: torch.Tensor, ids: torch.Tensor, lp: torch.Tensor, temp: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log p, log q, covered) over the top-k and the tail."""
        log_p, log_q = collapsed(logits, ids, lp, temp)
        return log_p, log_q, covered(lp)


@dataclass
class DenseTarget:
    """A teacher's EXACT distribution over the whole vocab, rebuilt chunk by chunk from its
    final normalised hidden state and a frozen copy of its output head (`distill.signal:
    hidden`): no [positions x vocab] buffer beyond one chunk."""

    name: str
    hidden: torch.Tensor  # [P, H_teacher] float16, as shipped
    head: Callable[[torch.Tensor], torch.Tensor]  # frozen: [c, H] -> [c, V] logits
    weight: torch.Tensor | float
    temperature: float | None = None
    train: bool = True
    report: bool = True

    def chunk(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.hidden[a:b], self.hidden[a:b, :0]

    def compare(
        self, logits: torch.Tensor, hidden: torch.Tensor, _: torch.Tensor, temp: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log p, log q, covered) over the whole vocab; every position is covered."""
        dtype = torch.promote_types(logits.dtype, torch.float32)
        with torch.no_grad():
            teacher = self.head(hidden.to(logits.device)).to(dtype)
        log_p = torch.log_softmax(teacher / temp, dim=-1)
        log_q = torch.log_softmax(logits.to(dtype) / temp, dim=-1)
        return log_p, log_q, torch.ones(log_p.shape[0], dtype=torch.bool, device=log_p.device)


Target = SparseTarget | DenseTarget
CE = "ce"  # the hard-label term's name among a spec's `terms`


@dataclass(frozen=True)
class LossSpec:
    """The objective's terms: `kind` with weight 1 - alpha and CE with weight alpha, or, when
    `terms` is given, those (name, weight) pairs: divergences from LOSSES (each to the same
    teacher targets) and `ce`."""

    kind: str
    temperature: float
    alpha: float  # weight of hard-label CE; KD gets 1 - alpha
    beta: float = 0.5
    skew: float = 0.1
    terms: tuple[tuple[str, float], ...] = ()

    def weights(self) -> tuple[float, list[tuple[str, float]]]:
        """(CE's weight, [(divergence, weight)])."""
        if not self.terms:
            return self.alpha, [(self.kind, 1.0 - self.alpha)]
        ce = sum(w for name, w in self.terms if name == CE)
        return ce, [(name, w) for name, w in self.terms if name != CE]


def chunk_positions(vocab: int, teachers: int, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Positions per chunk so that the chunk's fp32 [chunk, vocab] buffers (logits, scaled
    logits, log-softmax, one scattered copy and its gradient per teacher) fit the budget."""
    buffers = 4 + 2 * teachers
    return max(1, budget_bytes // (4 * vocab * buffers))


def metric_names(targets: list[Target]) -> list[str]:
    reported = [t.name for t in targets if t.report]
    return ["loss", "ce", "kd", *[f"kl/{n}" for n in reported], *[f"cover/{n}" for n in reported]]


def _chunk_objective(
    head: Callable[[torch.Tensor], torch.Tensor],
    targets: list[Target],
    spec: LossSpec,
    grad: bool,
    want_logp: bool,
    logp_temperature: float,
    f: torch.Tensor,
    y: torch.Tensor,
    *tgt: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk of `objective_sums`: (loss sum, its stats, log p(label)); `tgt` holds
    (ids, log-probs, weights) per target for these positions. A function of its tensor
    arguments alone, so activation checkpointing can run it again in backward."""
    logits = head(f)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # >= fp32
    ce_weight, kinds = spec.weights()
    kd_weight = sum(w for _, w in kinds)
    with torch.set_grad_enabled(grad and (ce_weight > 0 or want_logp)):
        token_ce = F.cross_entropy(logits, y, reduction="none")
        ce = token_ce.sum()
    kd = logits.new_zeros(())
    kls, covers = [], []
    with torch.set_grad_enabled(grad and kd_weight > 0):
        for t, x, y_, w in zip(targets, tgt[0::3], tgt[1::3], tgt[2::3], strict=True):
            temp = t.temperature or spec.temperature
            log_p, log_q, cov = t.compare(logits, x, y_, temp)
            d = None
            if t.train:
                d = _divergences(log_p, log_q, spec, kinds, kd_weight)
                kd = kd + temp**2 * torch.where(cov, w.to(d.dtype) * d, 0.0).sum()
            if not t.report:
                continue
            if d is None or [k for k, _ in kinds] != ["forward_kl"]:
                d = divergence(log_p.detach(), log_q.detach(), kind="forward_kl")
            kls.append(torch.where(cov, d.detach(), 0.0).sum())
            covers.append(cov.sum().to(kls[-1].dtype))
    if kd_weight <= 0:
        loss = ce_weight * ce if ce_weight != 1 else ce
    elif ce_weight <= 0:
        loss = kd_weight * kd if kd_weight != 1 else kd
    else:
        loss = ce_weight * ce + kd_weight * kd
    stats = torch.stack([loss.detach(), ce.detach(), kd.detach(), *kls, *covers])
    logp = -token_ce
    if want_logp and logp_temperature != 1.0:
        with torch.set_grad_enabled(grad):
            logp = -F.cross_entropy(logits / logp_temperature, y, reduction="none")
    return loss, stats, logp


def _divergences(
    log_p: torch.Tensor,
    log_q: torch.Tensor,
    spec: LossSpec,
    kinds: list[tuple[str, float]],
    total: float,
) -> torch.Tensor:
    """[N] the divergence terms' weighted mean (their weights sum to `total`): the one
    divergence itself when there is one."""
    if len(kinds) == 1:
        return divergence(log_p, log_q, kind=kinds[0][0], beta=spec.beta, skew=spec.skew)
    parts = [
        (w / total) * divergence(log_p, log_q, kind=k, beta=spec.beta, skew=spec.skew)
        for k, w in kinds
        if w > 0
    ]
    return torch.stack(parts).sum(0)


def objective_sums(
    features: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    targets: list[Target],
    spec: LossSpec,
    *,
    chunk: int,
    logp_out: list[torch.Tensor] | None = None,
    logp_temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum over positions of alpha * CE + (1 - alpha) * sum_t T_t^2 w_t D_t (with `terms`:
    w_ce * CE + W * sum_t T_t^2 w_t D_t, D the divergences' weighted mean and W the sum of
    their weights), and the sums of each part (detached): `loss`, `ce`, `kd` (the
    divergence part before W), and per reported target `kl/<name>` (forward KL at its T over
    the positions it covers) and `cover/<name>` (how many it covers).

    features: [P, H] hidden states at the loss positions (or logits with an identity head);
    head: maps [c, H] -> [c, V] logits; labels: [P] gold next tokens. Where a target sent
    nothing (see `losses.covered`) its KD term is exactly 0, value and gradient, whatever
    its weight says: an all-empty row would otherwise read as "all mass in the tail" and
    push the student off the padding id. CE still trains there. `logp_out`, when given, receives
    log_softmax(logits / logp_temperature)[label] per position, chunk by chunk, with gradient
    (the RL terms of RLAIF use them in the same backward, at the rollouts' sampling T; at
    T = 1 they cost nothing extra: CE computes them). CE itself is always at T = 1.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    grad = torch.is_grad_enabled()
    total = features.new_zeros((), dtype=torch.promote_types(features.dtype, torch.float32))
    reported = [t for t in targets if t.report]
    metrics = features.new_zeros(3 + 2 * len(reported), dtype=torch.float64)  # on device
    n = features.shape[0]
    weights = [
        t.weight if torch.is_tensor(t.weight) else features.new_full((n,), float(t.weight))
        for t in targets
    ]

    one_chunk = partial(
        _chunk_objective, head, targets, spec, grad, logp_out is not None, logp_temperature
    )
    for a in range(0, n, chunk):
        b = a + chunk
        tgt = [x for t, w in zip(targets, weights, strict=True) for x in (*t.chunk(a, b), w[a:b])]
        args = (features[a:b], labels[a:b], *tgt)
        if grad:  # the loss draws no random numbers: no RNG state to keep per chunk
            loss, stats, logp = checkpoint(
                one_chunk, *args, use_reentrant=False, preserve_rng_state=False
            )
        else:
            loss, stats, logp = one_chunk(*args)
        if logp_out is not None:
            logp_out.append(logp)
        total = total + loss
        metrics += stats.double()
    return total, dict(zip(metric_names(targets), metrics.cpu().unbind(), strict=True))


@torch.no_grad()
def label_logprobs(
    model: torch.nn.Module, batch: TokenBatch, chunk: int, temperature: float = 1.0
) -> torch.Tensor:
    """log p(next token) at `temperature` at the batch's loss positions (row-major), the vocab
    projection over chunks of positions: a reference model's, or the check that an engine
    and the ranks compute the same after a sync."""
    device = next(model.parameters()).device
    ids, attn, mask = batch.to_torch(device)
    features = backbone(model)(input_ids=ids, attention_mask=attn).last_hidden_state[mask]
    labels = torch.roll(ids, shifts=-1, dims=1)[mask]
    head = output_head(model)
    out = [
        -F.cross_entropy(
            head(features[c : c + chunk]).float() / temperature,
            labels[c : c + chunk],
            reduction="none",
        )
        for c in range(0, features.shape[0], chunk)
    ]
    return torch.cat(out) if out else features.new_zeros(0)
