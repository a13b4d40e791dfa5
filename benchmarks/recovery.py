"""Recovery from faults, side by side in one run: the same deterministic run three times in
one Ray, uninterrupted, with a teacher replica SIGKILLed inside `score`, and with a student
rank SIGKILLed inside `train_step` (one kill each, after the first checkpoint); then, on a
three-node local cluster (`tests/multinode_run.py --node-loss`, its own process), the run
uninterrupted and with the whole node that hosts a teacher replica and a student rank
SIGKILLed after the first checkpoint.

- steps_lost: steps missing or logged twice in the final MLflow history of the two faulted
  runs, plus steps whose final weights differ from the uninterrupted run's (must be 0).
- teacher_recovery_over_step: (faulted run's wall time - uninterrupted) / median step time.
  It holds the restart of the teacher's process and model, and the retried call.
- student_recovery_over_step: the same for a student rank: the group is rebuilt (DeepSpeed
  init), loaded from the last checkpoint and the steps since are trained again.
- node_loss_steps_lost: the same count as steps_lost for the node loss, against the
  uninterrupted run on the same cluster.
- node_loss_seconds_lost: wall time with the node loss minus without, on the same cluster.
  It holds Ray noticing the node is gone (its health checks), the teacher restarted on the
  surviving node, the student group rebuilt there and the steps since the checkpoint.

Usage: python benchmarks/recovery.py [--steps 24] [--only node]
Ends with `RESULT steps_lost X`, `RESULT node_loss_steps_lost X`,
`RESULT teacher_recovery_over_step X`, `RESULT student_recovery_over_step X` and
`RESULT node_loss_seconds_lost X`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from common import history, median, run_recipe

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

WARMUP = 2
ROOT = Path(__file__).resolve().parents[1]


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
    ap.add_argument("--only", choices=["actors", "node"], help="one half of the benchmark")
    args = ap.parse_args()
    from actors.models import save_tiny_llama

    root = Path(tempfile.mkdtemp(prefix="recovery-"))
    m = {
        "teacher": save_tiny_llama(str(root / "teacher"), 1, vocab_size=512, hidden=256, layers=4),
        "student": save_tiny_llama(str(root / "student"), 2, vocab_size=512, hidden=64, layers=2),
    }
    results = []
    if args.only != "node":
        results.append(actor_cases(m, root, args.steps))
    if args.only != "actors":
        results.append(node_case(m, root, args.steps))
    for lines in results:  # every RESULT line last, steps lost first
        print(*(x for x in lines if x.startswith("RESULT") and "steps_lost" in x), sep="\n")
    for lines in results:
        print(*(x for x in lines if x.startswith("RESULT") and "steps_lost" not in x), sep="\n")


def actor_cases(m: dict[str, str], root: Path, n: int) -> list[str]:
    """One actor killed at a time, in one local Ray. Returns the RESULT lines."""
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        base, base_wall = timed(root / "base.yaml", recipe(m, root / "base", "base", n), None)
        steps = history(base, "step_time_s")
        step = median([v for s, v in steps.items() if s > WARMUP])
        runs = {
            "teacher": timed(
                root / "t.yaml", recipe(m, root / "t", "tkill", n), "TeacherActor.score"
            ),
            "student": timed(
                root / "s.yaml", recipe(m, root / "s", "skill", n), "StudentWorker.train_step"
            ),
        }
    finally:
        ray.shutdown()
    lost = 0
    print(f"uninterrupted: {base_wall:.1f}s, median step {step:.2f}s")
    for kind, (result, wall) in runs.items():
        rows = Counter(r.step for r in _rows(result))
        got = result.summary["student_dir"]
        lost += _lost(rows, n, base.summary["student_dir"], got, f"{kind} killed", wall - base_wall)
    out = [f"RESULT steps_lost {lost}"]
    for kind, (_, wall) in runs.items():
        out.append(f"RESULT {kind}_recovery_over_step {(wall - base_wall) / step:.2f}")
    return out


def node_case(m: dict[str, str], root: Path, n: int) -> list[str]:
    """The run on a head and two worker nodes, uninterrupted and with the node that hosts
    a teacher replica and a student rank killed after the first checkpoint. Returns the
    RESULT lines."""
    raw = recipe(m, root / "node", "node", n)
    raw["teachers"][0].update(replicas=2, resources={"worker": 1})
    raw["student"].update(resources={"worker": 1}, placement="spread")
    raw.pop("cluster")
    path = root / "node.json"
    path.write_text(json.dumps(raw))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    env.pop("RAY_ADDRESS", None)
    script = str(ROOT / "tests" / "multinode_run.py")
    proc = subprocess.run(
        [sys.executable, script, "--node-loss", "--base", str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT_JSON ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"node case failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out = json.loads(lines[0].removeprefix("RESULT_JSON "))
    base, run = out["base"], out["node_loss"]
    doomed = out["nodes"]["doomed"]
    hosted = {k: sum(a["node"] == doomed for a in v) for k, v in run["placement_before"].items()}
    lost_s = run["wall_s"] - base["wall_s"]
    print(
        f"node case: uninterrupted {base['wall_s']:.1f}s; node killed after step "
        f"{run['killed_after_step']}, {run['killed_at']:.1f}s in, hosting {hosted}"
    )
    rows = Counter({int(k): v for k, v in run["rows_per_step"].items()})
    lost = _lost(rows, n, base["student_dir"], run["student_dir"], "node killed", lost_s)
    return [f"RESULT node_loss_steps_lost {lost}", f"RESULT node_loss_seconds_lost {lost_s:.1f}"]


def _lost(rows: Counter, n: int, want_dir: str, got_dir: str, what: str, extra_s: float) -> int:
    """Steps missing or logged twice, plus all `n` if the final weights differ."""
    import torch
    from safetensors.torch import load_file

    want = load_file(Path(want_dir) / "model.safetensors")
    got = load_file(Path(got_dir) / "model.safetensors")
    same = want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    missing = set(range(1, n + 1)) - set(rows)
    twice = sum(c - 1 for c in rows.values())
    print(
        f"{what}: {extra_s:+.1f}s, steps logged {len(rows)}/{n}, logged twice {twice}, "
        f"weights equal {same}"
    )
    return len(missing) + twice + (0 if same else n)


def _rows(result):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=result.summary["tracking_uri"])
    return client.get_metric_history(result.summary["mlflow_run_id"], "loss")


if __name__ == "__main__":
    main()
