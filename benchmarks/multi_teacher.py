"""Multi-teacher throughput, side by side in one run, on a teacher-bound setup.

The teachers are copies of one tiny model that is much heavier than the student (threads 1
per replica, student light), so a step waits on the teachers. Arms, same data and steps:
1, 2 and 3 teachers (one replica each; all teachers of a step are called at once), and one
teacher with 1 vs 2 replicas (least-outstanding routing, prefetch deep enough for both).
Step time is the median over the steps after warm-up.

- replica_speedup = teacher throughput (shards scored per second) with 2 replicas / with 1.
  Goal: at least 1.6 when the teacher is the bottleneck.
- three_teachers_step_time_over_one: step time with 3 teachers / with 1 (on 2 cores the
  teachers share the cores, so this measures how well they overlap, ideally < 3).

Usage: python benchmarks/multi_teacher.py [--steps 24]
Ends with `RESULT replica_speedup X` and `RESULT three_teachers_step_time_over_one X`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from common import history, median, run_recipe

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

WARMUP = 4


def build_models(root: Path) -> dict[str, str]:
    from actors.models import save_tiny_llama

    return {
        "teacher": save_tiny_llama(str(root / "teacher"), 1, vocab_size=4096, hidden=512, layers=6),
        "student": save_tiny_llama(str(root / "student"), 2, vocab_size=4096, hidden=32, layers=1),
    }


def recipe(m: dict[str, str], root: Path, name: str, teachers: int, replicas: int, steps: int):
    cpus = 0.9 / (teachers * replicas)
    return {
        "run": {"name": name, "output_dir": str(root / "runs")},
        "teachers": [
            {"name": f"t{i}", "model": m["teacher"], "replicas": replicas, "num_cpus": cpus}
            for i in range(teachers)
        ],
        "student": {"model": m["student"], "world_size": 1, "num_cpus": 0.2},
        "data": {"source": "synthetic", "seq_len": 128, "heldout": 4},
        "distill": {"top_k": 32, "aggregate": "weighted", "prefetch_depth": 4},
        "train": {"steps": steps, "batch_size": 16, "micro_batch_size": 16, "log_every": 8},
        "checkpoint": {"every": 0},
        "cluster": {"num_cpus": os.cpu_count()},
    }


def step_time(result) -> float:
    times = history(result, "step_time_s")
    return median([v for s, v in times.items() if s > WARMUP])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()
    arms = {  # name: (teachers, replicas)
        "one": (1, 1),
        "two": (2, 1),
        "three": (3, 1),
        "one_x2": (1, 2),
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        m = build_models(root / "models")
        times = {}
        for name, (n, r) in arms.items():
            result = run_recipe(root / f"{name}.yaml", recipe(m, root, name, n, r, args.steps))
            times[name] = step_time(result)
            print(f"{name}: {n} teacher(s) x {r} replica(s): step {times[name]:.3f} s", flush=True)
    speedup = times["one"] / times["one_x2"]  # one shard per step: throughput ~ 1 / step time
    print(f"step time, 2 teachers / 1: {times['two'] / times['one']:.2f}")
    print(f"RESULT replica_speedup {speedup:.3f}")
    print(f"RESULT two_teachers_step_time_over_one {times['two'] / times['one']:.3f}")
    print(f"RESULT three_teachers_step_time_over_one {times['three'] / times['one']:.3f}")


if __name__ == "__main__":
    main()
