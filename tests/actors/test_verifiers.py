"""The instruction verifiers on labelled fixtures: each family's constraint read back out of
the prompt it was written into, and a response that keeps it or breaks it."""

from __future__ import annotations

import pytest

from actors.verifiers import FAMILIES, Constraint, constraints_in, follows_instructions

# family, constraint, a response that keeps it, one that breaks it
FIXTURES = [
    ("at_most_words", Constraint("at_most_words", n=8), "Light scatters off air.", "word " * 9),
    ("at_least_words", Constraint("at_least_words", n=5), "one two three four five", "too few"),
    ("keyword", Constraint("keyword", word="energy"), "It stores Energy.", "It stores power."),
    ("lowercase", Constraint("lowercase"), "all small here.", "Not all small."),
    (
        "ending",
        Constraint("ending", phrase="Hope this helps."),
        "Rain falls. Hope this helps.  ",
        "Hope this helps. Rain falls.",
    ),
    ("sentences", Constraint("sentences", n=2), "It rains. Then it stops!", "One. Two. Three."),
    ("bullets", Constraint("bullets", n=2), "Steps:\n- dig\n- plant", "- dig\n- plant\n- water"),
]


def test_every_family_has_a_fixture():
    assert sorted(f for f, *_ in FIXTURES) == sorted(FAMILIES)


@pytest.mark.parametrize(
    ("family", "constraint", "good", "bad"), FIXTURES, ids=[f[0] for f in FIXTURES]
)
def test_a_constraint_is_read_back_and_checked(family, constraint, good, bad):
    prompt = f"Why does it rain? {constraint.text()}"
    assert constraints_in(prompt) == [constraint]
    assert follows_instructions(good, prompt) == 1.0
    assert follows_instructions(bad, prompt) == 0.0


def test_an_empty_answer_keeps_no_constraint():
    for _, constraint, _, _ in FIXTURES:
        assert follows_instructions("", f"Q? {constraint.text()}") == 0.0, constraint


def test_a_prompt_with_two_constraints_needs_both():
    prompt = f"Q? {Constraint('lowercase').text()} {Constraint('sentences', n=1).text()}"
    assert follows_instructions("just one.", prompt) == 1.0
    assert follows_instructions("Just one.", prompt) == 0.0
    assert follows_instructions("one. two.", prompt) == 0.0


def test_a_prompt_without_a_constraint_is_not_scored():
    with pytest.raises(ValueError, match="states no constraint"):
        follows_instructions("anything", "Why is the sky blue?")
