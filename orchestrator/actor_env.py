"""What every actor process gets from Ray: its resources, its environment, and for service
actors (teachers, rollout engines, judges) restarts. Reads a recipe section's placement
fields (num_cpus, num_gpus, threads, resources) without importing the recipe, so every
pool module can stand one level above it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol


class Placed(Protocol):
    """A recipe section that places actors (`orchestrator.recipe.Placed`)."""

    num_cpus: float
    num_gpus: float
    threads: int
    resources: dict[str, float]


def actor_env(threads: int) -> dict[str, str]:
    """Env vars for actor processes: CPU DeepSpeed, a persistent extension cache (DeepSpeed
    JIT-compiles its comm op in every init_distributed), no MLflow URI leaking in."""
    cache = Path(os.environ.get("RAYDISTILL_CACHE", Path.home() / ".cache" / "raydistill"))
    env = {
        "TORCH_EXTENSIONS_DIR": str(cache / "torch_extensions"),
        "OMP_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "MLFLOW_TRACKING_URI": "",
        "PYTHONWARNINGS": "ignore",
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        # vLLM (backend: vllm): its engine in the actor's process, caches under ours
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # Ray already gives each actor its CPUs
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CACHE_ROOT": str(cache / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "torchinductor"),
        "VLLM_LOGGING_LEVEL": "ERROR",
    }
    if not cuda_available():
        env["DS_ACCELERATOR"] = "cpu"
        # nothing of ours is compiled; vLLM compiles two small sampler helpers with
        # inductor even when eager, ~30 s of C++ per new machine or pod on CPU
        env["TORCH_COMPILE_DISABLE"] = "1"
    return env


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def actor_options(
    num_cpus: float, num_gpus: float, threads: int, resources: dict[str, float] | None = None
) -> dict[str, Any]:
    return {
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "resources": dict(resources or {}),
        "runtime_env": {"env_vars": actor_env(threads)},
    }


def service_options(cfg: Placed, max_restarts: int) -> dict[str, Any]:
    """Teacher, rollout and judge replicas: spread over the nodes that have what they ask
    for, restarted when they die, their calls in flight retried (each is idempotent)."""
    return {
        **actor_options(cfg.num_cpus, cfg.num_gpus, cfg.threads, cfg.resources),
        "scheduling_strategy": "SPREAD",
        "max_restarts": max_restarts,
        "max_task_retries": max_restarts,
    }


def demand(cfg: Placed) -> dict[str, float]:
    """What one actor of this kind reserves from Ray (a placement-group bundle)."""
    out = {"CPU": cfg.num_cpus, **cfg.resources}
    if cfg.num_gpus:
        out["GPU"] = cfg.num_gpus
    return out
