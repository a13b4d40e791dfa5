"""Figures of a student against a teacher on fixed rows: held-out KL, perplexity, top-1
agreement, greedy answer length. Pure model math, no recipe, no MLflow.

The vocab projection runs over chunks of loss positions (`objective.chunk_positions`), so
no [positions, vocab] buffer exists beyond one chunk, however many rows are scored. The
top-k KL is the training run's held-out KL, computed by the same functions: the teacher's
top-k as `signal.topk_signal` sends it (float16 log-probs) and the student's side by
`objective.objective_sums`, so `raydistill eval` and a run's `eval/kl` agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from actors.batch import TokenBatch, left_pad
from actors.chat import adds_bos, render_prompt_ids, split_finish, stop_token_ids
from actors.models import backbone, output_head
from actors.objective import LossSpec, SparseTarget, objective_sums
from actors.signal import topk_signal


@dataclass
class EvalSums:
    """Token sums over loss positions; `figures` turns them into per-token means."""

    positions: int = 0
    ce_student: float = 0.0
    ce_teacher: float = 0.0
    kl_dense: float = 0.0
    kl_topk: float = 0.0
    covered: int = 0  # positions the top-k target covers (all of them, for a live teacher)
    agree: int = 0

    def add(self, other: EvalSums) -> None:
        for key, value in asdict(other).items():
            setattr(self, key, getattr(self, key) + value)

    def figures(self) -> dict[str, float]:
        n = max(self.positions, 1)
        return {
            "kl_dense": self.kl_dense / n,
            "kl_topk": self.kl_topk / max(self.covered, 1),  # as the run's eval divides it
            "ppl_student": math.exp(min(self.ce_student / n, 50.0)),
            "ppl_teacher": math.exp(min(self.ce_teacher / n, 50.0)),
            "ce_student": self.ce_student / n,
            "ce_teacher": self.ce_teacher / n,
            "top1_agreement": self.agree / n,
            "positions": float(self.positions),
        }


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def chunk_sums(
    t_logits: torch.Tensor,
    s_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab: int,
    top_k: int,
    temperature: float,
) -> EvalSums:
    """One chunk of positions: teacher logits [c, >= vocab], student logits [c, V_s],
    gold next tokens [c]. The teacher's distribution is over its first `vocab` ids (rows
    past the tokenizer are padding it never sends); the student's over all of its ids."""
    t = t_logits[:, :vocab].float()
    s = s_logits.float()
    log_p = torch.log_softmax(t / temperature, dim=-1)
    log_q = torch.log_softmax(s / temperature, dim=-1)[:, :vocab]  # mass past vocab: p = 0
    dense = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum()
    k = min(top_k, vocab)
    chunk = max(t.shape[0], 1)
    signal = topk_signal(
        t, _identity, k=k, temperature=temperature, teacher="t", vocab_size=vocab, chunk=chunk
    )
    ids, lps = (x.to(s.device) for x in signal.torch_targets())
    target = SparseTarget("t", ids, lps, 0.0, temperature, train=False)
    spec = LossSpec(kind="forward_kl", temperature=temperature, alpha=1.0)
    _, sums = objective_sums(s, _identity, labels, [target], spec, chunk=chunk)
    return EvalSums(
        positions=int(labels.shape[0]),
        ce_student=float(sums["ce"]),
        ce_teacher=float(F.cross_entropy(t, labels, reduction="none").sum()),  # as the student's
        kl_dense=float(dense),
        kl_topk=float(sums["kl/t"]),
        covered=int(sums["cover/t"]),
        agree=int((t.argmax(-1) == s.argmax(-1)).sum()),
    )


@torch.no_grad()
def score_rows(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    batch: TokenBatch,
    *,
    vocab: int,
    top_k: int,
    temperature: float,
    chunk: int,
) -> EvalSums:
    """Both models' decoders run once over the rows; their vocab projections over chunks of
    `chunk` loss positions."""
    device = next(student.parameters()).device
    ids, attn, mask = batch.to_torch(device)
    t_feat = backbone(teacher)(input_ids=ids, attention_mask=attn).last_hidden_state[mask]
    s_feat = backbone(student)(input_ids=ids, attention_mask=attn).last_hidden_state[mask]
    labels = torch.roll(ids, shifts=-1, dims=1)[mask]
    t_head, s_head = output_head(teacher), output_head(student)
    out = EvalSums()
    for a in range(0, labels.shape[0], chunk):
        b = a + chunk
        part = chunk_sums(
            t_head(t_feat[a:b]),
            s_head(s_feat[a:b]),
            labels[a:b],
            vocab=vocab,
            top_k=top_k,
            temperature=temperature,
        )
        out.add(part)
    return out


@torch.no_grad()
def greedy_answers(
    model: Any,
    tok: Any,
    prompts: list[str],
    max_new_tokens: int,
    on_rows: Callable[[int], None] | None = None,
    batch_size: int = 8,
) -> list[list[int]]:
    """The model's greedy answer to each prompt (rendered as the teacher renders prompts it
    writes responses to), without its stop token: what `generate` would keep."""
    device = next(model.parameters()).device
    config = model.generation_config
    stops = stop_token_ids(config.eos_token_id, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (stops or [0])[0]
    add = adds_bos(tok)
    answers: list[list[int]] = []
    for a in range(0, len(prompts), batch_size):
        rows = [render_prompt_ids(tok, p, add) for p in prompts[a : a + batch_size]]
        ids, attn = left_pad(rows, pad, device)
        out = model.generate(
            input_ids=ids,
            attention_mask=attn,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad,
            eos_token_id=stops or None,
            use_cache=True,  # an exported student's config may say False (training)
        )
        answers += [split_finish(row, stops)[0] for row in out[:, ids.shape[1] :].tolist()]
        if on_rows is not None:
            on_rows(len(rows))
    return answers
