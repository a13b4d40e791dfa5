"""Chat rows: one BOS by behaviour, an end-of-turn target only for turns that ended, and the
teacher says why each response ended."""

from __future__ import annotations

import shutil

import pytest
import torch
from chat_tokenizers import build_tokenizer
from transformers import AutoModelForCausalLM, GenerationConfig

from actors.chat import (
    LENGTH,
    STOP,
    ChatEncodingError,
    adds_bos,
    encode_chat,
    encode_text,
    render_prompt_ids,
    split_finish,
    stop_token_ids,
)
from actors.teacher import TeacherActor

EOT = {"smollm": "<|im_end|>", "gemma": "<end_of_turn>", "bos_chatml": "<|im_end|>"}


def test_adds_bos_is_decided_by_what_the_tokenizer_does():
    assert adds_bos(build_tokenizer("gemma")) and adds_bos(build_tokenizer("bos_chatml"))
    smollm = build_tokenizer("smollm")
    assert smollm.bos_token_id is not None and not adds_bos(smollm)  # named, never added


@pytest.mark.parametrize("kind", ["smollm", "gemma", "bos_chatml"])
def test_a_finished_turn_ends_with_its_end_of_turn_token(kind):
    tok = build_tokenizer(kind)
    ids, start = encode_chat(tok, "hi", "Hello there.", finished=True)
    eot = tok.convert_tokens_to_ids(EOT[kind])
    assert ids[-1] == eot and ids[start:].count(eot) == 1
    assert tok.decode(ids[start:]) == f"Hello there.{EOT[kind]}"  # no "\n" after it
    assert ids[:start] == render_prompt_ids(tok, "hi")


@pytest.mark.parametrize("kind", ["smollm", "gemma", "bos_chatml"])
def test_a_turn_cut_by_the_limit_has_no_end_of_turn_token(kind):
    tok = build_tokenizer(kind)
    ids, start = encode_chat(tok, "hi", "Hello the", finished=False)
    assert tok.decode(ids[start:]) == "Hello the"
    assert ids[-1] == tok.convert_tokens_to_ids("e")


@pytest.mark.parametrize("kind", ["gemma", "bos_chatml"])
def test_bos_exactly_once_when_the_tokenizer_adds_it(kind):
    tok = build_tokenizer(kind)
    bos = tok.bos_token_id
    for finished in (True, False):
        ids, _ = encode_chat(tok, "hi", "yo", finished)
        assert ids[0] == bos and ids.count(bos) == 1
    prompt = render_prompt_ids(tok, "hi")
    assert prompt[0] == bos and prompt.count(bos) == 1
    text = encode_text(tok, "plain text")
    assert text[0] == bos and text.count(bos) == 1


def test_no_bos_when_the_tokenizer_adds_none():
    tok = build_tokenizer("smollm")
    ids, _ = encode_chat(tok, "hi", "yo", True)
    assert tok.bos_token_id not in ids
    assert tok.bos_token_id not in render_prompt_ids(tok, "hi") + encode_text(tok, "abc")


def test_without_a_template_eos_ends_a_finished_turn():
    tok = build_tokenizer("plain")
    ids, start = encode_chat(tok, "hi", "yo", True)
    assert tok.decode(ids) == "hi\nyo<eos>" and tok.decode(ids[start:]) == "yo<eos>"
    ids, start = encode_chat(tok, "hi", "yo", False)
    assert tok.decode(ids[start:]) == "yo"


def test_prompt_tokens_not_a_prefix_is_an_error():
    tok = build_tokenizer("merging")  # "\nZ" is one token: the prompt's last "\n" merges
    encode_chat(tok, "hi", "Hello", True)
    with pytest.raises(ChatEncodingError, match="prefix"):
        encode_chat(tok, "hi", "Zebra", True)


def test_stop_ids_come_from_generation_config_and_tokenizer():
    tok = build_tokenizer("gemma")  # eos <eos> = 2
    assert stop_token_ids(None, tok) == [2]
    assert stop_token_ids(6, tok) == [2, 6]
    assert stop_token_ids([6, 2], tok) == [2, 6]
    assert split_finish([9, 8, 6, 0, 0], [2, 6]) == ([9, 8], STOP)
    assert split_finish([9, 8, 7], [2, 6]) == ([9, 8, 7], LENGTH)


# -- the teacher writing text ---------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_teacher(tiny_models, tmp_path_factory):
    """The tiny teacher with a real SmolLM2-like tokenizer saved next to it."""
    folder = tmp_path_factory.mktemp("chat_teacher") / "teacher"
    shutil.copytree(tiny_models["teacher"], folder)
    build_tokenizer("smollm").save_pretrained(folder)
    return str(folder)


def _greedy(folder: str, prompt: str, n: int) -> list[int]:
    """The ids the model emits greedily after the rendered prompt, with no stop at all."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([render_prompt_ids(tok, prompt)])
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, -n:].tolist()


def _teacher(folder: str, eos: int | list[int] | None) -> TeacherActor:
    teacher = TeacherActor("t", folder, top_k=4, temperature=1.0)
    teacher.model.generation_config = GenerationConfig(eos_token_id=eos)
    return teacher


def test_teacher_reports_length_when_the_limit_cuts_the_response(chat_teacher):
    first = _greedy(chat_teacher, "hi", 1)[0]
    teacher = _teacher(chat_teacher, None)
    (out,) = teacher.generate(["hi"], {"max_new_tokens": 1, "temperature": 0.0})
    eos = teacher.tokenizer.eos_token_id
    assert out["finish_reason"] == (STOP if first == eos else LENGTH)


def test_teacher_reports_stop_when_it_emits_an_end_of_turn_id(chat_teacher):
    greedy = _greedy(chat_teacher, "hi", 3)
    teacher = _teacher(chat_teacher, [greedy[2]])  # the 3rd greedy id now ends the turn
    stops = set(stop_token_ids(greedy[2], teacher.tokenizer))
    out = teacher.generate(["hi", "a longer prompt"], {"max_new_tokens": 8, "temperature": 0.0})
    kept, _ = split_finish(greedy, stops)
    assert out[0]["finish_reason"] == STOP
    expected = teacher.tokenizer.decode(kept, skip_special_tokens=True).strip()
    assert out[0]["response"] == expected
    assert {o["finish_reason"] for o in out} <= {STOP, LENGTH}


def test_teacher_prompts_start_with_one_bos_when_the_tokenizer_adds_it(tiny_models, tmp_path):
    folder = tmp_path / "teacher"
    shutil.copytree(tiny_models["teacher"], folder)
    tok = build_tokenizer("gemma")
    tok.save_pretrained(folder)
    teacher = _teacher(str(folder), None)
    seen = {}
    real = teacher.model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return real(**kwargs)

    teacher.model.generate = spy
    teacher.generate(["hi", "a longer prompt"], {"max_new_tokens": 2})
    ids, attn = seen["input_ids"].tolist(), seen["attention_mask"].tolist()
    for ids_row, attn_row in zip(ids, attn, strict=True):
        row = [t for t, a in zip(ids_row, attn_row, strict=True) if a]
        assert row[0] == tok.bos_token_id and row.count(tok.bos_token_id) == 1
