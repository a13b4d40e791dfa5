"""Rollout tokens/s, vLLM vs transformers backend: the same student (the quickstart's
6-layer SmolLM2 cut), the same chat prompts, the same sampling, one run.

Each backend runs in a RolloutEngine actor (the one `raydistill run` uses) with the same
threads, one after the other so neither competes for cores. The load is realistic: every
call has `--batch` sequences in flight (default 64). tokens/s = tokens written / the
engine's busy time, median over `--repeats` calls after one warm-up call.

Usage: python benchmarks/rollout_speed.py [--batch 64] [--max-new-tokens 64]
Ends with `RESULT vllm_over_hf_rollout X` (goal: at least 3).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402
import ray  # noqa: E402

PROMPTS = Path(__file__).resolve().parent.parent / "recipes" / "data" / "quickstart_prompts.jsonl"
LAYERS = [0, 5, 11, 17, 23, 29]


def prompts(model: str, n: int) -> list[np.ndarray]:
    from transformers import AutoTokenizer

    from actors.chat import render_prompt_ids

    tok = AutoTokenizer.from_pretrained(model)
    rows = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()[:n]]
    return [np.asarray(render_prompt_ids(tok, p), dtype=np.int32) for p in rows]


def measure(backend: str, model: str, batch: list[np.ndarray], args, stops: list[int]) -> dict:
    from actors.rollout import RolloutEngine
    from actors.specs import EngineSpec
    from orchestrator.actor_env import actor_options

    spec = EngineSpec(
        model=model,
        layers=LAYERS,
        backend=backend,
        dtype="auto",
        threads=args.threads,
        weight_sync="auto",
        num_gpus=0.0,
        stop_ids=stops,
        pad=stops[0] if stops else 0,
        seed=0,
        max_model_len=512,
    )
    engine = ray.remote(RolloutEngine).options(**actor_options(args.threads, 0, args.threads))
    engine = engine.remote(spec)
    sampling = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": args.max_new_tokens}
    seeds = [[1000 + i for i in range(len(batch))]]
    rates, tokens = [], []
    try:
        for call in range(args.repeats + 1):
            seeds = [[s + call * len(batch) for s in seeds[0]]]
            *_, meta = ray.get(
                engine.generate.options(num_returns=2).remote([batch], seeds, sampling, -1, [])
            )
            if call:  # the first call warms up
                rates.append(meta["new_tokens"] / meta["busy_s"])
                tokens.append(meta["new_tokens"])
    finally:
        ray.kill(engine)
    return {"tokens_per_s": statistics.median(rates), "tokens_per_call": statistics.median(tokens)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    from actors.model_store import fetch_model
    from orchestrator.rollouts import stop_token_ids_of

    model = fetch_model("smollm2-135m-instruct")
    batch = prompts(model, args.batch)
    stops = stop_token_ids_of(model)
    ray.init(num_cpus=args.threads, include_dashboard=False, logging_level="warning")
    try:
        results = {b: measure(b, model, batch, args, stops) for b in ("hf", "vllm")}
    finally:
        ray.shutdown()
    print(f"\n{'':20}{'hf':>12}{'vllm':>12}")
    for key in results["hf"]:
        print(f"{key:20}" + "".join(f"{results[b][key]:>12.1f}" for b in results))
    print(f"({args.batch} sequences in flight, {args.threads} threads, 6-layer SmolLM2 student)")
    ratio = results["vllm"]["tokens_per_s"] / results["hf"]["tokens_per_s"]
    print(f"RESULT vllm_over_hf_rollout {ratio:.2f}")


if __name__ == "__main__":
    main()
