"""The teacher scores exactly the loss positions, from its full logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from actors.batch import TokenBatch
from actors.teacher import TeacherActor


def _batch() -> TokenBatch:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 96, size=(3, 12)).astype(np.int32)
    attn = np.ones_like(ids, dtype=np.int8)
    attn[1, 9:] = 0  # a shorter, right-padded row
    loss = np.zeros_like(ids, dtype=bool)
    loss[0, 4:11] = True
    loss[1, 6:8] = True
    loss[2, 3:11] = True
    return TokenBatch(ids, attn, loss)


def test_score_matches_full_forward_at_loss_positions(tiny_models):
    teacher = TeacherActor(
        "t", tiny_models["teacher"], top_k=5, temperature=2.0, hidden_layers=(1,)
    )
    batch = _batch()
    sig = teacher.score(batch)
    assert sig.ids.shape == (batch.num_tokens, 5) == sig.logprobs.shape
    assert sig.hidden.layers[1].shape[0] == batch.num_tokens
    model = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"]).eval()
    ids, attn, mask = batch.to_torch(torch.device("cpu"))
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits / 2.0, -1)
    top_lp, top_ids = full[mask].topk(5, dim=-1)
    assert np.array_equal(sig.ids.astype(np.int64), top_ids.numpy())
    np.testing.assert_allclose(sig.logprobs.astype(np.float32), top_lp.numpy(), atol=5e-3)
    info = teacher.info()
    assert info["vocab_size"] == 96 and len(info["model_hash"]) == 16


def test_row_offsets_split_signals_by_rows():
    batch = _batch()
    assert batch.row_offsets().tolist() == [0, 7, 9, 17]
    assert batch.loss_columns().tolist() == list(range(3, 11))
    assert batch.trimmed().input_ids.shape == (3, 12)
    assert batch.rows(1, 2).trimmed().input_ids.shape == (1, 9)


def test_hidden_states_arrive_intact(ray_session, tiny_models):
    """The chosen layers' hidden states at the loss positions, float16, exactly as the model
    computes them; through the object store and row slicing they stay bit for bit."""
    import ray

    from actors.signal import HiddenStates

    path = tiny_models["teacher"]
    teacher = TeacherActor("t", path, top_k=5, temperature=1.0, hidden_layers=(0, 2))
    batch = _batch()
    sig = teacher.score(batch)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"]).eval()
    ids, attn, mask = batch.to_torch(torch.device("cpu"))
    with torch.no_grad():
        states = model.model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    want = {i: states.hidden_states[i][mask].numpy().astype(np.float16) for i in (0, 2)}
    back = ray.get(ray.put(sig))
    assert sorted(back.hidden.layers) == [0, 2]
    for layer, expected in want.items():
        assert expected.shape == (batch.num_tokens, 48)
        assert np.array_equal(back.hidden.layers[layer], expected)
        assert np.array_equal(back.rows(7, 9).hidden.layers[layer], expected[7:9])  # row 1
    assert back.nbytes == sig.ids.nbytes + sig.logprobs.nbytes + 2 * batch.num_tokens * 48 * 2
    with pytest.raises(ValueError, match="want \\[P, H\\] float16"):
        HiddenStates({1: np.zeros((3, 4), dtype=np.float32)})
    with pytest.raises(ValueError, match="different position counts"):
        HiddenStates({0: np.zeros((3, 4), np.float16), 1: np.zeros((2, 4), np.float16)})
