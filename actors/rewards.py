"""Programmatic rewards for `judges: [{function: "actors.rewards:NAME"}]`: each is
(sample, prompt) -> float, run inside the judge actors. Users point `function` at their own
module the same way (it must be importable where the judge actors run)."""

from __future__ import annotations


def word_count(sample: str, prompt: str) -> float:
    """Length in words (to penalise or reward verbosity, with a negative or positive weight)."""
    return float(len(sample.split()))


def ends_sentence(sample: str, prompt: str) -> float:
    """1 when the sample ends like a finished sentence, else 0 (a format check)."""
    return 1.0 if sample.rstrip().endswith((".", "!", "?")) else 0.0


def distinct_bigrams(sample: str, prompt: str) -> float:
    """Share of distinct word bigrams: 1 for varied text, near 0 for a loop."""
    words = sample.split()
    bigrams = list(zip(words, words[1:], strict=False))
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def seven_share(sample: str, prompt: str) -> float:
    """The toy task of the tests and docs: the share of the sample's tokens that are "7"
    (token id 7 when the data is token ids, written as space-separated ids)."""
    tokens = sample.split()
    return sum(t == "7" for t in tokens) / len(tokens) if tokens else 0.0
