"""On-policy pipeline overhead, strictly on-policy vs one-step-off, side by side in one run.

overhead = wall time per step / max(rollout CPU, teacher CPU, student CPU, all actors' CPU
/ the cores Ray may use), per step, median over the steps after warm-up. The stages are the
rollout engines (write the samples), the teachers (score them) and the student ranks
(train). Strictly on-policy (max_staleness 0) runs them one after another, so its ratio is
about (rollout + teacher + student) / the slowest; one-step-off (max_staleness 1) writes
step t+1's samples while step t trains, so only the machine's cores bound it. Goal: one-
step-off at most 1.15. Also the weight sync (the ranks' gather + the engine's load), one-
step-off: `weight_sync_share` = median over the steps after warm-up of sync time / step
wall time (goal: at most 0.10), `weight_sync_ms_per_mparam` = median sync ms per million
student parameters, and MiB per sync. `--backend vllm` syncs into vLLM engines (in place on
CPU, `actors/vllm_weights.py`); `--weight-sync nccl|ipc|rdt` takes vLLM's GPU weight transfer
instead (`actors/vllm_transfer.py`; needs GPUs: ipc puts student and engine on one GPU).

Usage: python benchmarks/on_policy_overhead.py [--steps 30] [--backend hf|vllm]
       [--vocab 8192] [--student-hidden 128] [--weight-sync auto|in_place|reload|nccl|ipc|rdt]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import history, median, models, run_recipe


def recipe(
    m: dict[str, str],
    root: Path,
    name: str,
    staleness: int,
    steps: int,
    backend: str,
    weight_sync: str = "auto",
) -> dict:
    gpus = {"nccl": 1.0, "ipc": 0.5, "rdt": 1.0}.get(weight_sync, 0.0)  # ipc: one shared GPU
    return {
        "run": {"name": name, "output_dir": str(root / "runs")},
        "teachers": [{"name": "t0", "model": m["teacher"], "num_cpus": 0.6}],
        "student": {"model": m["student"], "world_size": 1, "num_cpus": 0.6, "num_gpus": gpus},
        "data": {"source": "synthetic", "seq_len": 16, "heldout": 4},
        "distill": {"mode": "on_policy", "lambda": 1.0, "loss": "reverse_kl", "top_k": 64},
        "rollout": {
            "max_new_tokens": 48,
            "samples_per_prompt": 2,
            "max_staleness": staleness,
            "num_cpus": 0.6,
            "num_gpus": gpus,
            "backend": backend,
            "weight_sync": weight_sync,
        },
        "train": {"steps": steps, "batch_size": 8, "micro_batch_size": 4, "log_every": 10},
        "checkpoint": {"every": 0},
        "cluster": {"num_cpus": os.cpu_count()},
    }


def measure(result, cores: int) -> dict[str, float]:
    mparams = result.summary["student_params"] / 1e6
    wall = history(result, "step_time_s")
    warm = max(wall) // 5
    steps = [s for s in wall if s > warm]
    keys = ["rollout/cpu_s", "teacher_cpu_s", "student_cpu_s"]
    stages = {k: history(result, k) for k in keys}
    total = history(result, "actors_cpu_s")
    ratio = [wall[s] / max(*(stages[k][s] for k in keys), total[s] / cores) for s in steps]
    sync = history(result, "sync/time_s")
    synced = [s for s in steps if s in sync]
    return {
        "steps": len(steps),
        "wall_ms": median([wall[s] for s in steps]) * 1e3,
        "rollout_cpu_ms": median([stages["rollout/cpu_s"][s] for s in steps]) * 1e3,
        "teacher_cpu_ms": median([stages["teacher_cpu_s"][s] for s in steps]) * 1e3,
        "student_cpu_ms": median([stages["student_cpu_s"][s] for s in steps]) * 1e3,
        "actors_cpu_ms": median([total[s] for s in steps]) * 1e3,
        "staleness_max": max(history(result, "rollout/staleness").values()),
        "rollout_tokens_per_s": median(list(history(result, "rollout/tokens_per_s").values())),
        "sync_ms": median([sync[s] for s in synced]) * 1e3,
        "weight_sync_share": median([sync[s] / wall[s] for s in synced]),
        "weight_sync_ms_per_mparam": median([sync[s] for s in synced]) * 1e3 / mparams,
        "in_place_share": median(list(history(result, "sync/in_place").values()) or [0.0]),
        "sync_mb": median(list(history(result, "sync/bytes").values())) / 2**20,
        "overhead": median(ratio),
    }


def load_both_ways(student: str, repeats: int = 3) -> dict[str, float]:
    """The same snapshot loaded into one vLLM engine (in a Ray actor, as in a run) in place
    and through vLLM's `reload_weights`, alternately: median ms of each."""
    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from actors.vllm_backend import VLLMEngine
    from actors.weights import WeightSnapshot
    from orchestrator.actor_env import actor_options

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        engine = ray.remote(VLLMEngine).options(**actor_options(1, 0, 1))
        engine = engine.remote(student, dtype=torch.float32, max_model_len=128)
        state = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).state_dict()
        snapshot = ray.put(WeightSnapshot.of(state, 1, 0.0))
        times: dict[str, list[float]] = {"in_place": [], "reload": []}
        for _ in range(repeats):
            for how in times:
                ray.get(engine.__ray_ready__.remote())
                start = time.perf_counter()
                done = engine.load_weights.remote(snapshot, in_place=how == "in_place")
                assert ray.get(done) == how
                times[how].append(time.perf_counter() - start)
        return {how: median(t) * 1e3 for how, t in times.items()}
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    ap.add_argument("--student-hidden", type=int, default=128)
    syncs = ["auto", "in_place", "reload", "nccl", "ipc", "rdt"]
    ap.add_argument("--weight-sync", choices=syncs, default="auto")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="rd-onpolicy-"))
    m = models(root / "models", args.vocab, teacher_hidden=256, student_hidden=args.student_hidden)
    cores = os.cpu_count() or 1
    results = {}
    for name, staleness in (("strict", 0), ("one_step_off", 1)):
        raw = recipe(m, root, f"onp-{name}", staleness, args.steps, args.backend, args.weight_sync)
        results[name] = measure(run_recipe(root / f"{name}.yaml", raw), cores)
    print(f"\n{'':26}{'strict':>14}{'one_step_off':>14}")
    for key in results["strict"]:
        print(f"{key:26}" + "".join(f"{results[n][key]:>14.3f}" for n in results))
    print(f"(cores Ray may use: {cores}; goal: one-step-off overhead <= 1.15)")
    print(f"RESULT on_policy_overhead_strict {results['strict']['overhead']:.3f}")
    print(f"RESULT on_policy_overhead_one_step_off {results['one_step_off']['overhead']:.3f}")
    off = results["one_step_off"]
    print(f"RESULT weight_sync_share {off['weight_sync_share']:.4f}")
    print(f"RESULT sync_mb {off['sync_mb']:.2f}")
    print(f"RESULT weight_sync_ms_per_mparam {off['weight_sync_ms_per_mparam']:.2f}")
    if args.backend == "vllm" and args.weight_sync in ("auto", "in_place", "reload"):
        ms = load_both_ways(m["student"])
        print(
            f"engine load, same snapshot: in place {ms['in_place']:.0f} ms, vLLM reload_weights "
            f"{ms['reload']:.0f} ms"
        )
        print(f"RESULT reload_over_in_place {ms['reload'] / ms['in_place']:.2f}")


if __name__ == "__main__":
    main()
