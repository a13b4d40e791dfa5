"""The win rate of the student against its starting self, judged on held-out prompts.

Every `rlaif.win_rate_every` steps (and at the end) the student writes one sample for each
of `win_rate_prompts` held-out prompts, and the first model judge compares it with the
starting student's sample (cached in the run directory), both orders: `eval/win_rate`,
with the sample length and repeated bigrams beside it, so reward hacking shows.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import ray

from actors.rollout import request_seed
from orchestrator.parts import Loop, Part, Queued
from orchestrator.sources import RolloutSource, prompt_ids

_WIN_RATE_SEED = 0x77696E  # the win-rate samples' own seed stream


class WinRate(Part):
    def __init__(self, recipe: Any, source: RolloutSource, judges: list[Any], texts: Any) -> None:
        self.recipe, self.source, self.texts = recipe, source, texts
        self.judge = next((j for j in judges if j.cfg.function is None), None)
        self._snapshots: dict[int, ray.ObjectRef] = {}
        self._start_texts: list[str] = []

    def _due(self, done: int) -> bool:
        every = self.recipe.rlaif.win_rate_every
        return bool(every and done % every == 0) or done == self.recipe.train.steps

    def started(self, start: int, loop: Loop) -> None:
        path = loop.run_dir / "win_rate_start.json"
        if path.exists():  # a resumed run compares with the same starting samples
            self._start_texts = json.loads(path.read_text())
            return
        if start != 0 or self.judge is None:
            return  # no model judge to compare with (or nothing to compare)
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
            metrics.update(self._win_rate(loop, item.step + 1, snapshot))

    def headline(self, metrics: dict[str, float]) -> dict[str, float]:
        return {"win_rate": metrics["eval/win_rate"]} if "eval/win_rate" in metrics else {}

    def _samples(self, loop: Loop, snapshot: ray.ObjectRef | None, version: int) -> list[str]:
        heldout = loop.dataset.heldout
        n = min(self.recipe.rlaif.win_rate_prompts, len(heldout))
        prompts = [prompt_ids(heldout, i) for i in range(n)]
        seeds = [request_seed(self.recipe.run.seed, _WIN_RATE_SEED, i) for i in range(n)]
        rollouts = self.source.rollouts
        refs, metas = rollouts.generate([prompts], [seeds], version, snapshot)
        meta = loop.wait(metas[:1], "win-rate samples", rollouts.engines_of(metas[:1]))[0]
        del refs
        return [self.texts(r) for r in meta["responses"]]

    def _win_rate(self, loop: Loop, done: int, snapshot: ray.ObjectRef) -> dict[str, float]:
        current = self._samples(loop, snapshot, done)
        n = len(current)
        ids = [prompt_ids(loop.dataset.heldout, i) for i in range(n)]
        prompts = self.texts.prompts(loop.dataset.heldout_prompts, range(n), ids)
        out = self.judge.collect(self.judge.submit("pairwise", prompts, current, self._start_texts))
        wins = [v for v in out.values if v is not None]
        return {
            "eval/win_rate": float(np.mean(wins)) if wins else math.nan,
            "eval/win_rate_judged": float(len(wins)),
            "eval/sample_words": float(np.mean([len(t.split()) for t in current])),
            "eval/repetition": float(np.mean([repetition(t) for t in current])),
        }


def repetition(text: str) -> float:
    """Share of repeated word bigrams: 0 for varied text, near 1 for a loop."""
    words = text.split()
    bigrams = list(zip(words, words[1:], strict=False))
    return 1 - len(set(bigrams)) / len(bigrams) if bigrams else 0.0
