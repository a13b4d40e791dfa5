"""The bundled instruction set: the committed files are what the builder writes, no question
is in both splits, the held-out families have equal shares, and the sizes the RLAIF issue
asks for (>= 300 train, >= 100 held-out)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from actors.verifiers import FAMILIES, constraints_in
from orchestrator import instruction_set

DATA = Path(__file__).resolve().parents[2] / "recipes" / "data"


def test_the_committed_files_are_the_builders_output(tmp_path):
    paths = instruction_set.write(tmp_path)
    for name, path in paths.items():
        assert path.read_text() == (DATA / path.name).read_text(), name
    assert not list(tmp_path.glob("*.tmp"))


def test_splits_share_no_question_and_families_are_balanced():
    rows = {n: r for n, r in instruction_set.build().items()}
    assert len(rows["train"]) >= 300 and len(rows["heldout"]) >= 100
    train_q = {r["question"] for r in rows["train"]}
    held_q = {r["question"] for r in rows["heldout"]}
    assert not train_q & held_q
    assert not {r["prompt"] for r in rows["train"]} & {r["prompt"] for r in rows["heldout"]}
    shares = Counter(r["family"] for r in rows["heldout"])
    assert set(shares) == set(FAMILIES) and len(set(shares.values())) == 1, shares


def test_every_prompt_states_its_one_constraint():
    for row in (json.loads(line) for line in (DATA / "instructions_heldout.jsonl").open()):
        (found,) = constraints_in(row["prompt"])
        assert found.family == row["family"]
