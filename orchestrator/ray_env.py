"""Starting or joining Ray, and the environment every actor gets."""

from __future__ import annotations

import logging
import os

import ray

from orchestrator.recipe import ClusterConfig, RecipeError


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
