"""`raydistill submit` through the real Ray Jobs API: a head node started here (its own
processes, loopback only, dashboard on 127.0.0.1), a job that runs a recipe to the end, and
its MLflow run found afterwards."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import base_recipe, write_recipe
from mlflow.tracking import MlflowClient

from orchestrator.cli import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head(tmp_path_factory):
    """A Ray head of its own, stopped at the end (the test session's Ray is left alone)."""
    from ray.job_submission import JobSubmissionClient

    ports = {
        "port": _free_port(),
        "dashboard-port": _free_port(),
        "dashboard-agent-listen-port": _free_port(),
        "dashboard-agent-grpc-port": _free_port(),
        "metrics-export-port": _free_port(),
        "runtime-env-agent-port": _free_port(),
        "ray-client-server-port": _free_port(),
    }
    temp = Path(f"/tmp/rdj{os.getpid()}")
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block"]
    cmd += [f"--{k}={v}" for k, v in ports.items()]
    cmd += ["--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=true"]
    cmd += ["--dashboard-host=127.0.0.1", f"--temp-dir={temp}"]
    # loopback only, so no token (a cluster with token auth needs RAY_AUTH_TOKEN on the client)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    # the head's `python` is this environment's, as a cluster image's would have raydistill
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    deadline = time.monotonic() + 120
    while True:
        try:
            JobSubmissionClient(address).list_jobs()
            break
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(1)
    yield address
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_a_submitted_job_runs_the_recipe_and_its_mlflow_run_is_found(
    head, tiny_models, tmp_path, capsys, monkeypatch
):
    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)  # the checkout is the job's working directory
    out = tmp_path / "shared"
    raw = base_recipe(tmp_path, tiny_models, train={"steps": 4, "log_every": 2})
    raw["student"]["world_size"] = 1
    raw["data"]["heldout"] = 4
    staging = root / f".submit-{os.getpid()}"  # inside the working directory that travels
    staging.mkdir()
    try:
        recipe = write_recipe(staging, raw)
        code = main(["submit", str(recipe), "--address", head, f"run.output_dir={out}"])
    finally:
        shutil.rmtree(staging)
    printed = capsys.readouterr().out
    assert code == 0, printed[-2000:]
    assert "submitted job" in printed and "SUCCEEDED" in printed
    (run_dir,) = out.glob("t-*")
    summary = json.loads((run_dir / "summary.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 4
