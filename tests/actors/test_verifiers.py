"""The instruction verifiers on labelled fixtures: each family's constraint read back out of
the prompt it was written into, and a response that keeps it or breaks it."""

from __future__ import annotations

import pytest

from actors.verifiers import (
    FAMILIES,
    Constraint,
    constraints_in,
    follows_instructions,
    follows_instructions_graded,
)

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


# family, constraint, a response nearer to keeping it, one farther from it (both break it)
NEARER = [
    ("at_most_words", Constraint("at_most_words", n=8), "word " * 10, "word " * 30),
    ("at_least_words", Constraint("at_least_words", n=10), "word " * 8, "word " * 2),
    ("lowercase", Constraint("lowercase"), "almost all small Here.", "MOSTLY CAPITALS here."),
    ("ending", Constraint("ending", phrase="Hope this helps."), "Rain. Hope this", "Rain."),
    ("sentences", Constraint("sentences", n=3), "One. Two.", "One two"),
    ("bullets", Constraint("bullets", n=3), "- a\n- b", "a, b"),
]


@pytest.mark.parametrize(
    ("family", "constraint", "good", "bad"), FIXTURES, ids=[f[0] for f in FIXTURES]
)
def test_graded_credit_is_whole_exactly_when_the_constraint_holds(family, constraint, good, bad):
    prompt = f"Why does it rain? {constraint.text()}"
    assert follows_instructions_graded(good, prompt) == 1.0
    assert 0.0 <= follows_instructions_graded(bad, prompt) < 1.0
    assert follows_instructions_graded("", prompt) < 1.0


@pytest.mark.parametrize(
    ("family", "constraint", "nearer", "farther"), NEARER, ids=[f[0] for f in NEARER]
)
def test_graded_credit_rises_as_a_failing_answer_comes_nearer(family, constraint, nearer, farther):
    """What the 0/1 verifier cannot tell apart (both 0), partial credit orders."""
    prompt = f"Q? {constraint.text()}"
    assert follows_instructions(nearer, prompt) == follows_instructions(farther, prompt) == 0.0
    near, far = (follows_instructions_graded(x, prompt) for x in (nearer, farther))
    assert 0.0 <= far < near < 1.0, (near, far)


def test_graded_credit_is_the_mean_over_the_prompts_constraints():
    prompt = f"Q? {Constraint('lowercase').text()} {Constraint('sentences', n=2).text()}"
    assert follows_instructions_graded("just one. two.", prompt) == 1.0
    assert follows_instructions_graded("just one.", prompt) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="states no constraint"):
        follows_instructions_graded("anything", "Why is the sky blue?")
