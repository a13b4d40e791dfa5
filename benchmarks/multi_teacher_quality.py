"""Student quality from SmolLM2 alone, Gemma alone (cross-tokenizer) and the blend, side by
side in one run: the same student init (the quickstart's 6-layer cut of SmolLM2), data
(the quickstart prompts with SmolLM2-written responses), steps and seed;
recipes/multi_teacher.yaml otherwise.

After training, every student is evaluated on the same held-out rows against BOTH teachers:
KL(SmolLM2 || student) over every response position, KL(Gemma || student) over the
positions the cross-tokenizer alignment covers (Gemma's top-k mapped onto the student's
pieces, its tail mass as the rest), and perplexity on the held-out gold text.

Usage: python benchmarks/multi_teacher_quality.py [--steps 50]
Ends with `RESULT heldout_kl_smollm2_<arm>`, `RESULT heldout_kl_gemma_<arm>` and
`RESULT heldout_ppl_<arm>` for the arms smollm2, gemma and blend.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import yaml  # noqa: E402
from common import run_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "multi_teacher.yaml"
ARMS = {"smollm2": ["smollm2"], "gemma": ["gemma"], "blend": ["smollm2", "gemma"]}


def arm_recipe(base: dict, root: Path, arm: str, steps: int) -> dict:
    raw = yaml.safe_load(yaml.safe_dump(base))
    raw["run"].update(name=arm, output_dir=str(root / "runs"))
    raw["teachers"] = [t for t in raw["teachers"] if t["name"] in ARMS[arm]]
    raw["data"]["path"] = str(ROOT / "recipes" / raw["data"]["path"])
    raw["data"]["heldout"] = 32
    raw["train"]["steps"] = steps
    raw["checkpoint"]["every"] = 0
    return raw


@torch.no_grad()
def evaluate(student_dir: str, heldout, signals: dict) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    from actors.models import backbone, output_head
    from actors.objective import LossSpec, SparseTarget, objective_sums

    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    ids, attn, mask = heldout.to_torch(torch.device("cpu"))
    features = backbone(model)(input_ids=ids, attention_mask=attn).last_hidden_state[mask]
    labels = torch.roll(ids, shifts=-1, dims=1)[mask]
    targets = []
    for name, sig in signals.items():
        t_ids, t_lp = sig.torch_targets()
        targets.append(SparseTarget(name, t_ids, t_lp, 0.0, train=False))
    spec = LossSpec(kind="forward_kl", temperature=1.0, alpha=0.0)
    _, terms = objective_sums(features, output_head(model), labels, targets, spec, chunk=128)
    out = {"ppl": math.exp(float(terms["ce"]) / len(labels))}
    for name in signals:
        out[f"kl_{name}"] = float(terms[f"kl/{name}"]) / max(float(terms[f"cover/{name}"]), 1)
        out[f"cover_{name}"] = float(terms[f"cover/{name}"]) / len(labels)
    return out


def heldout_signals(raw: dict, root: Path):
    """The held-out rows (as every arm's run builds them) and both teachers' signals."""
    import ray

    from actors.teacher import TeacherActor
    from orchestrator.data import build_dataset
    from orchestrator.preflight import preflight
    from orchestrator.recipe import load_recipe
    from orchestrator.teachers import LiveTeacherPool

    path = root / "eval.yaml"
    path.write_text(yaml.safe_dump(raw))
    recipe = preflight(load_recipe(path))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    try:
        writer = LiveTeacherPool(recipe.teachers[0], recipe.distill)
        heldout = build_dataset(recipe, [writer]).heldout  # responses from the cache
        writer.shutdown()
    finally:
        ray.shutdown()
    signals = {}
    for t in recipe.teachers:
        student_tok = recipe.student.model if t.cross_tokenizer else None
        actor = TeacherActor(
            t.name, t.model, top_k=64, temperature=1.0, student_tokenizer=student_tok
        )
        signals[t.name] = actor.score(heldout)
        del actor
    return heldout, signals


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    base = yaml.safe_load(RECIPE.read_text())
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for arm in ARMS:
            result = run_recipe(root / f"{arm}.yaml", arm_recipe(base, root, arm, args.steps))
            results[arm] = result.summary["student_dir"]
            print(f"{arm}: trained in {result.summary['tokens_per_s']:.0f} tok/s", flush=True)
        heldout, signals = heldout_signals(arm_recipe(base, root, "blend", 1), root)
        init = arm_recipe(base, root, "blend", 1)["student"]
        print("| arm | KL(SmolLM2 || s) | KL(Gemma || s), aligned | ppl |")
        scores = {}
        for arm, student_dir in results.items():
            scores[arm] = evaluate(student_dir, heldout, signals)
            s = scores[arm]
            print(f"| {arm} | {s['kl_smollm2']:.3f} | {s['kl_gemma']:.3f} | {s['ppl']:.2f} |")
        print(f"gemma covers {scores['blend']['cover_gemma']:.2%} of the held-out positions")
        print(f"student init: {init['model']} layers {init['layers']}")
    for arm, s in scores.items():
        print(f"RESULT heldout_kl_smollm2_{arm} {s['kl_smollm2']:.4f}")
        print(f"RESULT heldout_kl_gemma_{arm} {s['kl_gemma']:.4f}")
        print(f"RESULT heldout_ppl_{arm} {s['ppl']:.3f}")


if __name__ == "__main__":
    main()
