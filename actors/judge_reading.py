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


@torch.inference_mode()
def hf_greedy(
    model: Any, rows: list[list[int]], pad: int, stops: list[int], max_new: int, batch_size: int
) -> list[list[int]]:
    """Greedy new ids per row of prompt ids (left-padded batches of similar length)."""
    out: list[list[int]] = [[] for _ in rows]
    device = next(model.parameters()).device
    for chunk in batches([len(r) for r in rows], batch_size):
        ids, attn = left_pad([rows[i] for i in chunk], pad, device)
        gen = model.generate(
            input_ids=ids,
            attention_mask=attn,
            max_new_tokens=max_new,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad,
            eos_token_id=stops or None,
        )
        for i, row in zip(chunk, gen[:, ids.shape[1] :].tolist(), strict=True):
            out[i] = row
    return out


# -- the same readings from a vLLM engine (actors/vllm_backend.py): prompt log-probs at T = 1


def vllm_answer_probs(engine: Any, rows: list[list[int]], answer_ids: list[int]) -> torch.Tensor:
    """As `answer_probs`: each answer id appended to the row, its prompt log-prob read (the
    row's prefix is cached, so each answer costs one position)."""
    asked = [([*row, a], len(row)) for row in rows for a in answer_ids]
    lps = engine.prompt_logprobs([r for r, _ in asked], [s for _, s in asked])
    flat = torch.tensor([float(lp[0]) for lp in lps], dtype=torch.float64)
    return flat.reshape(len(rows), len(answer_ids)).exp()


def vllm_mean_logprobs(engine: Any, turns: dict[int, tuple[list[int], int]]) -> dict[int, float]:
    keys = list(turns)
    lps = engine.prompt_logprobs([turns[k][0] for k in keys], [turns[k][1] for k in keys])
    return {k: float(lp.mean()) for k, lp in zip(keys, lps, strict=True)}


def vllm_greedy(
    engine: Any, rows: list[list[int]], stops: list[int], max_new: int
) -> list[list[int]]:
    sampling = {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": max_new}
    return [s.response for s in engine.sample(rows, [0] * len(rows), sampling, stops)]
