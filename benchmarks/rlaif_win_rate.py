"""RLAIF that makes the student better, counted by someone else.

1. The judge check on the real teachers: SmolLM2-135M-Instruct's and Gemma-3-270m's
   likelihood, score (1..9) and pairwise judges, 32 held-out quickstart prompts x 4
   corruptions of the teacher's greedy answer (`orchestrator/judge_check.py`).
2. The starting student: the quickstart's 6-layer cut of SmolLM2, distilled for
   `--kd-steps` (100) off-policy on the instruction set's training prompts (the teacher
   writes the answers). Not the raw cut: its repair by KD alone would look like a gain.
3. Arms from that student, `--steps` each, `--prompts` x 4 samples per step, on the
   instruction set's training prompts: `kd` (on-policy KD alone), `verifier` (the
   verifier's GRPO reward alone), `verifier_kd` (both, one backward). The training reward
   is the verifier's partial credit (`--verifier graded`) or its 0/1 (`binary`).
4. Evaluation of every student outside the runs, on `--heldout` prompts of
   `instructions_heldout.jsonl` (equal family shares), one greedy answer each: the share
   of prompts whose constraint holds (per family), the empty-answer and repeated-bigram
   shares, and the win rate against the starting student by Gemma-3-270m's likelihood
   judge, a judge that trained none of them (ties 1/2). The teacher's own greedy answers
   are scored too: the constraints KD alone could carry over.

Usage: python benchmarks/rlaif_win_rate.py [--steps 100] [--kd-steps 100] [--heldout 112]
       [--arms kd,verifier_kd,verifier] [--verifier graded|binary] [--skip-check] [--out DIR]
(a rerun in the same --out goes on from its cached check and answers: one --out per verifier).
Ends with `RESULT judge_agreement_likelihood X` (SmolLM2's), `RESULT constraint_gain X`
(points, verifier_kd), `RESULT win_rate_independent X` (the best arm) and one
`RESULT win_rate_independent_<arm> X` per arm; writes rlaif_arms.png.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "recipes" / "data"
ARMS = {"kd": (0.0, 1.0), "verifier_kd": (1.0, 1.0), "verifier": (1.0, 0.0)}  # (rl, kd)
MAX_NEW = 96
ARM_LR = 5e-5  # the recipe's 2e-5 is tuned for 30 steps on 2 prompts; arms see 8 per step
VERIFIERS = {  # the training reward of the verifier arms; evaluation is always 0/1
    "graded": "actors.verifiers:follows_instructions_graded",
    "binary": "actors.verifiers:follows_instructions",
}


def check_judges(model: str, prompts: list[str]) -> dict[str, dict[str, float]]:
    """The judge check of one teacher's three judge kinds, in this process."""
    from actors.judge import JudgeActor
    from actors.teacher import TeacherActor
    from orchestrator.judge_check import comparisons, pairwise_agreement, pointwise_agreement

    teacher = TeacherActor("t", model, top_k=1, temperature=1.0, threads=2)
    sampling = {"max_new_tokens": 48, "temperature": 0.0}
    answers = [r["response"] for r in teacher.generate(prompts, sampling)]
    del teacher
    c = comparisons(prompts, answers)
    n = len(c.kinds)
    judge = JudgeActor("j", model, min_mass=0.05, threads=2)
    out = {}
    lik = judge.likelihood(c.prompts * 2, c.originals + c.corrupted)
    out["likelihood"] = pointwise_agreement(c, lik[:n], lik[n:])
    rated = [v for v, _ in judge.scored(c.prompts * 2, c.originals + c.corrupted)]
    out["score"] = pointwise_agreement(c, rated[:n], rated[n:])
    out["pairwise"] = pairwise_agreement(
        c, judge.pairwise_orders(c.prompts, c.originals, c.corrupted)
    )
    return out


HELDOUT = 16  # of the training file, the runs' own held-out rows (at most a quarter)


