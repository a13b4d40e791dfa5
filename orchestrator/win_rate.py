"""The win rate of the student against its starting self, judged on held-out prompts.

Every `rlaif.win_rate_every` steps (and at the end) the student writes one sample (a fixed
seed per prompt) for each of `win_rate_prompts` held-out prompts, and the evaluator compares
it with the starting student's sample (cached in the run directory): a pairwise judge in
both orders, a score or likelihood judge by which sample it judges higher (ties 1/2). The
evaluator is the judge with `role: evaluator`, which never trains the policy; only
`rlaif.win_rate_by: training_judge` lets a judge the policy was trained on count its wins.
`eval/win_rate` has the sample length, repeated bigrams and empty answers beside it, so
hacking shows.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import ray

from actors.rollout import request_seed
from actors.verifiers import Constraint, constraints_in, satisfied
from orchestrator.parts import Loop, Part, Queued
from orchestrator.sources import RolloutSource, prompt_ids

_WIN_RATE_SEED = 0x77696E  # the win-rate samples' own seed stream


class WinRate(Part):
    def __init__(self, recipe: Any, source: RolloutSource, judges: list[Any], texts: Any) -> None:
        self.recipe, self.source, self.texts = recipe, source, texts
        name = evaluator_of(recipe)
        self.judge = next((j for j in judges if j.name == name), None)
        self._snapshots: dict[int, ray.ObjectRef] = {}
        self._start_texts: list[str] = []
        self._constraints: list[list[Constraint]] = []  # per held-out prompt, if all state some

    def _due(self, done: int) -> bool:
        every = self.recipe.rlaif.win_rate_every
        return bool(every and done % every == 0) or done == self.recipe.train.steps

    def started(self, start: int, loop: Loop) -> None:
        found = [constraints_in(p) for p in self._prompts(loop)]
        self._constraints = found if found and all(found) else []
        if self.judge is None:
            print("win rate: not counted (no judge with role: evaluator)", flush=True)
        else:
            trains = self.judge.cfg.role == "reward"
            why = "trains the policy: rlaif.win_rate_by" if trains else "does not train the policy"
            print(f"win rate: counted by judge {self.judge.name} ({why})", flush=True)
        path = loop.run_dir / "win_rate_start.json"
        if path.exists():  # a resumed run compares with the same starting samples
            self._start_texts = json.loads(path.read_text())
            return
        if start != 0 or (self.judge is None and not self._constraints):
            return  # nothing to compare with, nothing to check
        self._start_texts = self._samples(loop, self.source.snapshots.get(start), start)
        path.write_text(json.dumps(self._start_texts))

    def after_train(self, step: int, end: int, loop: Loop) -> None:
        """Keep the weights of a win-rate step: later steps are queued before the driver
        gets to judge it."""
        done = step + 1
        if self._due(done) and self._start_texts:
            self._snapshots[done] = self.source.snapshots.get(done) or self.source.snapshot()

    def step_metrics(self, item: Queued, metrics: dict[str, float], loop: Loop) -> None:
        snapshot = self._snapshots.pop(item.step + 1, None)
        if snapshot is not None:
            metrics.update(self._evaluate(loop, item.step + 1, snapshot))

    def headline(self, metrics: dict[str, float]) -> dict[str, float]:
        return {"win_rate": metrics["eval/win_rate"]} if "eval/win_rate" in metrics else {}

    def shutdown(self, keep: bool) -> None:
        """The evaluator is this part's own (a judge that rewards is JudgeRewards')."""
        if self.judge is not None and self.judge.cfg.role == "evaluator":
            self.judge.shutdown(keep)

    def _prompts(self, loop: Loop) -> list[str]:
        heldout = loop.dataset.heldout
        n = min(self.recipe.rlaif.win_rate_prompts, len(heldout))
        ids = [prompt_ids(heldout, i) for i in range(n)]
        return self.texts.prompts(loop.dataset.heldout_prompts, range(n), ids)

    def _samples(self, loop: Loop, snapshot: ray.ObjectRef | None, version: int) -> list[str]:
        """One greedy answer per held-out prompt, from the weights of `snapshot`."""
        heldout = loop.dataset.heldout
        n = min(self.recipe.rlaif.win_rate_prompts, len(heldout))
        prompts = [prompt_ids(heldout, i) for i in range(n)]
        seeds = [request_seed(self.recipe.run.seed, _WIN_RATE_SEED, i) for i in range(n)]
        rollouts = self.source.rollouts
        greedy = {**rollouts.sampling, "temperature": 0.0}
        refs, metas = rollouts.generate([prompts], [seeds], version, snapshot, greedy)
        meta = loop.wait(metas[:1], "win-rate samples", rollouts.engines_of(metas[:1]))[0]
        del refs
        return [self.texts(r) for r in meta["responses"]]

    def _wins(self, prompts: list[str], current: list[str]) -> list[float]:
        """Per prompt, the current sample's win over the starting one (1, 1/2, 0), where the
        evaluator could judge."""
        judge, start = self.judge, self._start_texts
        if judge.cfg.kind == "pairwise":
            values = judge.collect(judge.submit("pairwise", prompts, current, start)).values
            return [v for v in values if v is not None]
        n = len(current)
        method = "likelihood" if judge.cfg.kind == "likelihood" else "score"
        values = judge.collect(judge.submit(method, prompts * 2, current + start)).values
        pairs = zip(values[:n], values[n:], strict=True)
        judged = [(a, b) for a, b in pairs if a is not None and b is not None]
        return [0.5 if a == b else float(a > b) for a, b in judged]

    def _evaluate(self, loop: Loop, done: int, snapshot: ray.ObjectRef) -> dict[str, float]:
        current = self._samples(loop, snapshot, done)
        out = {
            "eval/sample_words": float(np.mean([len(t.split()) for t in current])),
            "eval/repetition": float(np.mean([repetition(t) for t in current])),
            "eval/empty": float(np.mean([not t.strip() for t in current])),
        }
        if self.judge is not None:
            wins = self._wins(self._prompts(loop), current)
            out["eval/win_rate"] = float(np.mean(wins)) if wins else math.nan
            out["eval/win_rate_judged"] = float(len(wins))
        if self._constraints:
            out.update(satisfaction(self._constraints, current))
            start = satisfaction(self._constraints, self._start_texts)
            out.update({k.replace("eval/", "eval/start_"): v for k, v in start.items()})
        return out


def satisfaction(constraints: list[list[Constraint]], answers: list[str]) -> dict[str, float]:
    """The share of prompts whose every constraint the answer keeps, overall and per
    constraint family (`eval/constraints`, `eval/constraints/<family>`)."""
    kept = [all(satisfied(c, a) for c in cs) for cs, a in zip(constraints, answers, strict=True)]
    out = {"eval/constraints": float(np.mean(kept))}
    for family in sorted({c.family for cs in constraints for c in cs}):
        mine = [k for cs, k in zip(constraints, kept, strict=True) if cs[0].family == family]
        if mine:
            out[f"eval/constraints/{family}"] = float(np.mean(mine))
    return out


def evaluator_of(recipe: Any) -> str | None:
    """The judge that counts the win rate: the one with role evaluator, or with
    `rlaif.win_rate_by: training_judge` the first model judge that trains the policy."""
    for j in recipe.judges:
        if j.role == "evaluator":
            return j.name
    if recipe.rlaif.win_rate_by == "training_judge":
        return next((j.name for j in recipe.judges if j.function is None), None)
    return None


def repetition(text: str) -> float:
    """Share of repeated word bigrams: 0 for varied text, near 1 for a loop."""
    words = text.split()
    bigrams = list(zip(words, words[1:], strict=False))
    return 1 - len(set(bigrams)) / len(bigrams) if bigrams else 0.0
