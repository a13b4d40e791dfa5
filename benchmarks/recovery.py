"""Recovery from faults, side by side in one Ray: the same deterministic run three times,
uninterrupted, with a teacher replica SIGKILLed inside `score`, and with a student rank
SIGKILLed inside `train_step` (one kill each, after the first checkpoint).

- steps_lost: steps missing or logged twice in the final MLflow history of the two faulted
  runs, plus steps whose final weights differ from the uninterrupted run's (must be 0).
- teacher_recovery_over_step: (faulted run's wall time - uninterrupted) / median step time.
  It holds the restart of the teacher's process and model, and the retried call.
- student_recovery_over_step: the same for a student rank: the group is rebuilt (DeepSpeed
  init), loaded from the last checkpoint and the steps since are trained again.

Usage: python benchmarks/recovery.py [--steps 24]
Ends with `RESULT steps_lost X`, `RESULT teacher_recovery_over_step X` and
`RESULT student_recovery_over_step X`.
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

from common import history, median, run_recipe

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

WARMUP = 2


def recipe(m: dict[str, str], root: Path, name: str, steps: int) -> dict:
    return {
        "run": {"name": name, "output_dir": str(root / "runs"), "seed": 0},
        "teachers": [{"name": "t", "model": m["teacher"], "num_cpus": 0.4}],
        "student": {"model": m["student"], "world_size": 2, "num_cpus": 0.3},
        "data": {"source": "synthetic", "seq_len": 128, "heldout": 4},
        "distill": {"top_k": 32, "prefetch_depth": 3},
        "train": {"steps": steps, "batch_size": 16, "micro_batch_size": 8, "log_every": 4},
        "checkpoint": {"every": 6},
        "cluster": {"num_cpus": os.cpu_count()},
    }


def kill_once(title: str, ready: Path, killed: list[int], stop: threading.Event) -> None:
    """SIGKILL the first process titled `ray::<title>` (Ray's title while a worker runs that
    method) seen once a run under `ready` has a checkpoint (so a lost rank can restore)."""
    import psutil

    while not any(ready.glob("*/checkpoints/latest.json")) and not stop.is_set():
        time.sleep(0.02)
    while not killed and not stop.is_set():
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if " ".join(proc.info["cmdline"] or []).startswith(f"ray::{title}"):
                os.kill(proc.info["pid"], signal.SIGKILL)
                killed.append(proc.info["pid"])
                break
        time.sleep(0.01)


def timed(path: Path, raw: dict, kill: str | None):
    killed: list[int] = []
    stop = threading.Event()
    thread = None
    if kill:
        runs = Path(raw["run"]["output_dir"])
        args = (kill, runs, killed, stop)
        thread = threading.Thread(target=kill_once, args=args, daemon=True)
        thread.start()
    start = time.perf_counter()
    result = run_recipe(path, raw)
    wall = time.perf_counter() - start
    stop.set()
    if kill and not killed:
        raise SystemExit(f"{kill}: no process was killed; raise --steps")
    return result, wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=24)
    args = ap.parse_args()
    import ray
    import torch
    from safetensors.torch import load_file

    from actors.models import save_tiny_llama

    root = Path(tempfile.mkdtemp(prefix="recovery-"))
    m = {
        "teacher": save_tiny_llama(str(root / "teacher"), 1, vocab_size=512, hidden=256, layers=4),
        "student": save_tiny_llama(str(root / "student"), 2, vocab_size=512, hidden=64, layers=2),
    }
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        base, base_wall = timed(
            root / "base.yaml", recipe(m, root / "base", "base", args.steps), None
        )
        steps = history(base, "step_time_s")
        step = median([v for s, v in steps.items() if s > WARMUP])
        runs = {
            "teacher": timed(
                root / "t.yaml", recipe(m, root / "t", "tkill", args.steps), "TeacherActor.score"
            ),
            "student": timed(
                root / "s.yaml",
                recipe(m, root / "s", "skill", args.steps),
                "StudentWorker.train_step",
            ),
        }
    finally:
        ray.shutdown()
    want = load_file(Path(base.summary["student_dir"]) / "model.safetensors")
    lost = 0
    print(f"uninterrupted: {base_wall:.1f}s, median step {step:.2f}s")
    for kind, (result, wall) in runs.items():
        logged = [r.step for r in _rows(result)]
        missing = set(range(1, args.steps + 1)) - set(logged)
        twice = len(logged) - len(set(logged))
        got = load_file(Path(result.summary["student_dir"]) / "model.safetensors")
        same = all(torch.equal(want[k], got[k]) for k in want)
        lost += len(missing) + twice + (0 if same else args.steps)
        print(
            f"{kind} killed: {wall:.1f}s ({wall - base_wall:+.1f}s), steps logged "
            f"{len(set(logged))}/{args.steps}, logged twice {twice}, weights equal {same}"
        )
    print(f"RESULT steps_lost {lost}")
    for kind, (_, wall) in runs.items():
        print(f"RESULT {kind}_recovery_over_step {(wall - base_wall) / step:.2f}")


def _rows(result):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=result.summary["tracking_uri"])
    return client.get_metric_history(result.summary["mlflow_run_id"], "loss")


if __name__ == "__main__":
    main()
