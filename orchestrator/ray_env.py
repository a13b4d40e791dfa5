"""Starting or joining Ray, and the environment every actor gets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ray

from orchestrator.recipe import ClusterConfig


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
    if not _has_cuda():
        env["DS_ACCELERATOR"] = "cpu"
    return env


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def actor_options(num_cpus: float, num_gpus: float, threads: int) -> dict[str, Any]:
    return {
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "runtime_env": {"env_vars": actor_env(threads)},
    }


def ensure_ray(cfg: ClusterConfig) -> bool:
    """Join the recipe's cluster or start a local instance; True if we started it."""
    if ray.is_initialized():
        return False
    if cfg.address:
        ray.init(address=cfg.address, log_to_driver=True)
        return False
    ray.init(
        num_cpus=cfg.num_cpus or os.cpu_count(),
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=True,
        logging_level="warning",
    )
    return True
