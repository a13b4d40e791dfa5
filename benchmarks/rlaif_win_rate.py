"""RLAIF on the real judge: RLAIF alone vs KD alone vs KD + RLAIF, same steps, same judge
(SmolLM2-135M-Instruct rating answers 1..9), from recipes/rlaif.yaml.

For each arm: the reward curve (the judge's mean rating of the student's samples) and the
win rate of the final student against the starting student on held-out prompts, judged
pairwise in both orders by the same judge (`eval/win_rate`, a fraction; goal >= 0.6), next
to a programmatic check of the final samples (words per sample, repeated bigrams) since a
win rate judged by the training judge can reward hacking.

Is a 135M judge able to tell answers apart at all? Measured first on constructed pairs: a
reference answer (the teacher's own greedy answer) against the same words in reverse order;
agreement = share of pairs where the judge prefers the reference (both orders averaged).

Usage: python benchmarks/rlaif_win_rate.py [--steps 30]
Also the step time split into rollout, judging, teacher scoring and training (busy seconds,
median) and the overhead wall / max(stage busy).
Ends with `RESULT win_rate X` (RLAIF alone), `RESULT win_rate_kd X`,
`RESULT win_rate_kd_rlaif X`, `RESULT judge_agreement X` and `RESULT rlaif_overhead X`;
writes rlaif_reward.png.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "rlaif.yaml"
PROMPTS = ROOT / "recipes" / "data" / "quickstart_prompts.jsonl"
ARMS = {"rlaif": (1.0, 0.0), "kd": (0.0, 1.0), "kd_rlaif": (1.0, 1.0)}  # (rl, kd) weights


def judge_agreement(model: str, n: int) -> tuple[float, float]:
    """(share of constructed pairs where the judge prefers the reference, mean P(ref))."""
    from actors.judge import JudgeActor
    from actors.teacher import TeacherActor

    prompts = [json.loads(x)["prompt"] for x in PROMPTS.read_text().splitlines()[-n:]]
    teacher = TeacherActor("t", model, top_k=1, temperature=1.0)
    good = [r["response"] for r in teacher.generate(prompts, {"max_new_tokens": 32})]
    bad = [" ".join(reversed(g.split())) for g in good]
    del teacher
    judge = JudgeActor("j", model, min_mass=0.05)  # as recipes/rlaif.yaml
    p = [v for v in judge.pairwise(prompts, good, bad) if v is not None]
    return float(np.mean([v > 0.5 for v in p])), float(np.mean(p))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--pairs", type=int, default=16)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from common import history

    from actors.model_store import fetch_model
    from orchestrator.driver import execute, new_run_dir
    from orchestrator.preflight import preflight
    from orchestrator.recipe import load_recipe

    model = fetch_model("smollm2-135m-instruct")
    agreement, p_ref = judge_agreement(model, args.pairs)
    print(f"judge agreement on constructed pairs: {agreement:.2f} (mean P(reference) {p_ref:.3f})")
    results, curves = {}, {}
    for name, (rl, kd) in ARMS.items():
        overrides = [
            f"run.name=rlaif-{name}",
            f"rlaif.rl_weight={rl}",
            f"rlaif.kd_weight={kd}",
            f"train.steps={args.steps}",
            "checkpoint.every=0",
        ]
        recipe = preflight(load_recipe(RECIPE, overrides))
        result = execute(recipe, new_run_dir(recipe))
        reward = history(result, "reward_mean")
        wall = history(result, "step_time_s")
        stages = {
            "rollout": history(result, "rollout/busy_s"),
            "judging": history(result, "judge/rater/latency_s"),
            "teacher": history(result, "teacher_busy_s"),
            "training": history(result, "student_busy_s"),
        }
        warm = [s for s in sorted(wall) if s > 3]
        split = {k: float(np.median([v[s] for s in warm])) for k, v in stages.items()}
        overhead = float(np.median([wall[s] / max(v[s] for v in stages.values()) for s in warm]))
        curves[name] = reward
        steps = sorted(reward)
        results[name] = {
            "reward_first5": float(np.mean([reward[s] for s in steps[:5]])),
            "reward_last5": float(np.mean([reward[s] for s in steps[-5:]])),
            "win_rate": list(history(result, "eval/win_rate").values())[-1],
            "sample_words": list(history(result, "eval/sample_words").values())[-1],
            "repetition": list(history(result, "eval/repetition").values())[-1],
            "kl_ref": list(history(result, "rl/kl_ref").values())[-1],
            "step_s": float(np.median([wall[s] for s in warm])),
            **{f"{k}_s": v for k, v in split.items()},
            "overhead": overhead,
        }
        print(f"{name}: {results[name]}", flush=True)
    print(f"\n{'arm':10}" + "".join(f"{k:>15}" for k in results["rlaif"]))
    for name, r in results.items():
        print(f"{name:10}" + "".join(f"{v:>15.3f}" for v in r.values()))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, reward in curves.items():
        ax.plot(sorted(reward), [reward[s] for s in sorted(reward)], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("judge's mean rating of the samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig("rlaif_reward.png", dpi=120)
    print("wrote rlaif_reward.png")
    print(f"RESULT win_rate {results['rlaif']['win_rate']:.3f}")
    print(f"RESULT win_rate_kd {results['kd']['win_rate']:.3f}")
    print(f"RESULT win_rate_kd_rlaif {results['kd_rlaif']['win_rate']:.3f}")
    print(f"RESULT judge_agreement {agreement:.3f}")
    print(f"RESULT rlaif_overhead {results['rlaif']['overhead']:.3f}")


if __name__ == "__main__":
    main()
