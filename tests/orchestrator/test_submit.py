"""`raydistill submit` through the real Ray Jobs API: a head node started here the ordinary
way (`ray start --head`, its own processes, loopback only, dashboard on 127.0.0.1) with Ray's
token authentication ON, a job that runs a recipe to the end, and its MLflow run found
afterwards. The token is found where Ray keeps it."""

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

from orchestrator.checkpoint import read_ledger
from orchestrator.cli import main
from orchestrator.recipe import RecipeError
from orchestrator.submit import find_token, plain_http_warning


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _without_token_settings(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in _TOKEN_VARS}


_TOKEN_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")


@pytest.fixture
def head(tmp_path_factory):
    """A Ray head of its own, stopped at the end (the test session's Ray is left alone).
    Started as a user starts one: no RAY_AUTH_MODE, a token in ~/.ray/auth_token (as any
    earlier local `ray.init()` leaves it), so token authentication is on. Yields (address,
    the home folder holding the token)."""
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
    home = tmp_path_factory.mktemp("home")
    (home / ".ray").mkdir()
    token = os.urandom(16).hex()
    (home / ".ray" / "auth_token").write_text(token + "\n")
    env = {**_without_token_settings(dict(os.environ)), "HOME": str(home)}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # the head's `python` is this environment's, as a cluster image's would have raydistill
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    deadline = time.monotonic() + 120
    bearer = {"Authorization": f"Bearer {token}"}
    while True:
        try:
            JobSubmissionClient(address, headers=bearer).list_jobs()
            break
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(1)
    yield address, home
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_a_submitted_job_runs_the_recipe_and_its_mlflow_run_is_found(
    head, tiny_models, tmp_path, capsys, monkeypatch
):
    """The head wants a token: without one submit is refused in one line naming where it
    looked; with ~/.ray/auth_token (no RAY_AUTH_MODE set) it is found, named, and works."""
    address, home = head
    for name in _TOKEN_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "nobody"))
    assert main(["submit", "--stop", "raysubmit_none", "--address", address]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"raydistill: error: --address: {address!r} wants a Ray token and none was found "
        "(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token): set one of them to the "
        "cluster's token"
    ], err
    monkeypatch.setenv("HOME", str(home))
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
        code = main(["submit", str(recipe), "--address", address, f"run.output_dir={out}"])
    finally:
        shutil.rmtree(staging)
    printed = capsys.readouterr().out
    assert code == 0, printed[-2000:]
    assert f"raydistill: using the Ray token from {home / '.ray' / 'auth_token'}" in printed
    assert "submitted job" in printed and "SUCCEEDED" in printed
    (run_dir,) = out.glob("t-*")
    summary = json.loads((run_dir / "summary.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 4


# --- sending without a token ----------------------------------------------------------------


@pytest.mark.parametrize(
    "address", ["http://10.0.0.5:8265", "10.0.0.5:8265", "http://ray-head.example:8265"]
)
def test_plain_http_to_another_machine_without_a_token_is_warned_about(address):
    warning = plain_http_warning(address, token=False)
    assert warning is not None and "no Ray token is sent" in warning
    assert "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token" in warning


@pytest.mark.parametrize(
    ("address", "token"),
    [
        ("http://127.0.0.1:8265", False),
        ("http://localhost:8265", False),
        ("http://[::1]:8265", False),
        ("https://ray-head.example", False),
        ("http://10.0.0.5:8265", True),
    ],
)
def test_loopback_https_or_a_token_are_not_warned_about(address, token):
    assert plain_http_warning(address, token) is None


def test_the_token_is_found_where_ray_keeps_it_in_rays_order(tmp_path, monkeypatch):
    """RAY_AUTH_TOKEN, then the file RAY_AUTH_TOKEN_PATH names, then ~/.ray/auth_token."""
    for name in _TOKEN_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert find_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    assert find_token() == ("home-token", str(tmp_path / ".ray" / "auth_token"))
    named = tmp_path / "elsewhere"
    named.write_text("path-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(named))
    assert find_token() == ("path-token", f"RAY_AUTH_TOKEN_PATH ({named})")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert find_token() == ("env-token", "RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    named.unlink()  # a path that names nothing is the user's mistake: one line
    with pytest.raises(RecipeError, match=f"RAY_AUTH_TOKEN_PATH: {named}: no such file"):
        find_token()


def test_submit_prints_the_warning_before_it_connects(monkeypatch, capsys, tmp_path):
    # 0.0.0.0 is not a loopback address by name, yet on an unused port the connection is
    # refused at once on this machine: the warning comes first, then the usual one line
    for name in _TOKEN_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    address = f"http://0.0.0.0:{_free_port()}"
    code = main(["submit", "--stop", "raysubmit_none", "--address", address])
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    assert err[0].startswith(f"raydistill: warning: {address} is plain http"), err
    assert err[-1].startswith("raydistill: error: --address: no Ray Jobs API"), err


# --- the RayJob entrypoint: run --run-dir ------------------------------------------------


def test_run_dir_starts_continues_and_then_leaves_a_finished_run_alone(
    ray_session, tiny_models, tmp_path, capsys
):
    """A re-created RayJob runs the same command again: the run goes on from its checkpoint,
    and once it finished the command exits 0 without touching it."""
    raw = base_recipe(tmp_path, tiny_models, train={"steps": 4, "log_every": 1})
    raw["student"]["world_size"] = 1
    raw["data"]["heldout"] = 4
    raw["checkpoint"] = {"every": 2}
    recipe = str(write_recipe(tmp_path, raw))
    run_dir = tmp_path / "shared" / "fixed"
    out = f"run.output_dir={tmp_path / 'runs'}"

    assert main(["run", "--run-dir", str(run_dir), recipe, out, "--stop-after", "2"]) == 0
    assert read_ledger(run_dir)["step"] == 2 and not (run_dir / "summary.json").exists()
    capsys.readouterr()

    # another recipe is not run on this run's checkpoint
    assert main(["run", recipe, "--run-dir", str(run_dir), out, "train.steps=6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"raydistill: error: --run-dir: {run_dir} holds an unfinished run of another recipe: "
        f"continue it with `raydistill resume {run_dir}`, or give another --run-dir"
    ]
    assert read_ledger(run_dir)["step"] == 2

    # the same command again (options before or after the overrides): it continues
    assert main(["run", recipe, "--run-dir", str(run_dir), out]) == 0
    assert f"run directory {run_dir}: continuing its run" in capsys.readouterr().out
    assert read_ledger(run_dir)["step"] == 4
    summary = run_dir / "summary.json"
    run_id = json.loads(summary.read_text())["mlflow_run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert sorted(steps) == [1, 2, 3, 4]  # every step once: none lost, none logged twice
    assert not list((tmp_path / "runs").glob("t-*")), "a time-stamped run dir was made"

    # and once more: finished, exit 0, nothing written
    before = summary.stat().st_mtime_ns
    assert main(["run", "--run-dir", str(run_dir), recipe, out]) == 0
    assert "this run already finished; nothing to do" in capsys.readouterr().out
    assert summary.stat().st_mtime_ns == before and read_ledger(run_dir)["step"] == 4


def test_run_dir_refuses_a_folder_that_holds_something_else(tmp_path, capsys):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    recipe = tmp_path / "never-read.yaml"
    assert main(["run", "--run-dir", str(other), str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    why = "is not empty and holds no run (no recipe.yaml)"
    assert err == f"raydistill: error: --run-dir: {other} {why}"
    assert sorted(p.name for p in other.iterdir()) == ["todo.txt"]
