"""The judge reads ratings off the next-token distribution (an expected rating, never parsed
text), asks pairwise questions in both orders, and a function judge never raises per sample."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from chat_tokenizers import build_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.chat import render_prompt_ids
from actors.judge import (
    DEFAULT_RATING_TOKENS,
    DEFAULT_RUBRIC,
    PAIR_TOKENS,
    JudgeActor,
    rating_token_ids,
)
from actors.models import backbone

PROMPT, RESPONSE = "What is 2+2?", "It is 4."


@pytest.fixture(scope="module")
def judge_folder(tiny_models, tmp_path_factory):
    """The tiny teacher with a real SmolLM2-like tokenizer saved next to it."""
    folder = tmp_path_factory.mktemp("judge") / "judge"
    shutil.copytree(tiny_models["teacher"], folder)
    tok = build_tokenizer("smollm")
    assert len(tok) == AutoModelForCausalLM.from_pretrained(folder).config.vocab_size
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def uniform_folder(judge_folder, tmp_path_factory):
    """The same judge with a zero lm_head: every logit is 0, the next token is uniform."""
    folder = tmp_path_factory.mktemp("uniform") / "judge"
    shutil.copytree(judge_folder, folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    model.save_pretrained(folder)
    return str(folder)


def _rubric(prompt: str, response: str) -> str:
    return DEFAULT_RUBRIC.format(prompt=prompt, response=response, low="1", high="9")


def _next_logits(folder: str, text: str) -> torch.Tensor:
    """The next-token logits after the rendered text, from a plain unbatched forward."""
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([render_prompt_ids(tok, text)])).logits[0, -1]


def _expected(logits: torch.Tensor, ids: list[int], values: list[float]) -> tuple[float, float]:
    """(expected rating, rating mass) computed by hand from full-vocab logits."""
    probs = logits.double().softmax(-1)
    p = [float(probs[i]) for i in ids]
    mass = sum(p)
    return sum(pi * v for pi, v in zip(p, values, strict=True)) / mass, mass


# -- rating tokens ---------------------------------------------------------------------------


def test_rating_tokens_must_be_single_numeric_tokens():
    tok = build_tokenizer("smollm")
    ids = rating_token_ids(tok, DEFAULT_RATING_TOKENS)
    assert ids == [tok.convert_tokens_to_ids(t) for t in DEFAULT_RATING_TOKENS]
    assert len(tok("10", add_special_tokens=False)["input_ids"]) == 2  # char-level: "1", "0"
    with pytest.raises(ValueError, match="'10'"):
        rating_token_ids(tok, ["1", "5", "10"])
    with pytest.raises(ValueError, match="'x'"):
        rating_token_ids(tok, ["1", "x"])
    with pytest.raises(ValueError, match="'nan'"):
        rating_token_ids(tok, ["1", "nan"])


def test_a_judge_with_a_multi_token_rating_does_not_start(judge_folder):
    with pytest.raises(ValueError, match="'10'"):
        JudgeActor("j", judge_folder, rating_tokens=["1", "10"])


# -- expected-rating scores ------------------------------------------------------------------


def test_score_is_the_expected_rating_of_the_next_token(judge_folder):
    judge = JudgeActor("j", judge_folder, min_mass=0.0, batch_size=4)
    tok = judge.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in DEFAULT_RATING_TOKENS]
    values = [float(t) for t in DEFAULT_RATING_TOKENS]
    prompts = [PROMPT, "hi", "Write a much longer story about a cat that sat on a mat."]
    responses = [RESPONSE, "Hello!", "Once upon a time."]
    scores = judge.score(prompts, responses)  # rows of different length: left padding
    for p, r, got in zip(prompts, responses, scores, strict=True):
        want, mass = _expected(_next_logits(judge_folder, _rubric(p, r)), ids, values)
        assert 0 < mass < 0.99
        assert got == pytest.approx(want, abs=1e-5)
    assert judge.last_busy_s > 0
    (first,) = judge.score(prompts[:1], responses[:1])  # the same alone as in a batch
    assert first == pytest.approx(scores[0], abs=1e-5)

    unusable = JudgeActor("j", judge_folder, min_mass=0.99)
    assert unusable.score(prompts, responses) == [None, None, None]


def test_a_uniform_judge_rates_exactly_the_middle(uniform_folder):
    judge = JudgeActor("u", uniform_folder, min_mass=0.0)
    assert judge.score([PROMPT, "hi"], [RESPONSE, "yo"]) == [pytest.approx(5.0, abs=1e-9)] * 2
    # the digits hold 9 / V of the mass: below the default min_mass, so unusable
    assert JudgeActor("u", uniform_folder).score([PROMPT], [RESPONSE]) == [None]


def test_a_judge_with_known_logits_rates_as_computed(uniform_folder, tmp_path):
    """lm_head rows for "2" and "8" along the prompt's final hidden state: logits 10 and
    10 + ln 3 there, 0 everywhere else, so the rating is (2 * 1 + 8 * 3) / 4 plus a hair."""
    folder = tmp_path / "known"
    shutil.copytree(uniform_folder, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        ids = torch.tensor([render_prompt_ids(tok, _rubric(PROMPT, RESPONSE))])
        h = backbone(model)(input_ids=ids).last_hidden_state[0, -1]
        two, eight = tok.convert_tokens_to_ids("2"), tok.convert_tokens_to_ids("8")
        model.lm_head.weight[two] = 10.0 * h / h.dot(h)
        model.lm_head.weight[eight] = (10.0 + math.log(3.0)) * h / h.dot(h)
    model.save_pretrained(folder)

    digits = [tok.convert_tokens_to_ids(t) for t in DEFAULT_RATING_TOKENS]
    values = [float(t) for t in DEFAULT_RATING_TOKENS]
    want, mass = _expected(_next_logits(str(folder), _rubric(PROMPT, RESPONSE)), digits, values)
    assert mass > 0.99 and want == pytest.approx(6.5, abs=1e-3)
    (got,) = JudgeActor("k", str(folder)).score([PROMPT], [RESPONSE])  # default min_mass
    assert got == pytest.approx(want, abs=1e-5)


# -- pairwise --------------------------------------------------------------------------------


def test_pairwise_renders_both_orders(judge_folder):
    judge = JudgeActor("j", judge_folder, min_mass=0.0)
    first, swapped = judge._pairwise_prompts(PROMPT, "alpha", "beta")
    assert first != swapped
    assert first.index("alpha") < first.index("beta")
    assert swapped.index("beta") < swapped.index("alpha")

    seen = []
    real = judge._answer_probs

    def spy(texts, ids):
        seen.append((list(texts), list(ids)))
        return real(texts, ids)

    judge._answer_probs = spy
    judge.pairwise([PROMPT, "hi"], ["alpha", "a"], ["beta", "b"])
    ((texts, ids),) = seen
    assert ids == [judge.tokenizer.convert_tokens_to_ids(t) for t in PAIR_TOKENS]
    assert texts == [first, swapped, *judge._pairwise_prompts("hi", "a", "b")]


def test_pairwise_averages_both_orders(judge_folder):
    judge = JudgeActor("j", judge_folder, min_mass=0.0)
    prompts, a, b = [PROMPT, "hi"], [RESPONSE, "Hello there."], ["Five.", "no"]
    ab = judge.pairwise(prompts, a, b)
    ba = judge.pairwise(prompts, b, a)
    for x, y in zip(ab, ba, strict=True):
        assert x is not None and y is not None and 0 < x < 1
        assert x + y == pytest.approx(1.0, abs=1e-5)

    # by hand: P(A) with a first, P(B) with b first, each renormalised over A/B
    tok = judge.tokenizer
    ida, idb = (tok.convert_tokens_to_ids(t) for t in PAIR_TOKENS)
    first, swapped = judge._pairwise_prompts(prompts[0], a[0], b[0])
    l1, l2 = _next_logits(judge_folder, first), _next_logits(judge_folder, swapped)
    p1 = float(torch.sigmoid(l1[ida] - l1[idb]))
    p2 = float(torch.sigmoid(l2[idb] - l2[ida]))
    assert ab[0] == pytest.approx((p1 + p2) / 2, abs=1e-5)

    assert JudgeActor("j", judge_folder, min_mass=0.99).pairwise(prompts, a, b) == [None, None]


def test_a_uniform_judge_has_no_preference(uniform_folder):
    judge = JudgeActor("u", uniform_folder, min_mass=0.0)
    assert judge.pairwise([PROMPT], [RESPONSE], ["Five."]) == [pytest.approx(0.5, abs=1e-9)]


# -- function judges -------------------------------------------------------------------------


@pytest.fixture
def judge_module(tmp_path, monkeypatch):
    (tmp_path / "my_judges.py").write_text(
        "def share_of_a(sample, prompt):\n"
        "    return sample.count('a') / max(len(sample), 1)\n"
        "def boom(sample, prompt):\n"
        "    raise RuntimeError('no')\n"
        "def text(sample, prompt):\n"
        "    return 'x'\n"
        "def nan(sample, prompt):\n"
        "    return float('nan')\n"
        "def picky(sample, prompt):\n"
        "    if sample == 'bad':\n"
        "        raise KeyError(sample)\n"
        "    return len(prompt)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_judges"


def test_a_function_judge_scores_each_sample(judge_module):
    judge = JudgeActor("f", "", function=f"{judge_module}:share_of_a")
    assert judge.model is None
    assert judge.score(["p", "q"], ["aab", "bbbb"]) == [pytest.approx(2 / 3), 0.0]
    assert judge.info() == {
        "name": "f",
        "kind": "function",
        "model_hash": f"{judge_module}:share_of_a",
        "rating_tokens": DEFAULT_RATING_TOKENS,
    }
    with pytest.raises(ValueError, match="function"):
        judge.pairwise(["p"], ["a"], ["b"])
    with pytest.raises(ValueError, match="function"):
        judge.critique(["p"], ["a"])


def test_a_failing_function_gives_none_not_an_error(judge_module):
    for name in ("boom", "text", "nan"):
        judge = JudgeActor("f", "", function=f"{judge_module}:{name}")
        assert judge.score(["p", "q"], ["a", "b"]) == [None, None]
    picky = JudgeActor("f", "", function=f"{judge_module}:picky")
    assert picky.score(["abc", "abc", "ab"], ["ok", "bad", "ok"]) == [3.0, None, 2.0]
    assert picky.failures == 1


@pytest.mark.parametrize("spec", ["nomodule:fn", "my_judges:missing", "no_colon"])
def test_a_bad_function_spec_is_named(judge_module, spec):
    with pytest.raises(ValueError, match=spec):
        JudgeActor("f", "", function=spec)


# -- critique and info -----------------------------------------------------------------------


def test_critique_writes_at_most_max_new_tokens(judge_folder):
    judge = JudgeActor("j", judge_folder)
    out = judge.critique([PROMPT, "hi"], [RESPONSE, "Hello!"], max_new_tokens=5)
    assert len(out) == 2
    for text in out:
        assert text is None or (
            isinstance(text, str)
            and text
            and len(judge.tokenizer(text, add_special_tokens=False)["input_ids"]) <= 5
        )
    assert judge.last_busy_s > 0
    assert judge.critique([], []) == []


def test_model_judge_info_and_input_checks(judge_folder):
    judge = JudgeActor("j", judge_folder)
    info = judge.info()
    assert info["kind"] == "model" and info["name"] == "j"
    assert info["rating_tokens"] == DEFAULT_RATING_TOKENS and len(info["model_hash"]) == 16
    assert judge.score([], []) == [] and judge.pairwise([], [], []) == []
    with pytest.raises(ValueError, match="length"):
        judge.score(["a", "b"], ["x"])


def test_likelihood_is_the_mean_logprob_of_the_response_and_its_end_of_turn(judge_folder):
    """Batched and padded (responses of different lengths, batch size 2) it equals a plain
    forward of each turn alone, divided by the share of distinct word trigrams; the
    end-of-turn token is one of the tokens scored."""
    from actors.chat import encode_chat
    from actors.judge_reading import distinct_share

    responses = ["It is 4.", "Four, I think, but let me count again.", "4", "", "It is. " * 3]
    prompts = [PROMPT] * len(responses)
    judge = JudgeActor("j", judge_folder, batch_size=2)
    got = judge.likelihood(prompts, responses)
    tok = AutoTokenizer.from_pretrained(judge_folder)
    model = AutoModelForCausalLM.from_pretrained(judge_folder).eval()
    for response, value in zip(responses, got, strict=True):
        ids, start = encode_chat(tok, PROMPT, response, True)
        cut, _ = encode_chat(tok, PROMPT, response, False)
        assert len(ids) == len(cut) + 1  # the end-of-turn token is scored too
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        want = logp[start - 1 : -1].gather(-1, torch.tensor(ids[start:])[:, None]).mean()
        share = distinct_share(response)  # the repetition guard: 1/2 for the last one
        assert value == pytest.approx(float(want) / share, abs=1e-5)
    assert distinct_share("It is. " * 3) == 0.5 and distinct_share("a b") == 1.0
    assert judge.last_busy_s > 0 and judge.likelihood([], []) == []
