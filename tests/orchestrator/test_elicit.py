"""Deduplication of teacher-written instructions: exact (case, whitespace, edge
punctuation), near (word ROUGE-L >= 0.7), against each other and against every input
prompt, so no seed example and nothing close to a held-out prompt survives."""

from __future__ import annotations

from orchestrator.elicit import dedupe, first_instruction, normalize


def test_whitespace_case_and_punctuation_variants_are_one_instruction():
    assert normalize("  Write  a POEM about\tthe sea. ") == normalize("write a poem about the sea")
    kept = dedupe(["Write a poem about the sea.", "write  a poem ABOUT the sea"], [], 0.7)
    assert kept == ["Write a poem about the sea."]


def test_a_planted_near_duplicate_is_removed_and_distinct_ones_stay():
    candidates = [
        "Explain how rainbows form in the sky.",
        "Explain how rainbows are formed in the sky.",  # planted near-duplicate
        "List three uses of copper wire.",
        "Translate 'good morning' into French.",
    ]
    kept = dedupe(candidates, [], 0.7)
    assert kept == [candidates[0], candidates[2], candidates[3]]


def test_seed_and_held_out_prompts_never_come_back():
    seeds = ["Name a fruit that is red.", "Describe your favourite city."]
    heldout = ["How do bees make honey?"]
    candidates = [
        "name a fruit that is red",  # a seed, case and punctuation changed
        "Describe your favorite city.",  # a seed, one letter changed
        "How do bees make their honey?",  # close to a held-out prompt
        "Why is the sky blue?",
    ]
    assert dedupe(candidates, seeds + heldout, 0.7) == ["Why is the sky blue?"]


def test_the_instruction_is_the_first_line_without_its_numbering():
    assert first_instruction("\n4. Write a haiku.\nSure!") == "Write a haiku."
    assert first_instruction("Instruction: Sort a list.") == "Sort a list."
    assert first_instruction("   \n") == ""
