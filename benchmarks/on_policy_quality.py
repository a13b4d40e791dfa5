"""On-policy vs off-policy distillation on the real teacher, 2 x 2 so the effect of the
student's own data is not confused with the loss: lambda 0 / 1 x forward / reverse KL, the
same student init, steps and seed (recipes/on_policy.yaml otherwise).

Two measures, after training:
- held-out KL(teacher || student) on teacher-written text (the run's own eval);
- exposure bias: the teacher's reverse KL, KL(student || teacher), on the student's own
  samples for prompts no run trained on (2 samples per prompt at T = 1, fixed seeds),
  exact over the full vocab, per response token.

Usage: python benchmarks/on_policy_quality.py [--steps 50] [--heldout-prompts 32]
Ends with `RESULT heldout_kl_<arm> X` and `RESULT exposure_kl_<arm> X` for the four arms.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "on_policy.yaml"
PROMPTS = ROOT / "recipes" / "data" / "quickstart_prompts.jsonl"
ARMS = {  # name: (lambda, loss)
    "off_fkl": (0.0, "forward_kl"),
    "off_rkl": (0.0, "reverse_kl"),
    "on_fkl": (1.0, "forward_kl"),
    "on_rkl": (1.0, "reverse_kl"),
}


@torch.no_grad()
def exposure_kl(student_dir: str, teacher, tok, prompts: list[str]) -> float:
    """Mean over response tokens of KL(student || teacher) on the student's own samples."""
    from transformers import AutoModelForCausalLM

    from actors.chat import render_prompt_ids
    from actors.rollout import HFSampler, request_seed
    from orchestrator.rollouts import stop_token_ids_of

    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    stops = stop_token_ids_of(student_dir)
    rows = [np.asarray(render_prompt_ids(tok, p), np.int32) for p in prompts for _ in range(2)]
    seeds = [request_seed(1234, 0, i) for i in range(len(rows))]
    sampling = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 32}
    samples = HFSampler(student, torch.device("cpu")).sample(rows, seeds, sampling, stops, 0)
    total, count = 0.0, 0
    for prompt, sample in zip(rows, samples, strict=True):
        if not sample.response:
            continue
        ids = torch.tensor([[*prompt.tolist(), *sample.response]])
        start = len(prompt) - 1  # position t predicts token t+1: the response's predictions
        end = ids.shape[1] - 1
        log_q = torch.log_softmax(student(input_ids=ids).logits[0, start:end].float(), -1)
        log_p = torch.log_softmax(teacher(input_ids=ids).logits[0, start:end].float(), -1)
        total += float((log_q.exp() * (log_q - log_p)).sum())
        count += end - start
    return total / max(count, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--heldout-prompts", type=int, default=32)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.model_store import fetch_model
    from orchestrator.driver import execute, new_run_dir
    from orchestrator.preflight import preflight
    from orchestrator.recipe import load_recipe

    teacher_dir = fetch_model("smollm2-135m-instruct")
    root = Path(tempfile.mkdtemp(prefix="rd-onpolicy-quality-"))
    lines = PROMPTS.read_text().splitlines()
    held = [json.loads(x)["prompt"] for x in lines[-args.heldout_prompts :]]
    train_file = root / "train_prompts.jsonl"
    train_file.write_text("\n".join(lines[: -args.heldout_prompts]) + "\n")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    cache = str(Path("runs").resolve())  # the teacher's responses are cached across arms
    results = {}
    for name, (lmbda, loss) in ARMS.items():
        overrides = [
            f"run.name=quality-{name}",
            f"run.output_dir={cache}",
            f"data.path={train_file}",
            f"distill.lambda={lmbda}",
            f"distill.loss={loss}",
            f"train.steps={args.steps}",
            "checkpoint.every=0",
        ]
        recipe = preflight(load_recipe(RECIPE, overrides))
        summary = execute(recipe, new_run_dir(recipe)).summary
        results[name] = {
            "heldout_kl": summary["eval_after"]["kl"],
            "heldout_ppl": summary["eval_after"]["ppl"],
            "exposure_kl": exposure_kl(summary["student_dir"], teacher, tok, held),
        }
        print(f"{name}: {results[name]}", flush=True)
    print(f"\n{'arm':10}{'lambda':>8}{'loss':>12}{'heldout KL':>12}{'ppl':>10}{'exposure KL':>13}")
    for name, r in results.items():
        lmbda, loss = ARMS[name]
        print(
            f"{name:10}{lmbda:>8.0f}{loss:>12}{r['heldout_kl']:>12.3f}{r['heldout_ppl']:>10.1f}"
            f"{r['exposure_kl']:>13.3f}"
        )
    print(f"({args.steps} steps each, same init and seed; exposure on {len(held)} unseen prompts)")
    for name, r in results.items():
        print(f"RESULT heldout_kl_{name} {r['heldout_kl']:.4f}")
        print(f"RESULT exposure_kl_{name} {r['exposure_kl']:.4f}")


if __name__ == "__main__":
    main()
