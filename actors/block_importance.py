"""How much each decoder block of a model matters, to cut a student by depth.

`cosine` is Minitron's block importance: 1 - cos(block input, block output) per token,
averaged over non-pad tokens (a block that leaves its input as it is scores 0). `kl_drop`
is the rise of the next-token KL(full model || the model with that block skipped), averaged
over non-pad tokens. Blocks are read through hooks on the decoder layers, so the scores
see exactly what each layer gets and returns (the last hidden state HF reports has the final
norm applied, so `output_hidden_states` cannot give the last block's output).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from transformers import PreTrainedModel

SCORES = ("cosine", "kl_drop")


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no decoder `layers` to score")
    return layers


def _hidden_in(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def _hooked(layer: torch.nn.Module, pre: Any, post: Any) -> Iterator[None]:
    handles = [
        layer.register_forward_pre_hook(pre, with_kwargs=True),
        layer.register_forward_hook(post, with_kwargs=True),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _batches(ids: torch.Tensor, attn: torch.Tensor, size: int) -> Iterator[tuple]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size], attn[start : start + size]


def _logits(model: PreTrainedModel, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    out = model(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False)
    return out.logits


@torch.no_grad()
def cosine_scores(
    model: PreTrainedModel, ids: torch.Tensor, attn: torch.Tensor, batch_size: int = 4
) -> list[float]:
    """1 - mean cos(h_in, h_out) per block over non-pad tokens, in float64 (an exact identity
    block sums exact ones and scores exactly 0)."""
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    seen: dict[Any, torch.Tensor] = {}  # block -> its input; "mask" -> the batch's non-pad

    def pre(i: int) -> Any:
        def hook(_m: Any, args: tuple, kwargs: dict) -> None:
            seen[i] = _hidden_in(args, kwargs).detach()

        return hook

    def post(i: int) -> Any:
        def hook(_m: Any, args: tuple, kwargs: dict, output: Any) -> None:
            a, b = seen.pop(i).double(), _hidden_out(output).detach().double()
            dot, na, nb = (a * b).sum(-1), (a * a).sum(-1), (b * b).sum(-1)
            cos = dot / torch.sqrt(na * nb).clamp_min(torch.finfo(torch.float64).tiny)
            sums[i] += cos[seen["mask"].to(cos.device)].sum().cpu()

        return hook

    count = 0
    with ExitStack() as stack:
        for i, layer in enumerate(layers):
            stack.enter_context(_hooked(layer, pre(i), post(i)))
        for b_ids, b_attn in _batches(ids, attn, batch_size):
            seen["mask"] = b_attn.bool()
            _logits(model, b_ids, b_attn)
            count += int(seen["mask"].sum())
    if count == 0:
        raise ValueError("no non-pad token to score the blocks on")
    return (1.0 - sums / count).tolist()


@contextmanager
def skipped(layer: torch.nn.Module) -> Iterator[None]:
    """The layer returns its input unchanged (it still runs: this works whatever the layer's
    signature and output form)."""
    held: list[torch.Tensor] = []

    def pre(_m: Any, args: tuple, kwargs: dict) -> None:
        held[:] = [_hidden_in(args, kwargs)]

    def post(_m: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        return (held[0], *output[1:]) if isinstance(output, tuple) else held[0]

    with _hooked(layer, pre, post):
        yield


@torch.no_grad()
def kl_drop_scores(
    model: PreTrainedModel, ids: torch.Tensor, attn: torch.Tensor, batch_size: int = 4
) -> list[float]:
    """Per block, mean KL(full || without the block) of the next-token distribution over
    non-pad tokens: one forward per block and batch (the logits of one batch at a time)."""
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    for b_ids, b_attn in _batches(ids, attn, batch_size):
        mask = b_attn.bool()
        full = torch.log_softmax(_logits(model, b_ids, b_attn).float(), -1)
        mask = mask.to(full.device)
        for i, layer in enumerate(layers):
            with skipped(layer):
                cut = torch.log_softmax(_logits(model, b_ids, b_attn).float(), -1)
            p = full.exp()
            kl = torch.where(p > 0, p * (full - cut), 0.0).sum(-1)
            sums[i] += kl[mask].double().sum().cpu()
        count += int(mask.sum())
    if count == 0:
        raise ValueError("no non-pad token to score the blocks on")
    return (sums / count).tolist()


def block_scores(
    model: PreTrainedModel,
    ids: torch.Tensor,
    attn: torch.Tensor,
    score: str = "cosine",
    batch_size: int = 4,
) -> list[float]:
    """One score per decoder block of `model` on rows `ids` (pad where `attn` is 0)."""
    if score not in SCORES:
        raise ValueError(f"score {score!r}: one of {SCORES}")
    model.eval()
    scorer = cosine_scores if score == "cosine" else kl_drop_scores
    return scorer(model, ids, attn, batch_size)


def keep_top(scores: list[float], n: int) -> list[int]:
    """The `n` highest-scoring blocks in their original order; a tie keeps the earlier."""
    if not 1 <= n <= len(scores):
        raise ValueError(f"keep {n} of {len(scores)} blocks")
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(ranked[:n])


def score_model(
    path: str,
    ids: torch.Tensor,
    attn: torch.Tensor,
    score: str,
    device: torch.device,
    dtype: torch.dtype,
) -> list[float]:
    """Load the whole model at `path` (once, for scoring only) and score its blocks; kl_drop
    holds [rows, positions, vocab] logits, so it takes one row at a time."""
    from actors.models import load_causal_lm

    model = load_causal_lm(path, dtype, device)
    try:
        return block_scores(model, ids, attn, score, batch_size=1 if score == "kl_drop" else 4)
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
