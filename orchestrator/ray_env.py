"""Starting or joining Ray, and the environment every actor gets."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import ray

from orchestrator.recipe import ClusterConfig, Placed, RecipeError


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


class _RayChoseTokenAuth(logging.Filter):
    """Drops Ray's notice that it turned token authentication on by default ("Token
    authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out"),
    printed on every local run: nothing to act on, and the safe default is what we want.
    Its warning that authentication is OFF, and every other message, still show."""

    NOTICE = "Token authentication is enabled for this Ray cluster"

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.NOTICE)


def _quiet_token_auth_notice() -> None:
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _RayChoseTokenAuth) for f in logger.filters):
        logger.addFilter(_RayChoseTokenAuth())


def _unreachable(address: str) -> str | None:
    """Why nothing listens at a `host:port` or `ray://host:port` address (None if something
    does, or the address is not of that form): Ray itself would retry for minutes."""
    import socket

    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def ensure_ray(cfg: ClusterConfig) -> bool:
    """Join the recipe's cluster (or `RAY_ADDRESS`'s) or start a local instance; True if we
    started it. A cluster that is not there is the user's input: one line, exit 2."""
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    field = "cluster.address" if cfg.address else "RAY_ADDRESS"
    unreachable = _unreachable(address) if address else None
    if unreachable:
        raise RecipeError(field, f"no Ray cluster at {address!r} ({unreachable})")
    if ray.is_initialized():
        return False
    _quiet_token_auth_notice()
    if address:
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            why = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else "unreachable"
            raise RecipeError(field, f"no Ray cluster at {address!r} ({why})") from exc
        return False
    ray.init(
        num_cpus=cfg.num_cpus or os.cpu_count(),
        include_dashboard=cfg.dashboard,
        dashboard_host="127.0.0.1",
        log_to_driver=True,
        configure_logging=True,
        logging_level="warning",
    )
    return True
