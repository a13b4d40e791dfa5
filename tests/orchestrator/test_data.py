"""The data stream: deterministic per step, response-only loss masks, Parquet response cache."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from orchestrator.data import Dataset, synthetic_dataset, teacher_responses, tokenize_records
from orchestrator.recipe import DataConfig, RecipeError


def test_batches_are_a_function_of_step_and_cover_each_epoch():
    data = synthetic_dataset(
        DataConfig(seq_len=8, heldout=4, synthetic={"num_sequences": 20}), 50, 3
    )
    assert len(data.train) == 20 and len(data.heldout) == 4
    again = Dataset(data.train, data.heldout, data.seed)
    for step in (0, 3, 7):
        np.testing.assert_array_equal(
            data.batch_for_step(step, 5).input_ids, again.batch_for_step(step, 5).input_ids
        )
    epoch = np.concatenate([data.batch_for_step(s, 5).input_ids for s in range(4)])
    assert len({row.tobytes() for row in epoch}) == len({r.tobytes() for r in data.train.input_ids})
    assert not data.train.loss_mask[:, -1].any() and data.train.loss_mask[:, :-1].all()


class _CharTokenizer:
    """A real-enough tokenizer for masks: one id per character, no chat template."""

    pad_token_id = 0
    eos_token_id = 0
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) % 200 + 1 for c in text]}


def test_loss_mask_covers_only_the_response():
    batch = tokenize_records([{"prompt": "ab", "response": "xyz"}], _CharTokenizer(), 16)
    # tokens: a b \n x y z ; positions 2,3,4 predict x,y,z
    assert batch.loss_mask[0].nonzero()[0].tolist() == [2, 3, 4]
    assert batch.attention_mask[0].sum() == 6


def test_examples_truncated_to_their_prompt_are_an_error():
    with pytest.raises(RecipeError, match="data.seq_len"):
        tokenize_records([{"prompt": "a long prompt", "response": "r"}], _CharTokenizer(), 4)


def test_teacher_responses_are_cached_as_parquet(tmp_path):
    calls = []

    def write(prompts):
        calls.append(list(prompts))
        return [p.upper() for p in prompts]

    key = {"teacher_model_hash": "abc", "max_new_tokens": 8}
    first = teacher_responses(["hi", "there"], write, tmp_path, key)
    second = teacher_responses(["hi", "there"], write, tmp_path, key)
    assert first == second == ["HI", "THERE"] and len(calls) == 1
    (cached,) = tmp_path.glob("responses-*.parquet")
    assert pq.read_table(cached).column("prompt").to_pylist() == ["hi", "there"]
    teacher_responses(["hi", "there"], write, tmp_path, {**key, "teacher_model_hash": "other"})
    assert len(calls) == 2  # another teacher never reuses the cache
