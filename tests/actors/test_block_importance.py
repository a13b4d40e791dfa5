"""Cutting a student by depth: the full cut is the source model, every_nth's rule, and the
block scores (an exact identity block scores 0 and is the one dropped)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from actors.block_importance import block_scores, keep_top
from actors.models import build_student, every_nth_layers, save_tiny_llama

LAYERS = 4


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    """A 4-layer tiny Llama whose block 2 is an exact identity: its attention and MLP write
    nothing into the residual stream (o_proj and down_proj are zero)."""
    path = str(tmp_path_factory.mktemp("block_importance") / "source")
    save_tiny_llama(path, seed=3, hidden=32, layers=LAYERS)
    model = AutoModelForCausalLM.from_pretrained(path)
    block = model.model.layers[2]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()
    model.save_pretrained(path)
    return path


def _rows() -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of token ids, right-padded (pad positions must not count)."""
    ids = torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    attn[1, 8:] = 0
    attn[2, 5:] = 0
    return ids, attn


@pytest.mark.parametrize("kept", [list(range(LAYERS)), every_nth_layers(LAYERS, 1)])
def test_a_student_keeping_every_layer_is_the_source_model(source, kept):
    ids, attn = _rows()
    full = AutoModelForCausalLM.from_pretrained(source).eval()
    student = build_student(source, kept).eval()
    with torch.no_grad():
        a = full(input_ids=ids, attention_mask=attn).logits
        b = student(input_ids=ids, attention_mask=attn).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("num_layers", "n", "kept"),
    [
        (12, 3, [0, 3, 6, 9, 11]),  # the last layer is always kept
        (12, 4, [0, 4, 8, 11]),
        (9, 4, [0, 4, 8]),  # 8 is the last already
        (6, 1, [0, 1, 2, 3, 4, 5]),
        (6, 6, [0, 5]),
        (1, 1, [0]),
    ],
)
def test_every_nth_keeps_the_multiples_of_n_and_the_last_layer(num_layers, n, kept):
    assert every_nth_layers(num_layers, n) == kept


def test_cosine_scores_match_the_models_hidden_states_and_ignore_padding(source):
    """Blocks 0..L-2: 1 - mean cos(hidden_states[i], hidden_states[i+1]) over the non-pad
    tokens (HF's last hidden state has the final norm applied, so the hooks are the ones
    that see the last block's own output)."""
    ids, attn = _rows()
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    scores = block_scores(model, ids, attn, "cosine", batch_size=2)
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states
    mask = attn.bool()
    for i in range(LAYERS - 1):
        a, b = hidden[i].double(), hidden[i + 1].double()
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)[mask]
        assert scores[i] == pytest.approx(1 - cos.mean().item(), abs=1e-9)


@pytest.mark.parametrize("score", ["cosine", "kl_drop"])
def test_an_identity_block_scores_zero_and_is_the_one_dropped(source, score):
    ids, attn = _rows()
    model = AutoModelForCausalLM.from_pretrained(source)
    scores = block_scores(model, ids, attn, score)
    assert len(scores) == LAYERS
    assert scores[2] == 0.0
    assert all(s > 1e-6 for i, s in enumerate(scores) if i != 2), scores
    assert keep_top(scores, LAYERS - 1) == [0, 1, 3]


def test_kl_drop_of_a_skipped_block_is_the_kl_to_the_model_without_it(source):
    """kl_drop of block 0 is KL(full || the 3 other blocks), the cut built from disk."""
    ids, attn = _rows()
    full = AutoModelForCausalLM.from_pretrained(source).eval()
    scores = block_scores(full, ids, attn, "kl_drop")
    without = build_student(source, [1, 2, 3]).eval()
    with torch.no_grad():
        p = torch.log_softmax(full(input_ids=ids, attention_mask=attn).logits, -1)
        q = torch.log_softmax(without(input_ids=ids, attention_mask=attn).logits, -1)
    kl = (p.exp() * (p - q)).sum(-1)[attn.bool()].mean().item()
    assert scores[0] == pytest.approx(kl, rel=1e-4)


def test_keep_top_keeps_the_original_order_and_the_earlier_of_a_tie():
    assert keep_top([0.1, 0.5, 0.3, 0.5], 2) == [1, 3]
    assert keep_top([0.2, 0.2, 0.2], 2) == [0, 1]
    assert keep_top([0.9, 0.1, 0.5], 3) == [0, 1, 2]
    with pytest.raises(ValueError):
        keep_top([0.1, 0.2], 3)
