"""Live pipeline overhead and wire size, measured side by side in one run.

overhead = wall time per step / max(teacher busy per step, student busy per step), the busy
times measured inside the actors. 1.00 means the driver, Ray and the object store add
nothing on top of the slower side. Also prints bytes per token on the wire versus fp32
full-vocab logits. Usage: python benchmarks/pipeline_overhead.py [--steps 60]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import history, median, models, run_recipe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--top-k", type=int, default=64)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="rd-bench-"))
    m = models(root / "models", args.vocab, teacher_hidden=256, student_hidden=128)
    raw = {
        "run": {"name": "overhead", "output_dir": str(root / "runs")},
        "teachers": [{"name": "t", "model": m["teacher"], "num_cpus": 0.5, "threads": 1}],
        "student": {"model": m["student"], "world_size": 1, "num_cpus": 0.5, "threads": 1},
        "data": {
            "source": "synthetic",
            "seq_len": 128,
            "heldout": 4,
            "synthetic": {"num_sequences": 256},
        },
        "distill": {"top_k": args.top_k, "prefetch_depth": 2},
        "train": {"steps": args.steps, "batch_size": 4, "micro_batch_size": 4, "log_every": 20},
        "checkpoint": {"every": 0},
    }
    result = run_recipe(root / "recipe.yaml", raw)
    warm = args.steps // 5  # skip start-up steps
    wall = history(result, "step_time_s")
    teacher = history(result, "teacher_busy_s")
    student = history(result, "student_busy_s")
    per_token = history(result, "signal_bytes_per_token")
    steps = [s for s in wall if s > warm]
    ratio = median([wall[s] / max(teacher[s], student[s]) for s in steps])
    bytes_tok = median([per_token[s] for s in steps])
    dense = 4 * args.vocab
    print(f"steps measured            {len(steps)} (after {warm} warm-up steps)")
    print(f"median wall per step      {median([wall[s] for s in steps]) * 1e3:.1f} ms")
    print(f"median teacher busy       {median([teacher[s] for s in steps]) * 1e3:.1f} ms")
    print(f"median student busy       {median([student[s] for s in steps]) * 1e3:.1f} ms")
    print(f"overhead ratio            {ratio:.3f}  (goal <= 1.10)")
    print(f"signal bytes per token    {bytes_tok:.1f}  (goal <= 256 at k=64)")
    print(f"fp32 full-vocab / signal  {dense / bytes_tok:.0f}x smaller")


if __name__ == "__main__":
    main()
