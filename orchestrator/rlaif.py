"""distill.mode: rlaif — judges give feedback on the student's own samples, live.

The loop is the on-policy one (every step is the student's samples, `samples_per_prompt`
K per prompt), with one stage added between writing and training:

1. rollout engines write K samples per prompt (weights synced as in on_policy);
2. every judge judges them (`orchestrator/judges.py`: bounded waits, one retry on another
   replica, drops counted): `score` judges and functions rate each sample; `pairwise`
   judges compare the samples of a prompt with each other (both orders), a sample's reward
   being its mean preference; `critique` judges rewrite a sample, and the rewrite becomes
   a cross-entropy target (`rlaif.sft_weight`);
3. the ranks take one optimizer step on one objective (one backward):
   `kd_weight` x the logit-KD objective on the samples (reverse KL by default)
   + `rl_weight` x (GRPO / RLOO policy gradient, or DPO on each prompt's best-vs-worst
   pair) + `kl_coef` x KL(student || frozen reference), + the critique SFT term.

A sample's reward is the weighted mean of the judges that judged it. With two or more
reward judges (score and pairwise; critique judges give no reward) each judge's rewards are
first standardised within each prompt's group, over the samples that judge scored
(`standardised`), so a 1..9 rating and a 0/1 function weigh alike and a sample one judge
dropped is scored on the others' standardised scales, never on a raw scale mixed with
theirs. With one judge its raw reward reaches the advantage unchanged. A sample no judge
could judge (all dropped) has no reward and takes no part in the policy gradient.
Every `rlaif.win_rate_every` steps (and at the end) the student writes one sample for each
of `win_rate_prompts` held-out prompts, and the first model judge compares it with the
starting student's sample (cached in the run directory), both orders: `eval/win_rate`.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import ray

from actors.chat import encode_chat
from actors.rollout import request_seed, sampling_temperature
from actors.specs import RLSpec, WorkerSpec
from orchestrator.judges import JudgePool, Outcome, judge_key
from orchestrator.on_policy import OnPolicyLoop, prompt_ids
from orchestrator.recipe import JudgeConfig, Recipe
from orchestrator.students import worker_spec
from orchestrator.train_loop import InFlight, Queued

_WIN_RATE_SEED = 0x77696E  # the win-rate samples' own seed stream


def rl_spec(recipe: Recipe) -> RLSpec:
    """The rlaif section as the ranks read it, with the rollouts' group size and T."""
    ours = recipe.rlaif.model_dump(exclude={"win_rate_every", "win_rate_prompts"})
    return RLSpec(
        **ours,
        group_size=recipe.rollout.samples_per_prompt,
        temperature=sampling_temperature(recipe.rollout.temperature),
    )


