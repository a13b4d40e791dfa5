"""Whether a judge can judge, measured before it trains anything.

On held-out prompts the teacher's own greedy answer is set against four corruptions of it
(its words reversed, cut in half, a sentence repeated, the answer to another prompt). A
pointwise judge (score, likelihood, a score function) agrees when it rates the original
higher (a tie counts 1/2); a pairwise judge is asked in both orders and agrees when it
prefers the original on their mean; its position bias is how much more often it answers
"A" than "B". A judge whose mean agreement over the four kinds is below
`judges[i].min_agreement` is refused in one line. Verifiers are checked on labelled
fixtures instead (tests/actors/test_verifiers.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.parts import Loop, Part, Queued
from orchestrator.recipe import RecipeError

_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def reversed_words(answer: str) -> str:
    return " ".join(reversed(answer.split()))


def cut_in_half(answer: str) -> str:
    words = answer.split()
    return " ".join(words[: len(words) // 2])


def sentence_repeated(answer: str) -> str:
    """The first sentence said three times, then the rest."""
    first, *rest = _SENTENCE.split(answer.strip(), maxsplit=1)
    return " ".join([first, first, first, *rest])


CORRUPTIONS: dict[str, Callable[[str], str]] = {
    "reversed": reversed_words,
    "cut": cut_in_half,
    "repeated": sentence_repeated,
}
KINDS = (*CORRUPTIONS, "other_prompt")


@dataclass
class Comparisons:
    """(prompt, original, corrupted) triples by corruption kind; a corruption that leaves
    an answer unchanged (one word reversed) is not asked."""

    prompts: list[str] = field(default_factory=list)
    originals: list[str] = field(default_factory=list)
    corrupted: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)


def comparisons(prompts: Sequence[str], answers: Sequence[str]) -> Comparisons:
    out = Comparisons()
    n = len(prompts)
    for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        bad = {kind: fn(answer) for kind, fn in CORRUPTIONS.items()}
        bad["other_prompt"] = answers[(i + 1) % n] if n > 1 else ""
        for kind in KINDS:
            if bad[kind].strip() != answer.strip():
                out.prompts.append(prompt)
                out.originals.append(answer)
                out.corrupted.append(bad[kind])
                out.kinds.append(kind)
    return out


def pointwise_agreement(
    c: Comparisons, originals: Sequence[float | None], corrupted: Sequence[float | None]
) -> dict[str, float]:
    """Per kind: the share of comparisons where the original scored higher (ties and
    unusable scores 1/2), and `agreement`, the mean over the kinds."""
    won = [
        0.5 if a is None or b is None or a == b else float(a > b)
        for a, b in zip(originals, corrupted, strict=True)
    ]
    return _by_kind(c.kinds, won)


def pairwise_agreement(
    c: Comparisons, orders: Sequence[tuple[float, float] | None]
) -> dict[str, float]:
    """`orders`: per comparison (P(original preferred | shown first), P(original preferred |
    shown second)), None where unusable. Agreement per kind on the mean of both orders;
    `position_bias`: P(answer "A") - 1/2 over every usable question."""
    won, first_answers = [], []
    for o in orders:
        if o is None:
            won.append(0.5)
            continue
        mean = (o[0] + o[1]) / 2
        won.append(0.5 if mean == 0.5 else float(mean > 0.5))
        first_answers += [o[0], 1.0 - o[1]]  # "A" answered in either order
    out = _by_kind(c.kinds, won)
    out["position_bias"] = sum(first_answers) / len(first_answers) - 0.5 if first_answers else 0.0
    return out


def _by_kind(kinds: Sequence[str], won: Sequence[float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for kind in KINDS:
        mine = [w for k, w in zip(kinds, won, strict=True) if k == kind]
        if mine:
            out[kind] = sum(mine) / len(mine)
    out["agreement"] = sum(out[k] for k in KINDS if k in out) / max(1, sum(k in out for k in KINDS))
    return out


CHECKED_KINDS = ("score", "pairwise", "likelihood")  # critique gives no reward; verifier: fixtures
PROMPTS = 32


def run_check(
    judges: list[Any], writer: Any, prompts: list[str], max_new_tokens: int
) -> dict[str, dict[str, float]]:
    """Per checked judge its figures: agreement per corruption kind and their mean, the
    position bias of a pairwise judge, the mass a score judge puts on its rating tokens.
    `writer`: a teacher pool whose greedy answers are the originals."""
    checked = [p for p in judges if p.cfg.kind in CHECKED_KINDS]
    if not checked:
        return {}
    prompts = prompts[:PROMPTS]
    sampling = {"max_new_tokens": max_new_tokens, "temperature": 0.0}
    answers = [a["response"] for a in writer.generate(prompts, sampling, len(prompts), _quiet)]
    c = comparisons(prompts, answers)
    figures: dict[str, dict[str, float]] = {}
    for pool in checked:
        if pool.cfg.kind == "pairwise":
            call = pool.submit("pairwise_orders", c.prompts, c.originals, c.corrupted)
            figures[pool.name] = pairwise_agreement(c, pool.collect(call).values)
            continue
        method = "scored" if pool.cfg.kind == "score" else "likelihood"
        texts = c.originals + c.corrupted
        values = pool.collect(pool.submit(method, c.prompts * 2, texts)).values
        if method == "scored":
            mass = [v[1] for v in values if v is not None]
            values = [None if v is None else v[0] for v in values]
        n = len(c.kinds)
        figures[pool.name] = pointwise_agreement(c, values[:n], values[n:])
        if method == "scored":
            figures[pool.name]["rating_mass"] = sum(mass) / max(1, len(mass))
    return figures


def _quiet(done: int) -> None:
    """Progress of the answers' chunks: one chunk, nothing to show."""


