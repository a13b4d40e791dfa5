"""Scale-out on a local multi-node Ray: the diagonal 1x1, 2x2, 4x4 (student ranks x teacher
replicas), same global batch, data and steps, side by side in one process.

Three Ray nodes on 127.0.0.1 (`ray.cluster_utils.Cluster`): a head, a node offering
`teacher_node` and one offering `student_node`; the recipe pins teachers and students to
theirs, the student group is one packed placement group. All nodes share this machine's
cores (stated in the output), so the figures show what the system's parallelism buys when
cores are the limit, not what more machines would.

Throughput: median step time after warm-up; each arm's throughput over 1x1's.
Usage: python benchmarks/scale_out.py [--steps 14]
Ends with `RESULT throughput_2x2_over_1x1 X`, `RESULT throughput_4x4_over_1x1 X` and
`RESULT cores X`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from common import history, median, run_recipe

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

WARMUP = 3
NODE = {"node_ip_address": "127.0.0.1", "object_store_memory": 256 * 2**20}


def recipe(m: dict[str, str], root: Path, n: int, steps: int, address: str) -> dict:
    cores = os.cpu_count() or 1
    return {
        "run": {"name": f"scale{n}x{n}", "output_dir": str(root / "runs"), "seed": 0},
        "teachers": [
            {
                "name": "t",
                "model": m["teacher"],
                "replicas": n,
                "num_cpus": cores / n,
                "resources": {"teacher_node": 1},
            }
        ],
        "student": {
            "model": m["student"],
            "world_size": n,
            "num_cpus": cores / n,
            "resources": {"student_node": 1},
        },
        "data": {"source": "synthetic", "seq_len": 128, "heldout": 4},
        "distill": {"top_k": 32, "prefetch_depth": 4},
        "train": {"steps": steps, "batch_size": 16, "micro_batch_size": 16 // n, "log_every": 7},
        "checkpoint": {"every": 0},
        "cluster": {"address": address},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=14)
    args = ap.parse_args()
    from ray.cluster_utils import Cluster

    from actors.models import save_tiny_llama

    root = Path(tempfile.mkdtemp(prefix="scale-"))
    m = {
        "teacher": save_tiny_llama(str(root / "teacher"), 1, vocab_size=2048, hidden=256, layers=4),
        "student": save_tiny_llama(str(root / "student"), 2, vocab_size=2048, hidden=128, layers=2),
    }
    cores = os.cpu_count() or 1
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "num_cpus": 0})
    cluster.add_node(**NODE, num_cpus=cores, resources={"teacher_node": 4})
    cluster.add_node(**NODE, num_cpus=cores, resources={"student_node": 4})
    cluster.wait_for_nodes()
    times = {}
    try:
        for n in (1, 2, 4):
            raw = recipe(m, root, n, args.steps, cluster.address)
            result = run_recipe(root / f"scale{n}.yaml", raw)
            steps = history(result, "step_time_s")
            times[n] = median([v for s, v in steps.items() if s > WARMUP])
            print(f"{n}x{n}: median step {times[n]:.3f}s", flush=True)
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()
    print(f"cores on this machine: {cores} (every node shares them)")
    for n in (2, 4):
        print(f"RESULT throughput_{n}x{n}_over_1x1 {times[1] / times[n]:.3f}")
    print(f"RESULT cores {cores}")


if __name__ == "__main__":
    main()
