"""The data stream: deterministic per step, response-only loss masks that teach the end of a
turn only where the teacher ended one, a Parquet response cache, a seed-independent split."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from chat_tokenizers import build_tokenizer

from actors.batch import TokenBatch
from orchestrator.data import (
    Dataset,
    file_dataset,
    synthetic_dataset,
    teacher_responses,
    tokenize_records,
    writer_key,
)
from orchestrator.recipe import DataConfig, RecipeError


def _synthetic(seed: int = 3, **cfg) -> Dataset:
    return synthetic_dataset(
        DataConfig(seq_len=8, heldout=4, synthetic={"num_sequences": 20}, **cfg), 50, seed
    )


def test_batches_are_a_function_of_step_and_cover_each_epoch():
    data = _synthetic()
    assert len(data.train) == 20 and len(data.heldout) == 4
    again = Dataset(data.train, data.heldout, data.seed)
    for step in (0, 3, 7):
        np.testing.assert_array_equal(
            data.batch_for_step(step, 5).input_ids, again.batch_for_step(step, 5).input_ids
        )
    epoch = np.concatenate([data.batch_for_step(s, 5).input_ids for s in range(4)])
    assert len({row.tobytes() for row in epoch}) == len({r.tobytes() for r in data.train.input_ids})
    assert not data.train.loss_mask[:, -1].any() and data.train.loss_mask[:, :-1].all()


def _reference_rows(seed: int, n: int, step: int, batch_size: int) -> list[int]:
    """The former implementation: a fresh permutation for every row of every batch."""
    rows = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(i, n)
        rows.append(np.random.default_rng([seed, epoch]).permutation(n)[pos])
    return rows


def test_one_permutation_per_epoch_gives_the_same_batches_as_before():
    n = 7
    ids = np.arange(n, dtype=np.int32)[:, None].repeat(3, axis=1)
    rows = TokenBatch(ids, np.ones_like(ids, dtype=np.int8), np.ones_like(ids, dtype=bool))
    data = Dataset(rows, rows.rows(0, 1), seed=11)
    for batch_size in (1, 3, 7, 16):  # 16 > n: one batch spans three epochs
        for step in [*range(6), 40, 2]:  # forward, a jump (resume) and back again
            got = data.batch_for_step(step, batch_size).input_ids[:, 0].tolist()
            assert got == _reference_rows(11, n, step, batch_size)


def test_heldout_split_does_not_depend_on_the_run_seed():
    a, b = _synthetic(seed=0), _synthetic(seed=5)
    np.testing.assert_array_equal(a.heldout.input_ids, b.heldout.input_ids)
    np.testing.assert_array_equal(a.train.input_ids, b.train.input_ids)
    order_a, order_b = (d.batch_for_step(0, 20).input_ids.tobytes() for d in (a, b))
    assert order_a != order_b  # the run seed still orders the batches
    other = _synthetic(seed=0, split_seed=1)
    assert other.heldout.input_ids.tobytes() != a.heldout.input_ids.tobytes()


def test_file_split_does_not_depend_on_the_run_seed(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(12)))
    cfg = DataConfig(source="file", path=str(path), seq_len=16, heldout=3)
    tok = build_tokenizer("smollm")
    held = [
        file_dataset(cfg, tok, seed, None, tmp_path).heldout.input_ids.tobytes() for seed in (0, 9)
    ]
    assert held[0] == held[1]


# -- tokenization --------------------------------------------------------------------------


def _targets(batch: TokenBatch, row: int) -> list[int]:
    """Token ids the row is trained to predict (position t predicts token t+1)."""
    cols = batch.loss_mask[row].nonzero()[0]
    return batch.input_ids[row, cols + 1].tolist()


@pytest.mark.parametrize("kind", ["smollm", "gemma"])
def test_finished_responses_end_on_their_end_of_turn_token_cut_ones_on_their_text(kind):
    tok = build_tokenizer(kind)
    eot = tok.convert_tokens_to_ids("<|im_end|>" if kind == "smollm" else "<end_of_turn>")
    records = [
        {"prompt": "hi", "response": "Hello.", "finish_reason": "stop"},
        {"prompt": "hi", "response": "Hel", "finish_reason": "length"},
        {"prompt": "hi", "response": "Hello."},  # given in the data file: it ended
    ]
    batch, skipped, _ = tokenize_records(records, tok, 48)
    assert skipped == 0
    assert _targets(batch, 0) == tok("Hello.", add_special_tokens=False)["input_ids"] + [eot]
    assert _targets(batch, 1) == tok("Hel", add_special_tokens=False)["input_ids"]
    assert _targets(batch, 2) == _targets(batch, 0)
    for row in range(3):  # the last token is the last target: no "\n" after the EOT
        n = int(batch.attention_mask[row].sum())
        assert batch.loss_mask[row].nonzero()[0][-1] == n - 2


@pytest.mark.parametrize("kind", ["gemma", "bos_chatml", "smollm"])
def test_every_row_starts_with_one_bos_only_when_the_tokenizer_adds_it(kind):
    tok = build_tokenizer(kind)
    records = [{"prompt": "hi", "response": "yo"}, {"text": "plain text"}]
    batch, _, _ = tokenize_records(records, tok, 32)
    bos = tok.bos_token_id
    for row in batch.input_ids[batch.attention_mask.astype(bool).any(1)]:
        count = int((row == bos).sum())
        assert (count, row[0] == bos) == ((1, True) if kind != "smollm" else (0, False))


def test_rows_whose_prompt_is_not_a_token_prefix_are_dropped_and_reported(tmp_path, capsys):
    tok = build_tokenizer("merging")  # "\nZ" is one token
    records = [
        {"prompt": "hi", "response": "fine"},
        {"prompt": "hey", "response": "Zzz"},
        {"prompt": "yo", "response": "Zap"},
    ]
    batch, skipped, kept = tokenize_records(records, tok, 32)
    assert skipped == 2 and len(batch) == 1 and kept == [0]  # row 0's prompt stays with it
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "dropped 2 of 3" in out[0] and "row 1" in out[0]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records * 2))
    cfg = DataConfig(source="file", path=str(path), seq_len=32, heldout=1)
    data = file_dataset(cfg, tok, 0, None, tmp_path)
    assert data.skipped_rows == 4
    assert data.train_prompts == ["hi"] and data.heldout_prompts == ["hi"]


def test_examples_truncated_to_their_prompt_are_an_error():
    tok = build_tokenizer("plain")
    with pytest.raises(RecipeError, match="data.seq_len"):
        tokenize_records([{"prompt": "a long prompt", "response": "r"}], tok, 4)


# -- the response cache --------------------------------------------------------------------


def _writer(calls: list):
    def write(prompts):
        calls.append(list(prompts))
        return [
            {"response": p.upper(), "finish_reason": "length" if i % 2 else "stop"}
            for i, p in enumerate(prompts)
        ]

    return write


def test_teacher_responses_and_finish_reasons_are_cached_as_parquet(tmp_path):
    calls: list = []
    key = {**writer_key("abc", "tok1", "{{ x }}"), "max_new_tokens": 8}
    first = teacher_responses(["hi", "there"], _writer(calls), tmp_path, key)
    second = teacher_responses(["hi", "there"], _writer(calls), tmp_path, key)
    expected = [
        {"response": "HI", "finish_reason": "stop"},
        {"response": "THERE", "finish_reason": "length"},
    ]
    assert first == second == expected
    assert len(calls) == 1
    (cached,) = tmp_path.glob("responses-*.parquet")
    table = pq.read_table(cached)
    assert table.column("prompt").to_pylist() == ["hi", "there"]
    assert table.column("finish_reason").to_pylist() == ["stop", "length"]


@pytest.mark.parametrize(
    "other",
    [
        writer_key("other", "tok1", "{{ x }}"),  # another teacher's weights
        writer_key("abc", "tok2", "{{ x }}"),  # another tokenizer
        writer_key("abc", "tok1", "{{ y }}"),  # another chat template
        writer_key("abc", "tok1", None),
    ],
)
def test_another_writer_never_reuses_the_cache(tmp_path, other):
    calls: list = []
    teacher_responses(["hi"], _writer(calls), tmp_path, writer_key("abc", "tok1", "{{ x }}"))
    teacher_responses(["hi"], _writer(calls), tmp_path, other)
    assert len(calls) == 2


def test_teacher_written_rows_keep_their_finish_reason(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["ab", "cd", "ef"]))
    cfg = DataConfig(
        source="file", path=str(path), responses="teacher", seq_len=48, heldout=1, split_seed=3
    )
    tok = build_tokenizer("smollm")
    data = file_dataset(cfg, tok, 0, _writer([]), tmp_path / "cache", writer_key("m", "t", "c"))
    rows = TokenBatch(
        np.concatenate([data.train.input_ids, data.heldout.input_ids]),
        np.concatenate([data.train.attention_mask, data.heldout.attention_mask]),
        np.concatenate([data.train.loss_mask, data.heldout.loss_mask]),
    )
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    ends = sorted(_targets(rows, i)[-1] == eot for i in range(len(rows)))
    assert ends == [False, True, True]  # "CD" was cut by the limit


# -- unreadable data files: one line naming the file and line, exit 2, no run dir ---------


def _parquet(rows: dict) -> bytes:
    import io

    import pyarrow as pa

    buf = io.BytesIO()
    pq.write_table(pa.table(rows), buf)
    return buf.getvalue()


BAD_FILES = {
    "null text": ("rows.jsonl", b'{"text": "ok"}\n\n{"text": null}\n', "line 3: `text` is null"),
    "number prompt": ("rows.jsonl", b'{"prompt": 7}\n', "line 1: `prompt` is int, expected a"),
    "invalid utf-8": (
        "rows.jsonl",
        b'{"text": "ok"}\n{"text": "caf\xe9"}\n',
        "line 2: not valid UTF-8",
    ),
    "corrupt parquet": (
        "rows.parquet",
        b"PAR1 not really parquet PAR1",
        "not a readable Parquet file",
    ),
    "null text in parquet": (
        "rows.parquet",
        _parquet({"text": ["ok", None]}),
        "rows.parquet: row 2: `text` is null",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_an_unreadable_data_file_stops_the_run_in_one_line(tmp_path, tiny_models, capsys, case):
    from conftest import base_recipe, write_recipe

    from orchestrator.cli import main

    name, content, expected = BAD_FILES[case]
    (tmp_path / name).write_bytes(content)
    raw = base_recipe(tmp_path, tiny_models, data={"source": "file", "path": name})
    assert main(["run", str(write_recipe(tmp_path, raw))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and f"{name}: " in err[0], err
    assert not (tmp_path / "runs").exists()


def test_a_line_over_the_size_limit_stops_the_run_in_one_line(tmp_path, tiny_models, capsys):
    from conftest import base_recipe, write_recipe

    from orchestrator.cli import main
    from orchestrator.data import MAX_LINE_BYTES

    big = json.dumps({"text": "x" * MAX_LINE_BYTES})
    (tmp_path / "big.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + big + "\n")
    raw = base_recipe(tmp_path, tiny_models, data={"source": "file", "path": "big.jsonl"})
    assert main(["run", str(write_recipe(tmp_path, raw))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "big.jsonl: line 2: longer than 16 MiB" in err[0], err
    assert not (tmp_path / "runs").exists()


def test_jsonl_is_read_as_utf8_line_by_line(tmp_path):
    """A byte order mark is allowed; a U+2028 inside a string is text, not a line break (it
    used to split the row in two); a null response is no response."""
    from orchestrator.data import read_records

    path = tmp_path / "rows.jsonl"
    rows = [{"text": "caf\u00e9 \u2028 na\u00efve"}, {"prompt": "hi", "response": None}]
    path.write_bytes(
        b"\xef\xbb\xbf" + "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode()
    )
    assert read_records(str(path)) == rows