def refuse_below(recipe: Any, figures: dict[str, dict[str, float]]) -> None:
    """One line naming the first judge below its `min_agreement`, and its agreement."""
    for i, j in enumerate(recipe.judges):
        if j.name in figures and figures[j.name]["agreement"] < j.min_agreement:
            raise RecipeError(
                f"judges.{i}",
                f"judge {j.name} agrees with the check in {figures[j.name]['agreement']:.2f} "
                f"of comparisons, below min_agreement {j.min_agreement:g}: it does not tell "
                f"the teacher's answers from corrupted ones (lower judges.{i}.min_agreement "
                f"to use it anyway)",
            )


def report(figures: dict[str, dict[str, float]]) -> str:
    lines = []
    for name, f in figures.items():
        kinds = ", ".join(f"{k} {f[k]:.2f}" for k in KINDS if k in f)
        extra = "".join(
            f", {k.replace('_', ' ')} {f[k]:+.2f}" if k == "position_bias" else f", {k} {f[k]:.2f}"
            for k in ("position_bias", "rating_mass")
            if k in f
        )
        lines.append(f"judge {name}: agreement {f['agreement']:.2f} ({kinds}{extra})")
    return "\n".join(lines)


def writer_for(recipe: Any, pools: list[Any]) -> Any:
    """The teacher whose answers are the originals: the first judge's host, else the first
    teacher with live replicas; None where there is none."""
    hosts = [j.teacher for j in recipe.judges if j.teacher]
    live = [p for p in pools if hasattr(p, "generate")]
    return next((p for p in live if p.name in hosts), live[0] if live else None)


class JudgeCheck(Part):
    """The check at the start of a run (not on a resume: the figures are in the run's
    judge_check.json), logged with the first step's metrics."""

    def __init__(self, recipe: Any, judges: list[Any], pools: list[Any]) -> None:
        self.recipe, self.judges, self.pools = recipe, judges, pools
        self.figures: dict[str, dict[str, float]] = {}

    def started(self, start: int, loop: Loop) -> None:
        if start != 0 or not any(p.cfg.kind in CHECKED_KINDS for p in self.judges):
            return
        writer, prompts = writer_for(self.recipe, self.pools), loop.dataset.heldout_prompts
        if writer is None or not prompts:
            why = "no teacher to write the answers" if writer is None else "no text prompts"
            print(f"judge check: not run ({why})", flush=True)
            return
        self.figures = run_check(self.judges, writer, prompts, self.recipe.rollout.max_new_tokens)
        path = loop.run_dir / "judge_check.json"
        path.with_suffix(".tmp").write_text(json.dumps(self.figures, indent=1))
        path.with_suffix(".tmp").replace(path)
        print(report(self.figures), flush=True)
        for j in self.recipe.judges:
            if j.name in self.figures and "min_agreement" in j.model_fields_set:
                print(f"judge {j.name}: min_agreement set to {j.min_agreement:g}", flush=True)
        refuse_below(self.recipe, self.figures)

    def step_metrics(self, item: Queued, metrics: dict[str, float], loop: Loop) -> None:
        if item.step == 0:
            for name, f in self.figures.items():
                metrics.update({f"judge_check/{name}/{k}": v for k, v in f.items()})
                cfg = next(j for j in self.recipe.judges if j.name == name)
                metrics[f"judge_check/{name}/min_agreement"] = cfg.min_agreement
