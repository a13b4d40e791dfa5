"""Live pipeline overhead, measured side by side in one run for two setups: 1 teacher x 1
student rank, and 2 student ranks x 2 teachers (one of them with 2 replicas).

overhead = wall time per step / max(the slowest stage's CPU time per step, all actors' CPU
time per step / the cores Ray may use). A stage is a teacher (its CPU time spread over its
replicas) or the student group (the slowest rank). CPU time, not wall busy time: on a
machine with fewer cores than actors, an actor's wall time includes waiting for a core,
which would flatter the ratio. 1.00 means the driver, Ray and the object store add nothing
on top of what the machine must compute anyway. The old wall-time ratio (wall / max(teacher
busy, student busy)) is printed beside it.

Usage: python benchmarks/pipeline_overhead.py [--steps 40]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from common import history, median, models, run_recipe


def setup(
    m: dict[str, str],
    root: Path,
    name: str,
    ranks: int,
    teachers: list[int],
    steps: int,
    depth: int,
):
    share = round(2.0 / (ranks + sum(teachers)), 2)  # fractional CPUs: everything fits
    return {
        "run": {"name": name, "output_dir": str(root / "runs")},
        "teachers": [
            {"name": f"t{i}", "model": m["teacher"], "replicas": r, "num_cpus": share}
            for i, r in enumerate(teachers)
        ],
        "student": {"model": m["student"], "world_size": ranks, "num_cpus": share},
        "data": {
            "source": "synthetic",
            "seq_len": 128,
            "heldout": 4,
            "synthetic": {"num_sequences": 256},
        },
        "distill": {"top_k": 64, "prefetch_depth": depth},
        "train": {"steps": steps, "batch_size": 4, "micro_batch_size": 2, "log_every": 20},
        "checkpoint": {"every": 0},
        "cluster": {"num_cpus": os.cpu_count()},
    }


def measure(result, teachers: int, cores: int) -> dict[str, float]:
    wall = history(result, "step_time_s")
    warm = max(wall) // 5  # skip start-up steps
    steps = [s for s in wall if s > warm]
    stage_keys = ["student_cpu_s", *[f"teacher_cpu_s/t{i}" for i in range(teachers)]]
    stages = {k: history(result, k) for k in stage_keys}
    total = history(result, "actors_cpu_s")
    t_busy, s_busy = history(result, "teacher_busy_s"), history(result, "student_busy_s")
    cpu_ratio = [
        wall[s] / max(max(stages[k][s] for k in stage_keys), total[s] / cores) for s in steps
    ]
    wall_ratio = [wall[s] / max(t_busy[s], s_busy[s]) for s in steps]
    return {
        "steps": len(steps),
        "wall_ms": median([wall[s] for s in steps]) * 1e3,
        "slowest_stage_cpu_ms": median([max(stages[k][s] for k in stage_keys) for s in steps])
        * 1e3,
        "cpu_total_ms": median([total[s] for s in steps]) * 1e3,
        "driver_cpu_ms": median(list(history(result, "driver_cpu_s").values())) * 1e3,
        "overhead_cpu": median(cpu_ratio),
        "overhead_wall": median(wall_ratio),
        "bytes_per_token": median(list(history(result, "signal_bytes_per_token").values())),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--prefetch-depth", type=int, default=2)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="rd-bench-"))
    m = models(root / "models", args.vocab, teacher_hidden=256, student_hidden=128)
    cores = os.cpu_count() or 1
    results = {}
    for name, ranks, teachers in (("1x1", 1, [1]), ("2x2x2", 2, [2, 1])):
        raw = setup(m, root, f"overhead-{name}", ranks, teachers, args.steps, args.prefetch_depth)
        results[name] = measure(run_recipe(root / f"{name}.yaml", raw), len(teachers), cores)
    print(f"\n{'':34}{'1x1':>12}{'2x2x2':>12}")
    for key in results["1x1"]:
        print(f"{key:34}" + "".join(f"{results[n][key]:>12.3f}" for n in results))
    print(f"(cores Ray may use: {cores}; goal: overhead_cpu <= 1.10 on both)")
    print(f"RESULT overhead_1x1 {results['1x1']['overhead_cpu']:.3f}")
    print(f"RESULT overhead_2x2x2 {results['2x2x2']['overhead_cpu']:.3f}")


if __name__ == "__main__":
    main()
