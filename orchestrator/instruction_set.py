"""The bundled instruction set: questions x checkable constraint families (IFEval-style,
written here), split so that no question is in both splits and every family has the same
share of the held-out prompts.

Limits bind below a rollout's `max_new_tokens` of 96 (about 70 words): a student can meet
"at least 30 words" and "at most 12 words" only by reading the prompt, and the opposite
variants keep one habit (always short, always long) from satisfying both.
`recipes/data/instructions_{train,heldout}.jsonl` are this module's output (a test checks it).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from actors.verifiers import FAMILIES, Constraint

QUESTIONS = (
    "Explain why the sky is blue.",
    "Describe how a bicycle works.",
    "What is photosynthesis?",
    "Why do we have seasons on Earth?",
    "How does a refrigerator keep food cold?",
    "What makes bread rise?",
    "Why is sleep important for people?",
    "How do bees make honey?",
    "What is the water cycle?",
    "Explain what a computer program is.",
    "Why do leaves change color in autumn?",
    "How does a compass work?",
    "What is a healthy breakfast?",
    "Describe a good way to learn a new language.",
    "Why should people recycle paper?",
    "How does rain form?",
    "What does a librarian do?",
    "Explain how a candle burns.",
    "Why do cats purr?",
    "How can someone save money each month?",
    "What is the moon made of?",
    "Describe how to plant a tree.",
    "Why is exercise good for the heart?",
    "How do airplanes stay in the air?",
    "What is a volcano?",
    "Explain what friction is.",
    "How do you make a cup of tea?",
    "Why do birds migrate?",
    "What is a map used for?",
    "Describe the job of a firefighter.",
    "How does a thermometer measure temperature?",
    "Why do people need to drink water?",
    "What is electricity?",
    "How do plants drink water?",
    "Explain how a lock and key work.",
    "What is a good habit for studying?",
    "Why does ice float on water?",
    "How does a camera take a picture?",
    "What do doctors do during a checkup?",
    "Describe how to wash your hands well.",
    "Why is the ocean salty?",
    "How do fish breathe?",
    "What is the purpose of a bridge?",
    "Explain what gravity does.",
    "How does a seed grow into a plant?",
    "Why do we brush our teeth?",
    "What is a rainbow?",
    "Describe how a train moves.",
    "How do people make paper?",
    "Why do stars twinkle?",
    "What is the job of the lungs?",
    "Explain how a clock keeps time.",
    "How can a person reduce stress?",
    "What makes a good friend?",
    "Why do onions make people cry?",
    "How does soap clean dirt?",
    "What is an island?",
    "Describe how to cook rice.",
    "Why do dogs wag their tails?",
    "How does wind form?",
    "What is a museum for?",
    "Explain how a battery stores energy.",
    "How do ants find food?",
    "Why is reading books useful?",
)
HELDOUT_QUESTIONS = 16  # x 7 families = 112 held-out prompts; 48 x 7 = 336 for training
KEYWORDS = ("simple", "example", "because", "important", "usually", "energy", "people", "often")
PHRASES = ("Hope this helps.", "That is all.", "Thank you for asking.")
SEED = 20261207


def _constraint(family: str, rng: random.Random) -> Constraint:
    if family == "at_most_words":
        return Constraint(family, n=rng.choice((8, 10, 12, 15)))
    if family == "at_least_words":
        return Constraint(family, n=rng.choice((25, 30, 35)))
    if family == "keyword":
        return Constraint(family, word=rng.choice(KEYWORDS))
    if family == "ending":
        return Constraint(family, phrase=rng.choice(PHRASES))
    if family in ("sentences", "bullets"):
        return Constraint(family, n=rng.choice((2, 3)))
    return Constraint(family)


def build() -> dict[str, list[dict]]:
    """{"train": rows, "heldout": rows}; a row: prompt, family, question (its index)."""
    rng = random.Random(SEED)
    order = list(range(len(QUESTIONS)))
    rng.shuffle(order)
    split = {"heldout": order[:HELDOUT_QUESTIONS], "train": order[HELDOUT_QUESTIONS:]}
    out: dict[str, list[dict]] = {}
    for name, questions in split.items():
        rows = []
        for q in sorted(questions):
            for family in FAMILIES:
                c = _constraint(family, rng)
                prompt = f"{QUESTIONS[q]} {c.text()}"
                rows.append({"prompt": prompt, "family": family, "question": q})
        out[name] = rows
    return out


def write(folder: Path) -> dict[str, Path]:
    """Both splits as jsonl files in `folder` (each written whole, then renamed)."""
    paths = {}
    for name, rows in build().items():
        path = folder / f"instructions_{name}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(path)
        paths[name] = path
    return paths