class RlaifLoop(OnPolicyLoop):
    @classmethod
    def student_spec(cls, recipe: Recipe) -> WorkerSpec:
        return worker_spec(recipe, rl=rl_spec(recipe))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lmbda = 1.0
        recipe = self.recipe
        self.judges = [JudgePool(j, judge_model(recipe, j), recipe.cluster) for j in recipe.judges]
        self.services += self.judges  # probed when a step runs past its bound
        self.tokenizer = None
        if recipe.data.source == "file":
            from transformers import AutoTokenizer

            from actors.model_store import local_model

            self.tokenizer = AutoTokenizer.from_pretrained(local_model(recipe.student.model))
        self._judged: dict[int, dict[str, float]] = {}
        self._win_snapshots: dict[int, ray.ObjectRef] = {}
        self._start_texts: list[str] = []
        self._prompts: dict[int, list[str]] = {}

    # -- texts ----------------------------------------------------------------------------

    def _text(self, ids: list[int] | np.ndarray) -> str:
        """What a judge reads: decoded text, or the ids themselves for token-only data."""
        ids = [int(i) for i in ids]
        if self.tokenizer is None:
            return " ".join(map(str, ids))
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    # -- issuing and training -------------------------------------------------------------

    def _issue(self, step: int) -> InFlight:
        rows, prompts = self._prompts_for(step)
        refs, metas = self._rollout(step, prompts)
        if self.dataset.train_prompts is not None:
            self._prompts[step] = [self.dataset.train_prompts[int(i)] for i in rows]
        else:
            self._prompts[step] = [self._text(p) for p in prompts]
        kd = self.recipe.rlaif.kd_weight > 0  # no teacher compute when KD is off
        signals = self._signals_for(refs) if kd else [[] for _ in refs]
        return InFlight(step, refs, signals, None, metas)

    def _samples(self, metas: list[dict[str, Any]]) -> tuple[list[list[int]], list[list[float]]]:
        """Responses and their log-probs in rank order (shard i came from engine i mod R)."""
        engines = len(metas)
        per_rank = self.recipe.train.batch_size // self.world
        responses, logprobs = [], []
        for shard in range(self.world):
            meta, j = metas[shard % engines], shard // engines
            responses += meta["responses"][j * per_rank : (j + 1) * per_rank]
            logprobs += meta["logprobs"][j * per_rank : (j + 1) * per_rank]
        return responses, logprobs

    def _train(self, item: InFlight) -> list[ray.ObjectRef]:
        """Judge the step's samples (the driver waits here, bounded, while the previous
        step trains), then queue the train step with each rank's rewards."""
        metas = self._metas[item.step] = self._wait(
            item.meta, f"rollouts of step {item.step + 1}", self.rollouts.engines_of(item.meta)
        )  # _step_metrics reads them too
        responses, logprobs = self._samples(metas)
        k = self.recipe.rollout.samples_per_prompt
        prompts = [p for p in self._prompts.pop(item.step) for _ in range(k)]
        texts = [self._text(r) for r in responses]
        rewards, sft, stats = self._judge(prompts, texts)
        self._judged[item.step] = stats
        per_rank = len(texts) // self.world
        rl = []
        for r in range(self.world):
            rows = slice(r * per_rank, (r + 1) * per_rank)
            rl.append(
                {
                    "rewards": rewards[rows],
                    "old_logp": np.asarray(
                        [x for lp in logprobs[rows] for x in lp], dtype=np.float32
                    ),
                    "sft": self._sft_rows(prompts[rows], sft[rows]),
                }
            )
        return self.students.train_step(item.shards, item.signals, None, rl)

    def _judge(
        self, prompts: list[str], texts: list[str]
    ) -> tuple[np.ndarray, list[str | None], dict[str, float]]:
        """(reward per sample, NaN where no judge could; critique rewrites; metrics)."""
        k = self.recipe.rollout.samples_per_prompt
        calls = []
        for pool in self.judges:
            kind = pool.cfg.kind
            if kind == "pairwise":  # every pair of a prompt's samples, both orders
                pairs = [
                    (g * k + a, g * k + b)
                    for g in range(len(texts) // k)
                    for a in range(k)
                    for b in range(a + 1, k)
                ]
                args = (
                    [prompts[a] for a, _ in pairs],
                    [texts[a] for a, _ in pairs],
                    [texts[b] for _, b in pairs],
                )
                calls.append((pool, pairs, pool.submit("pairwise", *args)))
            else:
                calls.append((pool, None, pool.submit(kind, prompts, texts)))
        per_judge: list[tuple[float, np.ndarray]] = []
        sft: list[str | None] = [None] * len(texts)
        stats: dict[str, float] = {}
        for pool, pairs, call in calls:
            out: Outcome = pool.collect(call)
            name = pool.name
            stats[f"judge/{name}/latency_s"] = out.latency_s
            stats[f"judge/{name}/queue_depth"] = float(out.depth)
            stats[f"judge/{name}/dropped"] = float(out.dropped)
            stats[f"judge/{name}/retried"] = float(out.retried)
            if pool.cfg.kind == "critique":
                sft = [v if isinstance(v, str) and v else None for v in out.values]
                continue
            values = _per_sample(out.values, pairs, len(texts))
            per_judge.append((pool.cfg.weight, values))
            ok = ~np.isnan(values)
            if ok.any():
                stats[f"reward/{name}"] = float(values[ok].mean())
                stats[f"reward_std/{name}"] = float(values[ok].std())
        rewards = combine_rewards(per_judge, len(texts), k)
        stats.update(reward_stats(per_judge))
        stats["dropped_samples"] = float(np.isnan(rewards).sum())
        return rewards, sft, stats

    def _sft_rows(self, prompts: list[str], rewrites: list[str | None]) -> Any:
        """The critique rewrites as chat rows (loss on the rewrite), or None."""
        from actors.batch import Sample
        from actors.rollout import assemble

        if self.tokenizer is None or not any(rewrites):
            return None
        rows, samples = [], []
        for prompt, text in zip(prompts, rewrites, strict=True):
            if not text:
                continue
            ids, start = encode_chat(self.tokenizer, prompt, text, True)
            ids = ids[: start + self.recipe.rollout.max_new_tokens]
            rows.append(np.asarray(ids[:start], np.int32))
            samples.append(Sample(ids[start:], [0.0] * (len(ids) - start), "stop"))
        if not rows:
            return None
        pad = self.tokenizer.pad_token_id or 0
        return assemble(rows, samples, pad)

    # -- metrics --------------------------------------------------------------------------

    def _aggregate(self, per_rank: list[dict[str, float]], wall: float, depth: int) -> dict:
        out = super()._aggregate(per_rank, wall, depth)
        for key in per_rank[0]:
            if key.startswith("rl/"):
                out[key] = float(sum(m[key] for m in per_rank))
        tokens = max(out.get("rl/tokens", 0.0), 1.0)
        pairs = max(out.get("rl/pairs", 0.0), 1.0)
        for key in ("rl/kl_ref", "rl/clip_frac", "rl/ratio_mean"):
            if key in out:
                out[key] /= tokens  # per response token
        for key in ("rl/margin", "rl/accuracy"):
            if key in out:
                out[key] /= pairs  # per DPO pair
        return out

    def _win_rate_due(self, done: int) -> bool:
        every = self.recipe.rlaif.win_rate_every
        return bool(every and done % every == 0) or done == self.recipe.train.steps

    def _after_train(self, step: int, end: int) -> None:
        """Also keep the weights of a win-rate step: later steps are queued before the
        driver gets to judge it."""
        super()._after_train(step, end)
        done = step + 1
        if self._win_rate_due(done) and self._start_texts:
            self._win_snapshots[done] = self._snapshots.get(done) or self._snapshot()

    def _step_metrics(self, item: Queued, metrics: dict[str, float]) -> None:
        super()._step_metrics(item, metrics)
        metrics.update(self._judged.pop(item.step, {}))
        snapshot = self._win_snapshots.pop(item.step + 1, None)
        if snapshot is not None:
            metrics.update(self._win_rate(item.step + 1, snapshot))

    def _headline(self, metrics: dict[str, float]) -> dict[str, float]:
        out = {"reward": metrics.get("reward_mean", math.nan)}
        if "eval/win_rate" in metrics:
            out["win_rate"] = metrics["eval/win_rate"]
        return out

    # -- win rate against the starting student --------------------------------------------

    def _started(self, start: int) -> None:
        super()._started(start)
        self._reference_hash = self.students.reference_hash()
        path = self.run_dir / "win_rate_start.json"
        if path.exists():  # a resumed run compares with the same starting samples
            self._start_texts = json.loads(path.read_text())
            return
        if start != 0 or all(j.cfg.function for j in self.judges):
            self._start_texts = []  # no model judge to compare with (or nothing to compare)
            return
        self._start_texts = self._heldout_samples(self._snapshots.get(start), start)
        path.write_text(json.dumps(self._start_texts))

    def _heldout_samples(self, snapshot: ray.ObjectRef | None, version: int) -> list[str]:
        heldout = self.dataset.heldout
        n = min(self.recipe.rlaif.win_rate_prompts, len(heldout))
        prompts = [prompt_ids(heldout, i) for i in range(n)]
        seeds = [request_seed(self.recipe.run.seed, _WIN_RATE_SEED, i) for i in range(n)]
        refs, metas = self.rollouts.generate([prompts], [seeds], version, snapshot)
        meta = self._wait(metas[:1], "win-rate samples", self.rollouts.engines_of(metas[:1]))[0]
        del refs
        return [self._text(r) for r in meta["responses"]]

    def _heldout_prompt_texts(self, n: int) -> list[str]:
        if self.dataset.heldout_prompts is not None:
            return self.dataset.heldout_prompts[:n]
        return [self._text(prompt_ids(self.dataset.heldout, i)) for i in range(n)]

    def _win_rate(self, done: int, snapshot: ray.ObjectRef) -> dict[str, float]:
        judge = next(j for j in self.judges if j.cfg.function is None)
        current = self._heldout_samples(snapshot, done)
        prompts = self._heldout_prompt_texts(len(current))
        out = judge.collect(judge.submit("pairwise", prompts, current, self._start_texts))
        wins = [v for v in out.values if v is not None]
        lengths = [len(t.split()) for t in current]
        return {
            "eval/win_rate": float(np.mean(wins)) if wins else math.nan,
            "eval/win_rate_judged": float(len(wins)),
            "eval/sample_words": float(np.mean(lengths)),
            "eval/repetition": float(np.mean([_repetition(t) for t in current])),
        }

    def _finish(self, tokens_total: float, elapsed: float) -> dict[str, Any]:
        if self.students.reference_hash() != self._reference_hash:
            raise RuntimeError("the frozen reference model changed during training")
        return {**super()._finish(tokens_total, elapsed), "reference_hash": self._reference_hash}

    @classmethod
    def warm_keys(cls, recipe: Recipe) -> list[str]:
        keys = [judge_key(j, judge_model(recipe, j), recipe.cluster) for j in recipe.judges]
        return [*super().warm_keys(recipe), *keys]

    def shutdown(self, keep: bool = False) -> None:
        super().shutdown(keep)
        for pool in self.judges:
            pool.shutdown(keep)


def judge_model(recipe: Recipe, judge: JudgeConfig) -> str | None:
    """The judge's own model, or the one of the teacher it names (None: a function)."""
    models = {t.name: t.model for t in recipe.teachers}
    return judge.model or (models[judge.teacher] if judge.teacher else None)


def standardised(values: np.ndarray, group_size: int) -> np.ndarray:
    """One judge's rewards [N] as z-scores within each group of K samples of a prompt, over
    the samples it scored (sample std, ddof 1); NaN (dropped) stays NaN. A group where the
    judge scored fewer than 2 samples, or scored them all alike, gets 0 there: it ranks
    nothing within the group."""
    g = values.reshape(-1, group_size)
    ok = ~np.isnan(g)
    count = ok.sum(1, keepdims=True)
    mean = np.where(ok, g, 0.0).sum(1, keepdims=True) / np.maximum(count, 1)
    centred = np.where(ok, g - mean, 0.0)
    std = np.sqrt((centred**2).sum(1, keepdims=True) / np.maximum(count - 1, 1))
    hi = np.where(ok, g, -np.inf).max(1, keepdims=True)
    lo = np.where(ok, g, np.inf).min(1, keepdims=True)
    spread = (count >= 2) & (hi > lo)  # all alike: exactly 0, not rounding noise / std
    z = np.where(spread, centred / np.where(spread, std, 1.0), 0.0)
    return np.where(ok, z, np.nan).reshape(-1)


def combine_rewards(
    per_judge: list[tuple[float, np.ndarray]], n: int, group_size: int
) -> np.ndarray:
    """Reward per sample [n] from (weight, rewards [n], NaN = dropped) per reward judge: the
    weighted mean over the judges that scored the sample, NaN where none did. With two or
    more judges each judge's rewards are `standardised` first (per prompt group): judges on
    different scales (1..9 ratings, 0/1 checks, preferences) then count by their weights
    alone, also for a sample one of them dropped. One judge: its raw rewards, unchanged."""
    scaled = len(per_judge) >= 2
    weighted, weights = np.zeros(n), np.zeros(n)
    for weight, values in per_judge:
        v = standardised(values, group_size) if scaled else values
        ok = ~np.isnan(v)
        weighted[ok] += weight * v[ok]
        weights[ok] += weight
    return np.where(weights > 0, weighted / np.maximum(weights, 1e-300), np.nan)


def reward_stats(per_judge: list[tuple[float, np.ndarray]]) -> dict[str, float]:
    """`reward_mean` / `reward_std`: each judge's raw mean / std over the samples it scored,
    weighted by the judges' weights (a trend on the judges' own scales; for one judge, its
    own mean and std)."""
    rows = [(w, v[~np.isnan(v)]) for w, v in per_judge]
    rows = [(w, v) for w, v in rows if v.size]
    if not rows:
        return {"reward_mean": math.nan, "reward_std": math.nan}
    total = sum(w for w, _ in rows)
    return {
        "reward_mean": sum(w * float(v.mean()) for w, v in rows) / total,
        "reward_std": sum(w * float(v.std()) for w, v in rows) / total,
    }


def _per_sample(values: list, pairs: list[tuple[int, int]] | None, n: int) -> np.ndarray:
    """Rewards [n], NaN where unusable; for pairwise judgments the mean preference of each
    sample over the others of its prompt."""
    if pairs is None:
        return np.asarray([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    total, count = np.zeros(n), np.zeros(n)
    for (a, b), v in zip(pairs, values, strict=True):
        if v is None:
            continue
        total[a] += v
        total[b] += 1 - v
        count[a] += 1
        count[b] += 1
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _repetition(text: str) -> float:
    """Share of repeated word bigrams: 0 for varied text, near 1 for a loop."""
    words = text.split()
    bigrams = list(zip(words, words[1:], strict=False))
    return 1 - len(set(bigrams)) / len(bigrams) if bigrams else 0.0
