"""Offline vs live distillation, side by side in one Ray: the same recipe trained with its
teacher live, then from the teacher's cache (`raydistill cache build`), same data, seed
and steps. The teacher is much heavier than the student, as real teachers are, so a live
step waits on it; from the cache a step only reads Parquet.

- offline_over_live_steps_per_s: median step time live / from the cache.
- cache_bytes_per_token: shard bytes per loss position at k=64 (uint16 ids, float16
  log-probs, zstd); raw it would be 256. DistillKit's compressed caches take 114-300.

With `--teacher smollm2-135m-instruct` (after `raydistill models fetch`) the teacher is the
real SmolLM2 on the quickstart prompts, whose responses it writes first.
Usage: python benchmarks/offline_cache.py [--steps 24] [--teacher NAME]
Ends with `RESULT offline_over_live_steps_per_s X` and `RESULT cache_bytes_per_token X`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import history, median, run_recipe

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

WARMUP = 3
ROOT = Path(__file__).resolve().parents[1]


def recipe(teacher: str, student: str, root: Path, steps: int, real: bool) -> dict:
    raw = {
        "run": {"name": "live", "output_dir": str(root / "runs"), "seed": 0},
        "teachers": [{"name": "t", "model": teacher, "num_cpus": 1.0, "threads": 2}],
        "student": {"model": student, "world_size": 1, "num_cpus": 0.5},
        "data": {"source": "synthetic", "seq_len": 128, "heldout": 8},
        "distill": {"top_k": 64, "prefetch_depth": 2},
        "train": {"steps": steps, "batch_size": 8, "micro_batch_size": 8, "log_every": 8},
        "checkpoint": {"every": 0},
        "cluster": {"num_cpus": os.cpu_count()},
    }
    if real:  # the quickstart's data and 6-layer student cut from the teacher
        raw["data"] = {
            "source": "file",
            "path": str(ROOT / "recipes" / "data" / "quickstart_prompts.jsonl"),
            "responses": "teacher",
            "seq_len": 80,
            "heldout": 16,
            "generation": {"max_new_tokens": 48},
        }
        raw["student"].update(layers=[0, 6, 12, 18, 24, 29])
    return raw


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--teacher", default=None, help="a known model name (default: tiny)")
    args = ap.parse_args()
    import ray

    from actors.models import save_tiny_llama
    from actors.signal_cache import bytes_per_position
    from orchestrator.offline import build_command
    from orchestrator.preflight import preflight
    from orchestrator.recipe import Recipe

    root = Path(tempfile.mkdtemp(prefix="offline-"))
    if args.teacher:
        teacher = student = args.teacher
    else:
        teacher = save_tiny_llama(str(root / "t"), 1, vocab_size=4096, hidden=384, layers=6)
        student = save_tiny_llama(str(root / "s"), 2, vocab_size=4096, hidden=64, layers=1)
    raw = recipe(teacher, student, root, args.steps, bool(args.teacher))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        live = run_recipe(root / "live.yaml", raw)
        offline_raw = {**raw, "run": {**raw["run"], "name": "offline"}}
        offline_raw["distill"] = {**raw["distill"], "mode": "offline"}
        start = time.perf_counter()
        build_command(preflight(Recipe.model_validate(offline_raw)))
        build_s = time.perf_counter() - start
        offline = run_recipe(root / "offline.yaml", offline_raw)
    finally:
        ray.shutdown()
    step = {}
    for name, result in (("live", live), ("offline", offline)):
        times = history(result, "step_time_s")
        step[name] = median([v for s, v in times.items() if s > WARMUP])
        print(f"{name}: median step {step[name]:.3f}s", flush=True)
    per_token = bytes_per_position(root / "runs" / "signal_cache" / "t")
    print(f"cache build: {build_s:.1f}s for the train and held-out rows")
    print(f"RESULT offline_over_live_steps_per_s {step['live'] / step['offline']:.2f}")
    print(f"RESULT cache_bytes_per_token {per_token:.1f}")


if __name__ == "__main__":
    main()
