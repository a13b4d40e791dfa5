"""Judges as feedback: rewards for the student's own samples, live.

Between writing and training, every judge judges the step's samples (orchestrator/judges.py:
bounded waits, one retry on another replica, drops counted): `score` judges and functions
rate each sample; `pairwise` judges compare the samples of a prompt with each other (both
orders), a sample's reward being its mean preference; `critique` judges rewrite a sample,
and the rewrite becomes a cross-entropy target (`rlaif.sft_weight`). The ranks then take one
optimizer step on one objective (one backward): `kd_weight` x logit KD on the samples +
`rl_weight` x (GRPO / RLOO policy gradient, or DPO on each prompt's best-vs-worst pair) +
`kl_coef` x KL(student || frozen reference) + the critique SFT term.

A sample's reward is the weighted mean of the judges that judged it. With two or more
reward judges (score and pairwise; critique judges give no reward) each judge's rewards are
first standardised within each prompt's group, over the samples that judge scored
(`standardised`), so a 1..9 rating and a 0/1 function weigh alike and a sample one judge
dropped is scored on the others' standardised scales, never on a raw scale mixed with
theirs. With one judge its raw reward reaches the advantage unchanged. A sample no judge
could judge (all dropped) has no reward and takes no part in the policy gradient.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from actors.chat import encode_chat
from orchestrator.parts import InFlight, Loop, Part, Queued


class Texts:
    """What a judge reads: decoded text with the student's tokenizer (chat data), or the
    ids themselves for token-only data."""

    def __init__(self, recipe: Any) -> None:
        self.tokenizer = None
        if recipe.data.source == "file":
            from transformers import AutoTokenizer

            from actors.model_store import local_model

            self.tokenizer = AutoTokenizer.from_pretrained(local_model(recipe.student.model))

    def __call__(self, ids: list[int] | np.ndarray) -> str:
        ids = [int(i) for i in ids]
        if self.tokenizer is None:
            return " ".join(map(str, ids))
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def prompts(self, dataset_prompts: list[str] | None, rows: Any, ids: list) -> list[str]:
        """Prompt texts: the data's own where it has them, else the prompt ids decoded."""
        if dataset_prompts is not None:
            return [dataset_prompts[int(i)] for i in rows]
        return [self(p) for p in ids]


