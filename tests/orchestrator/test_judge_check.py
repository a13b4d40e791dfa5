"""The judge check: corruptions of the teacher's answer, agreement (ties 1/2) per kind,
position bias of pairwise judges; a judge that answers at random is refused, by
`raydistill judge check` and at the start of a run, in one line and with exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tiny_kd_rlaif, write_recipe

from orchestrator.cli import EXIT_USAGE, main
from orchestrator.judge_check import (
    KINDS,
    comparisons,
    cut_in_half,
    pairwise_agreement,
    pointwise_agreement,
    reversed_words,
    sentence_repeated,
)

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
ANSWERS = ["Rain falls from clouds. It waters plants.", "Bees make honey from nectar."]
PROMPTS = ["Why does it rain?", "How do bees make honey?"]


def test_the_corruptions():
    assert reversed_words("a b c") == "c b a"
    assert cut_in_half("one two three four five") == "one two"
    assert sentence_repeated(ANSWERS[0]) == (
        "Rain falls from clouds. Rain falls from clouds. Rain falls from clouds. It waters plants."
    )
    c = comparisons(PROMPTS, ANSWERS)
    assert c.kinds == list(KINDS) * 2
    assert c.corrupted[3] == ANSWERS[1] and c.corrupted[7] == ANSWERS[0]  # another prompt's
    short = comparisons(["Q?", "R?"], ["Yes.", "No."])  # one word reversed is the same answer
    assert short.kinds == ["cut", "repeated", "other_prompt"] * 2


def test_pointwise_agreement_counts_ties_and_unusable_as_half():
    c = comparisons(PROMPTS, ANSWERS)
    n = len(c.kinds)
    perfect = pointwise_agreement(c, [1.0] * n, [0.0] * n)
    assert perfect["agreement"] == 1.0 and all(perfect[k] == 1.0 for k in KINDS)
    flat = pointwise_agreement(c, [5.0] * n, [5.0] * (n - 1) + [None])
    assert flat["agreement"] == 0.5
    wrong_on_cut = [0.0 if k == "cut" else 1.0 for k in c.kinds]
    f = pointwise_agreement(c, [0.5] * n, wrong_on_cut)
    assert f["cut"] == 1.0 and f["reversed"] == 0.0 and f["agreement"] == 0.25


def test_a_judge_that_always_answers_a_has_no_agreement_and_all_the_bias():
    c = comparisons(PROMPTS, ANSWERS)
    always_a = [(1.0, 0.0)] * len(c.kinds)  # original preferred when first, not when second
    f = pairwise_agreement(c, always_a)
    assert f["agreement"] == 0.5 and f["position_bias"] == 0.5
    good = pairwise_agreement(c, [(0.9, 0.8)] * len(c.kinds))
    assert good["agreement"] == 1.0 and good["position_bias"] == pytest.approx(0.05)


def _coin_recipe(tmp_path: Path, chat_models: dict[str, str]) -> Path:
    coin = [{"name": "coin", "function": "toy_judges:coin", "num_cpus": 0.1}]
    raw = tiny_kd_rlaif(tmp_path, chat_models, "quickstart_prompts.jsonl", 32, coin)
    return write_recipe(tmp_path, raw)


def test_a_judge_answering_at_random_is_refused(ray_session, chat_models, tmp_path, capsys):
    path = _coin_recipe(tmp_path, chat_models)
    assert main(["judge", "check", str(path)]) == EXIT_USAGE
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert "judges.0: judge coin agrees with the check in 0." in line, line
    assert "below min_agreement 0.7" in line
    assert "judge coin: agreement 0." in captured.out  # the figures per corruption kind
    assert main(["run", str(path)]) == EXIT_USAGE  # at the start of a run: the same line
    assert "judge coin agrees with the check" in capsys.readouterr().err
    assert not list((tmp_path / "runs").glob("kd_rlaif-*"))  # nothing half-written
