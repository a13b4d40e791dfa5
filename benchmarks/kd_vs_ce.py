"""Distillation vs plain cross-entropy on the same teacher-written text, same student init,
same steps, over several run seeds (the held-out split stays fixed: `data.split_seed`), so
a difference can be told from seed noise: held-out KL(teacher||student) and perplexity as
mean, std and min..max over seeds, and the per-seed ratio KL(CE)/KL(KD).

Usage: python benchmarks/kd_vs_ce.py [RECIPE] [OVERRIDE ...] [--seeds N]
(default recipe: the quickstart, with data.heldout=64; overrides such as train.steps=100 are
appended). Ends with the line `RESULT ce_over_kd_kl X` (mean over seeds; > 1: KD wins).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"
DEFAULTS = ["data.heldout=64", "train.eval_every=10"]  # a held-out curve, not two points
ARMS = {"KD": 0.0, "CE": 1.0}  # distill.alpha: weight of hard-label CE


def parse_args(argv: list[str] | None = None) -> tuple[Path, list[str], int]:
    """(recipe path, overrides, number of seeds); a first argument without `=` is the recipe."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "args",
        nargs="*",
        metavar="[RECIPE] OVERRIDE",
        help=f"recipe (default {RECIPE.name}), then dotted overrides, e.g. train.steps=100",
    )
    ap.add_argument("--seeds", type=int, default=3, help="run seeds 0..N-1 (default 3)")
    ns = ap.parse_args(argv)
    if ns.seeds < 1:
        ap.error("--seeds must be at least 1")
    rest = list(ns.args)
    recipe = Path(rest.pop(0)) if rest and "=" not in rest[0] else RECIPE
    if any("=" not in o for o in rest):
        ap.error(f"overrides look like key=value, got {[o for o in rest if '=' not in o]}")
    return recipe, rest, ns.seeds


def run_one(recipe_path: Path, overrides: list[str]) -> dict[str, Any]:
    """One training run; its summary (held-out eval before/after, MLflow run id)."""
    from orchestrator.driver import execute, new_run_dir
    from orchestrator.preflight import preflight
    from orchestrator.recipe import load_recipe

    recipe = preflight(load_recipe(recipe_path, overrides))
    return execute(recipe, new_run_dir(recipe)).summary


def spread(values: list[float]) -> str:
    """mean, sample std (0 for one seed) and min..max, one table cell group."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    span = f"{min(values):.5g}..{max(values):.5g}"
    return f"{statistics.mean(values):>12.5g}{std:>12.4g}{span:>24}"


def print_table(results: dict[str, list[dict[str, Any]]]) -> list[float]:
    """The held-out table over seeds; returns the per-seed KL(CE)/KL(KD)."""
    print(f"\n{'held-out':<10}{'arm':<8}{'mean':>12}{'std':>12}{'min..max':>24}")
    for key in ("kl", "ppl"):
        before = [s["eval_before"][key] for s in results["KD"]]
        print(f"{key:<10}{'before':<8}{spread(before)}")
        for arm, summaries in results.items():
            print(f"{key:<10}{arm:<8}{spread([s['eval_after'][key] for s in summaries])}")
    ratios = [
        ce["eval_after"]["kl"] / kd["eval_after"]["kl"]
        for kd, ce in zip(results["KD"], results["CE"], strict=True)
    ]
    per_seed = ", ".join(f"seed {i}: {r:.3f}" for i, r in enumerate(ratios))
    print(f"\nKL(CE student) / KL(KD student) per seed: {per_seed}")
    print(f"{'ratio':<18}{spread(ratios)}  (> 1: distillation wins)")
    return ratios


def plot(results: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Held-out curves of every run, one line per arm and seed."""
    from mlflow.tracking import MlflowClient

    from orchestrator.plots import plot_curves

    runs = {
        f"{arm} seed {seed}": (MlflowClient(tracking_uri=s["tracking_uri"]), s["mlflow_run_id"])
        for arm, summaries in results.items()
        for seed, s in enumerate(summaries)
    }
    return plot_curves(runs, ["eval/kl", "eval/ppl"], path)


def main(argv: list[str] | None = None) -> None:
    recipe_path, extra, seeds = parse_args(argv)
    results: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    for seed in range(seeds):
        for arm, alpha in ARMS.items():
            overrides = [
                *DEFAULTS,
                *extra,
                f"run.seed={seed}",
                f"distill.alpha={alpha}",
                f"run.name=bench-{arm.lower()}-s{seed}",
            ]
            results[arm].append(run_one(recipe_path, overrides))
    ratios = print_table(results)
    print(f"plot: {plot(results, Path('kd_vs_ce.png')).resolve()}")
    print(f"RESULT ce_over_kd_kl {statistics.mean(ratios):.4f}")


if __name__ == "__main__":
    main()
