"""Verifiers: checkable instructions and the Python functions that check them.

A prompt of the bundled instruction set (`recipes/data/instructions_*.jsonl`) is a question
followed by one constraint sentence written from a template below. The template is the one
source of truth: `constraint_text` writes the sentence and `constraints_in` reads it back out
of a prompt, so a verifier needs only (sample, prompt), the signature of a function judge
(`judges[i].function: actors.verifiers:follows_instructions`, or `..._graded` for partial
credit).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

# family -> the constraint sentence; {n}: a number, {word}: a word, {phrase}: a phrase
TEMPLATES = {
    "at_most_words": "Answer in at most {n} words.",
    "at_least_words": "Answer in at least {n} words.",
    "keyword": 'Use the word "{word}" in your answer.',
    "lowercase": "Write your whole answer in lowercase letters, with no capital letters.",
    "ending": 'End your answer with the exact phrase "{phrase}"',
    "sentences": "Answer in exactly {n} sentences.",
    "bullets": 'Answer with exactly {n} bullet points, each on its own line starting with "- ".',
}
FAMILIES = tuple(TEMPLATES)

_WORD = re.compile(r"[A-Za-z0-9']+")
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
_BULLET = re.compile(r"^\s*[-*]\s+\S", re.MULTILINE)


@dataclass(frozen=True)
class Constraint:
    family: str
    n: int | None = None
    word: str | None = None
    phrase: str | None = None

    def text(self) -> str:
        return constraint_text(self)


def constraint_text(c: Constraint) -> str:
    return TEMPLATES[c.family].format(n=c.n, word=c.word, phrase=c.phrase)


def _pattern(family: str) -> re.Pattern[str]:
    """The template as a regex: its fields become named groups."""
    text = re.escape(TEMPLATES[family])
    text = text.replace(r"\{n\}", r"(?P<n>\d+)")
    text = text.replace(r"\{word\}", r"(?P<word>[^\"]+)")
    text = text.replace(r"\{phrase\}", r"(?P<phrase>[^\"]+)")
    return re.compile(text)


_PATTERNS = {family: _pattern(family) for family in FAMILIES}


def constraints_in(prompt: str) -> list[Constraint]:
    """Every constraint a prompt states, in the templates' wording."""
    found = []
    for family, pattern in _PATTERNS.items():
        for m in pattern.finditer(prompt):
            fields = m.groupdict()
            n = int(fields["n"]) if fields.get("n") else None
            found.append(Constraint(family, n, fields.get("word"), fields.get("phrase")))
    return found


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def sentences(text: str) -> int:
    """Sentences: runs of text ended by . ! or ? (a last one without its mark counts too)."""
    body = text.strip()
    if not body:
        return 0
    ends = _SENTENCE_END.findall(body)
    tail = _SENTENCE_END.split(body)[-1].strip()
    return len(ends) + (1 if words(tail) else 0)


def bullets(text: str) -> int:
    return len(_BULLET.findall(text))


CHECKS: dict[str, Callable[[Constraint, str], bool]] = {
    "at_most_words": lambda c, t: 0 < len(words(t)) <= (c.n or 0),
    "at_least_words": lambda c, t: len(words(t)) >= (c.n or 0),
    "keyword": lambda c, t: re.search(rf"\b{re.escape(c.word or '')}\b", t, re.I) is not None,
    "lowercase": lambda c, t: any(ch.isalpha() for ch in t) and t == t.lower(),
    "ending": lambda c, t: bool(c.phrase) and t.rstrip().endswith(c.phrase or ""),
    "sentences": lambda c, t: sentences(t) == c.n,
    "bullets": lambda c, t: bullets(t) == c.n,
}


def satisfied(c: Constraint, response: str) -> bool:
    return CHECKS[c.family](c, response)


def _stated(prompt: str) -> list[Constraint]:
    """The prompt's constraints; none raises (the judge then counts the sample as unscored,
    never as 0)."""
    found = constraints_in(prompt)
    if not found:
        raise ValueError("the prompt states no constraint of actors/verifiers.py's templates")
    return found


def follows_instructions(sample: str, prompt: str) -> float:
    """1.0 when the sample keeps every constraint its prompt states, else 0.0. A prompt
    that states none raises (the judge then counts the sample as unscored, never as 0)."""
    return float(all(satisfied(c, sample) for c in _stated(prompt)))


def _closeness(have: int, want: int) -> float:
    """1 at the count asked for, falling linearly to 0 at twice as far (or none)."""
    return max(0.0, 1.0 - abs(have - want) / max(want, 1))


def _ending_credit(phrase: str, text: str) -> float:
    """The share of the phrase's words the answer ends with (its last k words are the
    phrase's first k); 1 only when it ends with the whole phrase."""
    if text.rstrip().endswith(phrase):
        return 1.0
    want, have = phrase.split(), text.split()
    best = max((k for k in range(1, len(want)) if have[-k:] == want[:k]), default=0)
    return 0.5 * best / len(want)  # a started phrase is not yet a kept one


def _lowercase_credit(text: str) -> float:
    letters = [ch for ch in text if ch.isalpha()]
    return sum(ch.islower() for ch in letters) / len(letters) if letters else 0.0


# family -> credit in [0, 1], 1 exactly when `satisfied` holds
CREDITS: dict[str, Callable[[Constraint, str], float]] = {
    "at_most_words": lambda c, t: min(1.0, (c.n or 0) / len(words(t))) if words(t) else 0.0,
    "at_least_words": lambda c, t: min(1.0, len(words(t)) / max(c.n or 0, 1)),
    "keyword": lambda c, t: float(satisfied(c, t)),
    "lowercase": lambda c, t: _lowercase_credit(t),
    "ending": lambda c, t: _ending_credit(c.phrase or "", t),
    "sentences": lambda c, t: _closeness(sentences(t), c.n or 0),
    "bullets": lambda c, t: _closeness(bullets(t), c.n or 0),
}


def follows_instructions_graded(sample: str, prompt: str) -> float:
    """Partial credit: the mean over the prompt's constraints of how close the sample comes
    to each (a word count's ratio to the limit, the share of lowercase letters, a sentence
    or bullet count's distance, how much of the ending phrase it ends with). A policy that
    never keeps a constraint still sees which of its samples come nearer, where the 0/1
    reward gives a group of failures no signal at all. 1.0 exactly when every constraint
    holds, as with `follows_instructions`."""
    found = _stated(prompt)
    credits = [
        1.0 if satisfied(c, sample) else min(CREDITS[c.family](c, sample), 0.99) for c in found
    ]
    return sum(credits) / len(credits)
