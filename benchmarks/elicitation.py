"""Knowledge elicitation on the real SmolLM2 teacher, side by side in one Ray: a student
trained on label-only data (the teacher answers the training prompts) against one trained
on expand+label data (the teacher first writes new instructions from 16 seed prompts,
deduplicated, then answers all), same student init, steps and batch.

Both students are then scored on the same 32 held-out prompts (answered by the teacher,
never trained on): held-out KL(teacher||student) and perplexity, through an evaluation-only
run of each exported student.

Needs `raydistill models fetch smollm2-135m-instruct`.
Usage: python benchmarks/elicitation.py [--steps 40] [--requests 64]
Ends with `RESULT instructions_per_minute X`, `RESULT kept_share_after_dedup X` and
`RESULT kl_label_only_over_expand X` (above 1: the expanded data helped).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

ROOT = Path(__file__).resolve().parents[1]
TEACHER = "smollm2-135m-instruct"


def base(root: Path, name: str, data: Path, steps: int) -> dict:
    return {
        "run": {"name": name, "output_dir": str(root / "runs"), "seed": 0},
        "teachers": [{"name": "smollm2", "model": TEACHER, "replicas": 2, "num_cpus": 0.5}],
        "student": {"model": TEACHER, "layers": [0, 5, 11, 17, 23, 29], "num_cpus": 0.5},
        "data": {
            "source": "file",
            "path": str(data),
            "generation": {"max_new_tokens": 32, "temperature": 0.0, "batch_size": 40},
            "seq_len": 80,
            "heldout": 16,
        },
        "distill": {"loss": "forward_kl", "alpha": 0.0, "top_k": 64, "prefetch_depth": 2},
        "train": {
            "steps": steps,
            "batch_size": 4,
            "micro_batch_size": 4,
            "lr": 1e-3,
            "warmup_steps": 5,
            "log_every": 10,
        },
        "checkpoint": {"every": 0},
        "cluster": {"num_cpus": os.cpu_count()},
    }


def staged(root: Path, raw: dict) -> Path:
    from orchestrator.driver import execute, new_run_dir
    from orchestrator.offline import build_command
    from orchestrator.preflight import preflight
    from orchestrator.recipe import Recipe
    from orchestrator.stages import run_stages

    recipe = preflight(Recipe.model_validate(raw))
    run_dir = new_run_dir(recipe)
    assert run_stages(recipe, run_dir, None, execute, build_command).finished
    return run_dir


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--requests", type=int, default=64)
    args = ap.parse_args()
    import ray

    root = Path(tempfile.mkdtemp(prefix="elicit-"))
    rows = (ROOT / "recipes" / "data" / "quickstart_prompts.jsonl").read_text().splitlines()
    random.Random(0).shuffle(rows)
    train, held = root / "train.jsonl", root / "eval.jsonl"
    train.write_text("\n".join(rows[32:]) + "\n")
    held.write_text("\n".join(rows[:32]) + "\n")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        label_only = base(root, "label_only", train, args.steps)
        label_only["stages"] = [{"name": "label", "kind": "label"}, {"name": "kd", "kind": "train"}]
        a = staged(root, label_only)
        expanded = base(root, "expand_label", train, args.steps)
        grow = {"seeds": 16, "requests": args.requests}
        expanded["stages"] = [
            {"name": "expand", "kind": "expand", "expand": grow},
            {"name": "label", "kind": "label"},
            {"name": "kd", "kind": "train"},
        ]
        b = staged(root, expanded)
        evaluation = base(root, "eval_data", held, 1)
        evaluation["stages"] = [{"name": "label", "kind": "label"}]
        eval_data = staged(root, evaluation) / "stages" / "label" / "data.parquet"
        scores = {}
        for name, run_dir in (("label_only", a), ("expand_label", b)):
            raw = base(root, f"eval_{name}", eval_data, 1)
            raw["student"] = {"model": str(run_dir / "stages" / "kd" / "student"), "num_cpus": 0.5}
            raw["data"].update(responses="given", heldout=24)
            raw["train"]["lr"] = 1e-9  # one step, nearly no update: eval_before is the score
            raw["stages"] = [{"name": "eval", "kind": "train"}]
            summary = json.loads((staged(root, raw) / "summary.json").read_text())
            scores[name] = summary["stages"]["eval"]["eval_before"]
    finally:
        ray.shutdown()
    figures = json.loads((b / "stages.json").read_text())["done"]["expand"]["summary"]
    for name, s in scores.items():
        print(f"{name}: held-out KL {s['kl']:.3f}, perplexity {s['ppl']:.1f}")
    print(f"expand: {figures['written']:.0f} written, {figures['kept']:.0f} kept after dedup")
    print(f"RESULT instructions_per_minute {figures['written_per_minute']:.1f}")
    print(f"RESULT kept_share_after_dedup {figures['kept_share']:.3f}")
    ratio = scores["label_only"]["kl"] / scores["expand_label"]["kl"]
    print(f"RESULT kl_label_only_over_expand {ratio:.3f}")


if __name__ == "__main__":
    main()
