"""Starting Ray the way `raydistill run` does: token authentication on (Ray's default for a
new local cluster), without Ray's warning about that default on every run, while other
warnings still reach the console."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_START = """
import logging
import ray
from ray._raylet import AuthenticationMode, get_authentication_mode
from orchestrator.ray_env import ensure_ray
from orchestrator.recipe import ClusterConfig

assert ensure_ray(ClusterConfig(num_cpus=1))
print("token mode:", get_authentication_mode() == AuthenticationMode.TOKEN, flush=True)
logging.getLogger("ray").warning("a warning that matters")
ray.shutdown()
"""


def test_a_local_run_has_token_auth_and_no_warning_about_it(tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")
    }
    env["HOME"] = str(tmp_path)  # no token yet: Ray makes one for the new cluster
    proc = subprocess.run(
        [sys.executable, "-c", _START],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "token mode: True" in proc.stdout
    assert (tmp_path / ".ray" / "auth_token").read_text().strip()
    assert "Token authentication" not in proc.stderr, proc.stderr
    assert "a warning that matters" in proc.stderr
