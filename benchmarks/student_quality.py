"""Students worth distilling: every lever alone, and the best combination, against plain CE
and today's top-k KD on the quickstart's work (SmolLM2-135M-Instruct -> a 6-layer cut, the
same teacher-written text, 64 held-out rows, the split seed of benchmarks/kd_vs_ce.py).

Every student is scored afterwards by `raydistill eval` (orchestrator/evaluate.py), which
did not train it: dense KL(teacher || student) over the full vocab on the held-out rows (the
main figure), the top-64 KL beside it, perplexity; the KL at init is the cut student's,
before any step. Arms (`--arms`, results cached per arm and seed in `--out`):

  ce          distill.alpha 1 (plain fine-tuning on the teacher's text), today's init
  kd          top-64 forward KL (today), today's init (the quickstart's layers)
  hidden      distill.signal hidden: the teacher's exact full-vocab distribution
  features    top-64 KD + the feature loss (uniform pairs, cosine)
  every_nth   top-64 KD, student.init every_nth 6
  importance  top-64 KD, student.init by_importance (6 blocks, 64 calibration rows)
  repair      recipes/progressive.yaml: 10 steps of the feature loss alone, then 40 of KD
  chain       recipes/assistant_chain.yaml: a 15-layer assistant (25 steps) teaches the cut (25)
  best        the combination chosen on seed 0 (BEST below)
  gemma_kd, gemma_hidden   top-64 vs the exact signal at vocab 262144 (Gemma-3-270m -> its
              6-layer cut)

Usage: python benchmarks/student_quality.py [--arms ce,kd,best] [--seeds 3] [--steps 50]
Ends with `RESULT kl_ce_over_best` and `RESULT kl_topk_over_best` (mean over seeds of the
dense held-out KL ratios) and writes the best recipe as recipes/best_student.yaml.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
COMMON = ["data.heldout=64", "train.eval_every=0", "checkpoint.every=0"]
LEVERS: dict[str, list[str]] = {
    "ce": ["distill.alpha=1.0"],
    "kd": [],
    "hidden": ["distill.signal=hidden"],
    "features": ['distill.features={"loss": "cosine", "weight": 1.0}'],
    "every_nth": ["student.layers=null", 'student.init={"every_nth": 6}'],
    "importance": [
        "student.layers=null",
        'student.init={"by_importance": {"layers": 6, "calibration_rows": 64}}',
    ],
}
# the exact signal at vocab 262144: Gemma-3-270m teaching its own 6-layer cut
SMOLLM, GEMMA = "smollm2-135m-instruct", "gemma3-270m"
GEMMA_CUT = [
    f"teachers.0.model={GEMMA}",
    f"student.model={GEMMA}",
    "student.layers=[0, 3, 7, 10, 14, 17]",
]
LEVERS["gemma_kd"] = GEMMA_CUT
LEVERS["gemma_hidden"] = [*GEMMA_CUT, "distill.signal=hidden"]
# staged recipes (their own step split, 50 in all)
STAGED = {
    "repair": (ROOT / "recipes" / "progressive.yaml", []),
    "chain": (ROOT / "recipes" / "assistant_chain.yaml", []),
}
LEVERS.update({arm: [] for arm in STAGED})
# chosen on seed 0 from the levers alone (README, "Students worth distilling")
BEST = [*LEVERS["importance"], *LEVERS["features"]]
LEVERS["best"] = BEST


def run_arm(arm: str, seed: int, steps: int, out: Path) -> dict[str, Any]:
    """Train one student, then evaluate it (and its untrained cut) outside the run."""
    from mlflow.tracking import MlflowClient

    from orchestrator.cli import main as cli

    name = f"sq-{arm}-s{seed}-n{steps}"
    recipe, levers = STAGED.get(arm, (QUICKSTART, [*LEVERS[arm], f"train.steps={steps}"]))
    teacher, out = (GEMMA, out / "gemma") if arm.startswith("gemma") else (SMOLLM, out)
    if any("by_importance" in x for x in levers):  # it calibrates on given responses:
        levers += [f"data.path={responses_file(out)}", "data.responses=given"]  # the cached
    overrides = [*COMMON, *levers, f"run.seed={seed}", f"run.name={name}"]
    start = time.perf_counter()
    assert cli(["run", str(recipe), *overrides, f"run.output_dir={out / 'runs'}"]) == 0
    wall = time.perf_counter() - start
    (run_dir,) = sorted((out / "runs").glob(f"{name}-*"))[-1:]
    first = run_dir
    if (run_dir / "stages").is_dir():  # the first train stage cuts, the last one ends
        staged = yaml.safe_load((run_dir / "recipe.yaml").read_text())["stages"]
        trains = [run_dir / "stages" / x["name"] for x in staged if x["kind"] == "train"]
        first, run_dir = trains[0], trains[-1]
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'runs' / 'mlflow.db'}")
    run_id = json.loads((run_dir / "state.json").read_text())["run_id"]
    wire = client.get_metric_history(run_id, "signal_bytes_per_token")
    after = dense_eval(run_dir, out, teacher)
    init = dense_eval(export_init(first, out), out, teacher, like=first)
    return {
        "arm": arm,
        "seed": seed,
        "steps": steps,
        "overrides": LEVERS[arm],
        "kl_init": init["kl_dense"],
        "kl": after["kl_dense"],
        "kl_top64": after["kl_topk"],
        "ppl": after["ppl_student"],
        "top1": after["top1_agreement"],
        "wall_s": wall,
        "bytes_per_token": wire[0].value if wire else float("nan"),
        "layers": chosen_layers(first),
    }


def chosen_layers(run_dir: Path) -> list[int] | None:
    """The layers `student.init` chose for the run (None: the recipe's `layers`)."""
    path = run_dir / "student_init.json"
    return json.loads(path.read_text())["student"]["layers"] if path.is_file() else None


def responses_file(out: Path) -> Path:
    """The teacher-written responses every arm trained on (the runs' shared cache)."""
    (found,) = sorted((out / "runs" / "cache").glob("responses-*.parquet"))[:1]
    return found


def dense_eval(student: Path, out: Path, teacher: str, like: Path | None = None) -> dict[str, Any]:
    """`raydistill eval` of a run directory (or a folder, split like run `like`)."""
    from actors.model_store import fetch_model
    from orchestrator.evaluate import EvalRequest, evaluate_command

    recipe = yaml.safe_load(((like or student) / "recipe.yaml").read_text())
    target = student / "eval.json"
    req = EvalRequest(
        student=str(student),
        teacher=str(fetch_model(teacher)),
        data=str(responses_file(out)),
        out=str(target),
        heldout=recipe["data"]["heldout"],
        split_seed=recipe["data"].get("split_seed", 0),
        seq_len=recipe["data"]["seq_len"],
        top_k=64,
        max_new_tokens=0,
    )
    assert evaluate_command(req) == 0
    return json.loads(target.read_text())


def export_init(run_dir: Path, out: Path) -> Path:
    """The run's student before any step: its source model cut to the run's layers."""
    from transformers import AutoTokenizer

    from actors.model_store import local_model
    from actors.models import build_student

    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    layers = chosen_layers(run_dir) or recipe["student"].get("layers")
    folder = out / "init" / "-".join(map(str, layers or ["all"]))
    if not (folder / "config.json").is_file():
        source = local_model(recipe["student"]["model"])
        build_student(source, layers).save_pretrained(folder)
        AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def table(results: list[dict[str, Any]]) -> None:
    arms = sorted({r["arm"] for r in results}, key=list(LEVERS).index)
    head = (
        "arm          steps seeds  KL init   KL dense (mean ± sd)  top-64 KL    ppl   wall s  B/tok"
    )
    print("\n" + head)
    for arm in arms:
        for steps in sorted({r["steps"] for r in results if r["arm"] == arm}):
            rs = [r for r in results if r["arm"] == arm and r["steps"] == steps]
            kl = [r["kl"] for r in rs]
            sd = statistics.stdev(kl) if len(kl) > 1 else 0.0
            init = statistics.mean(r["kl_init"] for r in rs)
            print(
                f"{arm:<12} {steps:>5} {len(rs):>5} {init:8.3f}"
                f" {statistics.mean(kl):10.3f} ± {sd:<7.3f} "
                f"{statistics.mean(r['kl_top64'] for r in rs):11.3f}"
                f" {statistics.mean(r['ppl'] for r in rs):7.1f}"
                f" {statistics.mean(r['wall_s'] for r in rs):8.0f}"
                f" {statistics.mean(r['bytes_per_token'] for r in rs):6.0f}"
            )


def write_best(path: Path = ROOT / "recipes" / "best_student.yaml") -> Path:
    """The quickstart with the best combination applied, as a staged recipe: `by_importance`
    calibrates on given responses, so a `label` stage has the teacher write them first."""
    from orchestrator.recipe import apply_overrides

    raw = apply_overrides(yaml.safe_load(QUICKSTART.read_text()), BEST)
    raw["run"]["name"] = "best_student"
    raw["data"].pop("responses", None)  # prompts: the label stage writes the responses
    raw["stages"] = [{"name": "label", "kind": "label"}, {"name": "distill", "kind": "train"}]
    note = (
        "# The best student recipe benchmarks/student_quality.py found (README, Students\n"
        "# worth distilling): the quickstart with " + "; ".join(BEST) + ",\n"
        "# after a label stage (by_importance calibrates on given responses).\n"
        "#   raydistill run recipes/best_student.yaml\n"
    )
    path.write_text(note + yaml.safe_dump(raw, sort_keys=False))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arms", default="ce,kd,best")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", default="student_quality")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "results.json"
    results = json.loads(cache.read_text()) if cache.is_file() else []
    for arm in args.arms.split(","):
        if arm not in LEVERS:
            ap.error(f"--arms: {arm!r} is not one of {list(LEVERS)}")
        for seed in range(args.seeds):
            done = [
                r for r in results if (r["arm"], r["seed"], r["steps"]) == (arm, seed, args.steps)
            ]
            if done and done[0]["overrides"] == LEVERS[arm]:
                continue
            results = [r for r in results if r not in done]
            results.append(run_arm(arm, seed, args.steps, out))
            cache.write_text(json.dumps(results, indent=1))
            print(f"{arm} seed {seed}: KL {results[-1]['kl']:.3f}", flush=True)
    table(results)
    print(f"wrote {write_best()}")
    at = [r for r in results if r["steps"] == args.steps]
    by = {(r["arm"], r["seed"]): r["kl"] for r in at}
    seeds = [s for s in range(args.seeds) if all((a, s) in by for a in ("ce", "kd", "best"))]
    if seeds:
        ce = statistics.mean(by[("ce", s)] / by[("best", s)] for s in seeds)
        kd = statistics.mean(by[("kd", s)] / by[("best", s)] for s in seeds)
        print(f"RESULT kl_ce_over_best {ce:.4f}")
        print(f"RESULT kl_topk_over_best {kd:.4f}")


if __name__ == "__main__":
    main()
