"""Reading judgments off a model: the next-token probabilities of answer tokens after a
rubric (score and pairwise judges), and the mean log-probability per token of a response
after its prompt (the likelihood judge), one response's positions through the output head
at a time (never a [batch, positions, vocab] buffer)."""

from __future__ import annotations

from typing import Any

import torch

from actors.batch import left_pad
from actors.models import backbone, output_head


@torch.inference_mode()
def mean_logprobs(
    model: Any, turns: dict[int, tuple[list[int], int]], pad: int, batch_size: int, device: Any
) -> dict[int, float]:
    """Per key of `turns` ((ids, where the response starts)): the mean over the response's
    ids of log p(id | the ids before it)."""
    out: dict[int, float] = {}
    keys = list(turns)
    head = output_head(model)
    for rows in batches([len(turns[k][0]) for k in keys], batch_size):
        chunk = [keys[r] for r in rows]
        width = max(len(turns[i][0]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attn = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):  # right-padded: every row's positions start at 0
            seq = turns[i][0]
            ids[row, : len(seq)] = torch.tensor(seq)
            attn[row, : len(seq)] = 1
        hidden = backbone(model)(
            input_ids=ids.to(device), attention_mask=attn.to(device)
        ).last_hidden_state
        for row, i in enumerate(chunk):
            seq, begin = turns[i]
            logp = head(hidden[row, begin - 1 : len(seq) - 1]).float().log_softmax(-1)
            target = torch.tensor(seq[begin:], device=logp.device)[:, None]
            out[i] = float(logp.gather(-1, target).mean())
    return out


def batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Row indices in batches of similar length (less padding), each at most batch_size."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def answer_probs(
    model: Any, rows: list[list[int]], answer_ids: list[int], pad: int, batch_size: int, device: Any
) -> torch.Tensor:
    """[len(rows), len(answer_ids)] float64 next-token probabilities (softmax over the full
    vocab) of the answer ids after each row of prompt ids."""
    out = torch.zeros((len(rows), len(answer_ids)), dtype=torch.float64)
    head = output_head(model)
    index = torch.tensor(answer_ids, dtype=torch.long, device=device)
    for chunk in batches([len(r) for r in rows], batch_size):
        ids, attn = left_pad([rows[i] for i in chunk], pad, device)
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        hidden = backbone(model)(
            input_ids=ids, attention_mask=attn, position_ids=positions
        ).last_hidden_state[:, -1]
        out[chunk] = head(hidden).float().softmax(-1)[:, index].double().cpu()
    return out


def distinct_share(text: str) -> float:
    """The share of a text's word trigrams that are distinct (1 below three words)."""
    words = text.split()
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return len(set(grams)) / len(grams) if grams else 1.0
