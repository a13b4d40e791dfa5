"""What the judge pool keeps of a judge's answer (`orchestrator/judges.py`)."""

from __future__ import annotations

import math

from orchestrator.judges import _usable


def test_numbers_rewrites_and_tuples_survive_and_garbage_does_not():
    assert _usable(3) == 3.0 and _usable(math.nan) is None and _usable(True) is None
    assert _usable("a better answer") == "a better answer"  # a critique's rewrite
    assert _usable("") is None
    assert _usable((None, 0.01)) == (None, 0.01)  # a rating below min_mass, with its mass
    assert _usable((0.9, 0.8)) == (0.9, 0.8)  # a preference in each order
    assert _usable((math.inf, 1.0)) == (None, 1.0) and _usable((None, None)) is None
    assert _usable({"x": 1}) is None
