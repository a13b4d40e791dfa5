"""`raydistill submit`: run a recipe as a Ray job on a cluster, through the Jobs API.

The working directory (this checkout, without runs, caches and virtualenvs) travels as the
job's runtime env, and the job runs `python -m orchestrator.cli run RECIPE [overrides]` on
the head node, where Ray sets RAY_ADDRESS for it. The logs are followed until the job ends;
Ctrl-C detaches (the job goes on); `raydistill submit --stop JOB --address ...` stops it.
`run.output_dir` must be a path every node can reach (shared storage): a relative one would
land in the job's temporary copy of the working directory.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from orchestrator.credentials import redact
from orchestrator.recipe import RecipeError, load_recipe

# switches of this machine's environment a job needs as well (when they are set here)
_PASSED_ON = (
    "DS_ACCELERATOR",
    "GLOO_SOCKET_IFNAME",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
    "RAYDISTILL_MODELS",
    "RAYDISTILL_CACHE",
)
# Ray's own default excludes among them: with those turned off (below), Ray no longer warns,
# once per folder, that it now skips them, which a user could do nothing about
_EXCLUDES = [".git", ".venv", "venv", "runs", "mlruns", "**/__pycache__", "*.egg-info", ".ci/cache"]
_RAY_DEFAULT_EXCLUDES = "RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES"
_DONE = {"SUCCEEDED", "FAILED", "STOPPED"}


def find_token() -> tuple[str, str] | None:
    """(token, where it came from) from where Ray keeps it, in Ray's order: RAY_AUTH_TOKEN,
    the file RAY_AUTH_TOKEN_PATH names, ~/.ray/auth_token (written by `ray start --head`,
    a local `ray.init()` or `ray get-auth-token --generate`); None if there is none."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    named = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    path = Path(named).expanduser() if named else Path.home() / ".ray" / "auth_token"
    where = f"RAY_AUTH_TOKEN_PATH ({path})" if named else str(path)
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        if named:
            raise RecipeError("RAY_AUTH_TOKEN_PATH", f"{path}: no such file") from None
        return None
    except OSError as exc:
        raise RecipeError(where, f"cannot read the Ray token ({exc.strerror})") from exc
    if not token:
        raise RecipeError(where, "the Ray token file is empty")
    return token, where


def _client(address: str):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    found = find_token()
    warning = plain_http_warning(address, found is not None)
    if warning:
        print(f"raydistill: warning: {warning}", file=sys.stderr, flush=True)
    headers = {}
    if found:  # sent whatever RAY_AUTH_MODE says here: the head decides whether it needs it
        headers["Authorization"] = f"Bearer {found[0]}"
        print(f"raydistill: using the Ray token from {found[1]}", flush=True)
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as exc:
        shown = redact(address)
        why = (
            f"{shown!r} refused the Ray token from {found[1]}: give the cluster's own"
            if found
            else f"{shown!r} wants a Ray token and none was found (RAY_AUTH_TOKEN, "
            "RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token): set one of them to the cluster's token"
        )
        raise RecipeError("--address", why) from exc
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RecipeError("--address", f"no Ray Jobs API at {redact(address)!r}") from exc


def plain_http_warning(address: str, token: bool) -> str | None:
    """Why sending to `address` is unsafe, or None. A job goes out as plain http to another
    machine with no token (`token`: one is sent): whoever can reach that port can run code
    on the cluster the same way, and the code travels readable."""
    if token:
        return None
    try:
        url = urlsplit(address if "://" in address else f"http://{address}")  # Ray's default
        host = url.hostname or ""
    except ValueError:  # not a URL: Ray refuses it with its own message
        return None
    if url.scheme != "http" or _is_loopback(host):
        return None
    return (
        f"{redact(address)} is plain http to another machine and no Ray token is sent "
        "(none in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token): set one to the "
        "cluster's token, or reach the head through a tunnel on 127.0.0.1 "
        "(kubectl port-forward, ray dashboard); see cluster/README.md"
    )


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def submit(recipe_path: str, overrides: list[str], address: str, follow: bool = True) -> int:
    recipe_file = Path(recipe_path).resolve()
    load_recipe(recipe_file, overrides)  # a bad recipe is refused here, not on the cluster
    root = Path.cwd().resolve()
    try:
        relative = recipe_file.relative_to(root)
    except ValueError as exc:
        raise RecipeError(recipe_path, f"must lie inside the working directory {root}") from exc
    entrypoint = shlex.join(["python", "-m", "orchestrator.cli", "run", str(relative), *overrides])
    env = {k: os.environ[k] for k in _PASSED_ON if k in os.environ}
    client = _client(address)
    own = _RAY_DEFAULT_EXCLUDES not in os.environ
    if own:
        os.environ[_RAY_DEFAULT_EXCLUDES] = ""
    try:
        job = client.submit_job(
            entrypoint=entrypoint,
            runtime_env={"working_dir": str(root), "excludes": _EXCLUDES, "env_vars": env},
        )
    finally:
        if own:
            del os.environ[_RAY_DEFAULT_EXCLUDES]
    shown = redact(address)
    print(
        f"submitted job {job} to {shown}; stop it with: raydistill submit --stop {job} "
        f"--address {shown}",
        flush=True,
    )
    return follow_job(client, job) if follow else 0


def follow_job(client, job: str, poll_s: float = 1.0) -> int:
    """Print the job's logs as they grow until it ends; exit code 0 if it succeeded."""
    shown = 0
    try:
        while True:
            status = str(client.get_job_status(job)).rsplit(".", 1)[-1]
            logs = client.get_job_logs(job)
            # whole lines, redacted: no URI is cut between two polls and shown half-redacted
            end = len(logs) if status in _DONE else logs.rfind("\n", shown) + 1
            if end > shown:
                print(redact(logs[shown:end]), end="", flush=True)
                shown = end
            if status in _DONE:
                print(f"job {job}: {status}", flush=True)
                return 0 if status == "SUCCEEDED" else 1
            time.sleep(poll_s)
    except KeyboardInterrupt:
        print(f"\ndetached from job {job} (it goes on)", flush=True)
        return 0


def stop(job: str, address: str) -> int:
    stopped = _client(address).stop_job(job)
    print(f"job {job}: {'stopping' if stopped else 'already finished'}", flush=True)
    return 0