def base_recipe(root: Path, name: str) -> dict:
    raw = yaml.safe_load((ROOT / "recipes" / "kd_rlaif.yaml").read_text())
    raw["run"] = {"name": name, "output_dir": str(root / "runs"), "seed": 0}
    raw["data"] = {
        "source": "file",
        "path": str(root / "train.jsonl"),
        "responses": "given",
        "seq_len": 192,
        "heldout": min(HELDOUT, len((root / "train.jsonl").read_text().splitlines()) // 4),
    }
    raw["checkpoint"] = {"every": 0}
    return raw


def kd_start(root: Path, steps: int) -> str:
    """The starting student: off-policy KD on the teacher's answers to the training prompts."""
    raw = base_recipe(root, "kd_start")
    raw["data"].update(responses="teacher", generation={"max_new_tokens": MAX_NEW})
    raw["distill"] = {"mode": "off_policy", "loss": "forward_kl", "top_k": 64}
    raw["judges"], raw["rlaif"] = [], {}
    del raw["rollout"]
    raw["train"].update(steps=steps, batch_size=8, micro_batch_size=8, lr=1e-4, warmup_steps=5)
    return str(_run(root, raw) / "student")


def arm(
    root: Path, start: str, name: str, rl: float, kd: float, steps: int, prompts: int, verifier: str
) -> Path:
    raw = base_recipe(root, name)
    raw["student"].update(model=start, layers=None)
    raw["judges"] = [{"name": "follows", "kind": "verifier", "function": VERIFIERS[verifier]}]
    raw["rollout"].update(max_new_tokens=MAX_NEW, samples_per_prompt=4)
    raw["rlaif"].update(rl_weight=rl, kd_weight=kd, win_rate_every=0, win_rate_by="evaluator")
    raw["train"].update(
        steps=steps, batch_size=prompts * 4, micro_batch_size=prompts * 4, lr=ARM_LR
    )
    return _run(root, raw)


def _run(root: Path, raw: dict) -> Path:
    from orchestrator.driver import execute, new_run_dir
    from orchestrator.preflight import preflight
    from orchestrator.recipe import load_recipe

    path = root / f"{raw['run']['name']}.yaml"
    path.write_text(yaml.safe_dump(raw))
    recipe = preflight(load_recipe(path))
    run_dir = new_run_dir(recipe)
    assert execute(recipe, run_dir).finished
    return run_dir


def answers(student: str, prompts: list[str]) -> list[str]:
    from actors.teacher import TeacherActor

    writer = TeacherActor("s", student, top_k=1, temperature=1.0, threads=2)
    sampling = {"max_new_tokens": MAX_NEW, "temperature": 0.0}
    return [r["response"] for r in writer.generate(prompts, sampling)]


def evaluate(rows: list[dict], said: list[str]) -> dict[str, float]:
    from actors.verifiers import constraints_in
    from orchestrator.win_rate import repetition, satisfaction

    kept = satisfaction([constraints_in(r["prompt"]) for r in rows], said)
    out = {key.removeprefix("eval/"): value for key, value in kept.items()}
    out["empty"] = float(np.mean([not a.strip() for a in said]))
    out["repetition"] = float(np.mean([repetition(a) for a in said]))
    out["words"] = float(np.mean([len(a.split()) for a in said]))
    return out


def win_rate(evaluator, prompts: list[str], now: list[str], start: list[str]) -> float:
    """Share of prompts where the evaluator judges the new answer more likely (ties 1/2)."""
    n = len(now)
    lik = evaluator.likelihood(prompts * 2, now + start)
    both = zip(lik[:n], lik[n:], strict=True)
    pairs = [(a, b) for a, b in both if a is not None and b is not None]
    return float(np.mean([0.5 if a == b else float(a > b) for a, b in pairs]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--kd-steps", type=int, default=100)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step (x 4 samples)")
    ap.add_argument("--heldout", type=int, default=112)
    ap.add_argument("--train-rows", type=int, default=336, help="of instructions_train.jsonl")
    ap.add_argument("--check-prompts", type=int, default=32)
    ap.add_argument("--out", default="rlaif_arms")
    ap.add_argument("--arms", default=",".join(ARMS), help="of " + ", ".join(ARMS))
    ap.add_argument("--verifier", choices=VERIFIERS, default="graded")
    ap.add_argument("--skip-check", action="store_true", help="no judge check (taken apart)")
    args = ap.parse_args()
    from actors.judge import JudgeActor
    from actors.model_store import fetch_model

    smollm, gemma = str(fetch_model("smollm2-135m-instruct")), str(fetch_model("gemma3-270m"))
    root = Path(args.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    rows = (DATA / "instructions_train.jsonl").read_text().splitlines()[: args.train_rows]
    (root / "train.jsonl").write_text("\n".join(rows) + "\n")
    quick = [json.loads(x)["prompt"] for x in (DATA / "quickstart_prompts.jsonl").open()]
    quick = quick[-args.check_prompts :]
    checked = root / "judge_check.json"  # a rerun in the same --out reads it
    if checked.exists():
        checks = json.loads(checked.read_text())
    elif args.skip_check:
        checks = {}
    else:
        checks = {"smollm2": check_judges(smollm, quick), "gemma3": check_judges(gemma, quick)}
        checked.write_text(json.dumps(checks))
    for teacher, figures in checks.items():
        for kind, f in figures.items():
            print(f"judge check {teacher} {kind}: {f}", flush=True)
    held = [json.loads(x) for x in (DATA / "instructions_heldout.jsonl").open()]
    per_family = args.heldout // 7
    held = [r for fam in sorted({r["family"] for r in held}) for r in held if r["family"] == fam]
    held = [r for i, r in enumerate(held) if i % 16 < per_family]  # equal family shares
    prompts = [r["prompt"] for r in held]
    cached = root / "answers.json"  # one entry per finished student: a rerun goes on from it
    said = json.loads(cached.read_text()) if cached.exists() else {}
    start = said.get("start_dir") or kd_start(root, args.kd_steps)
    arms = [a for a in args.arms.split(",") if a in ARMS]
    for name in ["teacher", "start", *arms]:  # the teacher: what KD alone could reach
        if name not in said:
            student = smollm if name == "teacher" else start
            if name in ARMS:
                rl, kd = ARMS[name]
                run_dir = arm(root, start, name, rl, kd, args.steps, args.prompts, args.verifier)
                student = str(run_dir / "student")
            said |= {name: answers(student, prompts), "start_dir": start}
            cached.write_text(json.dumps(said))
    said.pop("start_dir")
    arms = [a for a in ARMS if a in said]  # this run's and earlier runs' (cached)
    evaluator = JudgeActor("gemma", gemma, threads=2)  # trained none of the students
    results = {name: evaluate(held, a) for name, a in said.items()}
    for name in arms:
        results[name]["win_rate"] = win_rate(evaluator, prompts, said[name], said["start"])
    for name, r in results.items():
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()), flush=True)
    _plot(results, root / "rlaif_arms.png")
    best = max(arms, key=lambda a: results[a]["win_rate"])
    ref = "verifier_kd" if "verifier_kd" in results else arms[-1]
    gain = 100 * (results[ref]["constraints"] - results["start"]["constraints"])
    if checks:
        agreement = checks["smollm2"]["likelihood"]["agreement"]
        print(f"RESULT judge_agreement_likelihood {agreement:.3f}")
    print(f"RESULT constraint_gain {gain:.1f}")
    print(f"RESULT win_rate_independent {results[best]['win_rate']:.3f}")
    for name in arms:
        print(f"RESULT win_rate_independent_{name} {results[name]['win_rate']:.3f}")


def _plot(results: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = [k for k in results["start"] if k.startswith("constraints/")]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(results)
    for i, (name, r) in enumerate(results.items()):
        xs = np.arange(len(families)) + i * width
        ax.bar(xs, [r[f] for f in families], width, label=name)
    ax.set_xticks(np.arange(len(families)) + 0.4 - width / 2)
    ax.set_xticklabels([f.split("/")[1] for f in families], rotation=20)
    ax.set_ylabel("held-out constraints kept")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