class JudgeRewards(Part):
    """Each rank's rewards (and critique targets) for a step's samples."""

    def __init__(self, recipe: Any, judges: list[Any], texts: Texts) -> None:
        self.recipe, self.judges, self.texts = recipe, judges, texts
        self.services = tuple(judges)
        self._judged: dict[int, dict[str, float]] = {}
        self._reference_hash: str | None = None

    def started(self, start: int, loop: Loop) -> None:
        self._reference_hash = loop.students.reference_hash()
        for pool in self.judges:
            if pool.host is not None:
                info, n = pool.host.info(), len(pool.replicas)
                print(
                    f"judge {pool.name}: served by teacher {pool.host.name}'s {n} replica(s), "
                    f"{n * info['param_bytes'] / 2**20:.0f} MiB of weights not loaded again",
                    flush=True,
                )

    def shared_weights_mib(self) -> dict[str, float]:
        """Per judge served by a teacher's replicas: the weights a judge of its own would
        have loaded again."""
        return {
            pool.name: len(pool.replicas) * pool.host.info()["param_bytes"] / 2**20
            for pool in self.judges
            if pool.host is not None
        }

    def before_train(self, item: InFlight, loop: Loop) -> None:
        """Judge the step's samples (the driver waits here, bounded, while the previous
        step trains); the ranks' RL inputs go with the train step."""
        responses, logprobs = _rank_order(loop.metas(item), loop.world, self.recipe)
        k = self.recipe.rollout.samples_per_prompt
        texts = self.texts.prompts(loop.dataset.train_prompts, item.prompt_rows, item.prompts)
        prompts = [p for p in texts for _ in range(k)]
        samples = [self.texts(r) for r in responses]
        own = np.asarray([np.mean(lp) if len(lp) else np.nan for lp in logprobs])
        rewards, sft, self._judged[item.step] = self.judge(prompts, samples, own)
        per_rank = len(samples) // loop.world
        item.rl = []
        for r in range(loop.world):
            rows = slice(r * per_rank, (r + 1) * per_rank)
            item.rl.append(
                {
                    "rewards": rewards[rows],
                    "old_logp": np.asarray(
                        [x for lp in logprobs[rows] for x in lp], dtype=np.float32
                    ),
                    "sft": self._sft_rows(prompts[rows], sft[rows]),
                }
            )

    def judge(
        self, prompts: list[str], texts: list[str], own_logp: np.ndarray | None = None
    ) -> tuple[np.ndarray, list[str | None], dict[str, float]]:
        """(reward per sample, NaN where no judge could; critique rewrites; metrics).
        `own_logp`: the student's mean log-probability of each sample where it was drawn
        (at the sampling temperature), which a relative likelihood judge subtracts."""
        k = self.recipe.rollout.samples_per_prompt
        calls = []
        for pool in self.judges:
            if pool.cfg.kind == "pairwise":  # every pair of a prompt's samples, both orders
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
                method = "score" if pool.cfg.kind == "verifier" else pool.cfg.kind
                calls.append((pool, None, pool.submit(method, prompts, texts)))
        per_judge: list[tuple[float, np.ndarray]] = []
        sft: list[str | None] = [None] * len(texts)
        stats: dict[str, float] = {}
        for pool, pairs, call in calls:
            out = pool.collect(call)
            name = pool.name
            stats[f"judge/{name}/latency_s"] = out.latency_s
            stats[f"judge/{name}/queue_depth"] = float(out.depth)
            stats[f"judge/{name}/dropped"] = float(out.dropped)
            stats[f"judge/{name}/retried"] = float(out.retried)
            stats[f"judge/{name}/restarts"] = float(sum(pool.restarts.values()))
            if pool.cfg.kind == "critique":
                sft = [v if isinstance(v, str) and v else None for v in out.values]
                continue
            values = _per_sample(out.values, pairs, len(texts))
            if pool.cfg.kind == "likelihood" and pool.cfg.relative:
                if own_logp is None:
                    raise ValueError(f"judge {name}: relative needs the samples' log-probs")
                values = values - own_logp
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

        tokenizer = self.texts.tokenizer
        if tokenizer is None or not any(rewrites):
            return None
        rows, samples = [], []
        for prompt, text in zip(prompts, rewrites, strict=True):
            if not text:
                continue
            ids, start = encode_chat(tokenizer, prompt, text, True)
            ids = ids[: start + self.recipe.rollout.max_new_tokens]
            rows.append(np.asarray(ids[:start], np.int32))
            samples.append(Sample(ids[start:], [0.0] * (len(ids) - start), "stop"))
        if not rows:
            return None
        return assemble(rows, samples, tokenizer.pad_token_id or 0)

    def step_metrics(self, item: Queued, metrics: dict[str, float], loop: Loop) -> None:
        metrics.update(self._judged.pop(item.step, {}))

    def headline(self, metrics: dict[str, float]) -> dict[str, float]:
        return {"reward": metrics.get("reward_mean", math.nan)}

    def finish(self, summary: dict[str, Any], loop: Loop) -> None:
        if loop.students.reference_hash() != self._reference_hash:
            raise RuntimeError("the frozen reference model changed during training")
        summary["reference_hash"] = self._reference_hash
        summary["judge_shared_weights_mib"] = self.shared_weights_mib()

    def shutdown(self, keep: bool) -> None:
        for pool in self.judges:
            pool.shutdown(keep)


def _rank_order(
    metas: list[dict[str, Any]], world: int, recipe: Any
) -> tuple[list[list[int]], list[list[float]]]:
    """Responses and their log-probs in rank order (shard i came from engine i mod R)."""
    engines = len(metas)
    per_rank = recipe.train.batch_size // world
    responses, logprobs = [], []
    for shard in range(world):
        meta, j = metas[shard % engines], shard // engines
        responses += meta["responses"][j * per_rank : (j + 1) * per_rank]
        logprobs += meta["logprobs"][j * per_rank : (j + 1) * per_rank]
    return responses, logprobs


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
