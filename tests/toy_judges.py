"""Judge functions that fail on purpose (tests of the judge pool's retries and drops)."""

from __future__ import annotations

import time


def raises(sample: str, prompt: str) -> float:
    raise RuntimeError("this judge always fails")


def garbage(sample: str, prompt: str) -> str:
    return "not a number"


def hangs(sample: str, prompt: str) -> float:
    time.sleep(3600)
    return 0.0


def response_length(sample: str, prompt: str) -> float:
    """A deterministic score: longer responses rank higher (curation tests)."""
    return float(len(sample))


def coin(sample: str, prompt: str) -> float:
    """A judge that cannot judge: a random number (the judge check must refuse it)."""
    import random

    return random.random()
