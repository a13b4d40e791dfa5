"""Distillation vs plain cross-entropy on the same teacher-written text, same student init,
same steps, measured side by side: held-out KL(teacher||student) and perplexity.

Usage: python benchmarks/kd_vs_ce.py [recipe] [overrides...]  (default: the quickstart)
"""

from __future__ import annotations

import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from orchestrator.driver import execute, new_run_dir
from orchestrator.plots import plot_curves
from orchestrator.preflight import preflight
from orchestrator.recipe import load_recipe

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"


def run(recipe_path: Path, overrides: list[str]) -> dict:
    recipe = preflight(load_recipe(recipe_path, overrides))
    return execute(recipe, new_run_dir(recipe)).summary


def main() -> None:
    recipe_path = Path(sys.argv[1]) if len(sys.argv) > 1 else RECIPE
    extra = ["train.eval_every=10", *sys.argv[2:]]  # a held-out curve, not just two points
    kd = run(recipe_path, [*extra, "distill.alpha=0.0", "run.name=bench-kd"])
    ce = run(recipe_path, [*extra, "distill.alpha=1.0", "run.name=bench-ce"])
    print(f"{'':28}{'before':>10}{'KD':>10}{'CE':>10}")
    for key in ("kl", "ppl"):
        b, k, c = kd["eval_before"][key], kd["eval_after"][key], ce["eval_after"][key]
        print(f"held-out {key:<19}{b:>10.4f}{k:>10.4f}{c:>10.4f}")
    ratio = ce["eval_after"]["kl"] / kd["eval_after"]["kl"]
    client = MlflowClient(tracking_uri=kd["tracking_uri"])
    runs = {"KD": (client, kd["mlflow_run_id"]), "CE": (client, ce["mlflow_run_id"])}
    png = plot_curves(runs, ["eval/kl", "eval/ppl", "kl"], Path("kd_vs_ce.png"))
    print(f"plot: {png.resolve()}")
    print(f"KL(CE student) / KL(KD student) = {ratio:.2f}  (>1: distillation wins)")


if __name__ == "__main__":
    main()
