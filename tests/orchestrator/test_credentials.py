"""An MLflow URI with a password: the run uses it, and writes or prints it nowhere (recipe
file and artifact, params, state.json, summary.json, the console, what `submit` relays)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import base_recipe, write_recipe

from orchestrator.cli import main
from orchestrator.recipe import RecipeError, load_recipe, to_yaml
from orchestrator.tracking import flatten, redact

# a raw `/` and `@` in the password: a regex that stops at either leaks the rest
URIS = {
    "http://user:p@ss/w0rd@host:5000": "http://***@host:5000",
    "https://user:p@ss@mlflow.example/x?q=1": "https://***@mlflow.example/x?q=1",
    "http://user:p/ss@host:5000/": "http://***@host:5000/",
    "postgresql://user:p@ss@db:5432/mlflow": "postgresql://***@db:5432/mlflow",
    "http://host:5000/": "http://host:5000/",
    "sqlite:////data/me@work/mlflow.db": "sqlite:////data/me@work/mlflow.db",
}


@pytest.mark.parametrize("uri", sorted(URIS))
def test_redaction_takes_the_whole_password(uri):
    assert redact(uri) == URIS[uri]
    assert redact(f"MLflow at {uri} (run 1)") == f"MLflow at {URIS[uri]} (run 1)"
    assert flatten({"tracking": {"uri": uri}}) == {"tracking.uri": URIS[uri]}


def test_the_recipe_keeps_no_password_and_a_resume_asks_mlflow_for_it(
    tmp_path, tiny_models, monkeypatch
):
    """The validated recipe holds the redacted URI (so its file, params and identity hash
    have no password); this process keeps the original for MLflow. A later process reading
    the run's recipe file needs MLflow's own variables, else one line says so."""
    from orchestrator import credentials
    from orchestrator.identity import recipe_hash

    uri = "http://user:p@ss/w0rd@host:5000"
    recipe = load_recipe(
        write_recipe(tmp_path, base_recipe(tmp_path, tiny_models)), [f"tracking.uri={uri}"]
    )
    text = to_yaml(recipe)
    assert "http://***@host:5000" in text and "p@ss" not in text and "w0rd" not in text
    assert credentials.reveal(recipe.tracking.uri) == uri  # what MLflow's client gets
    saved = tmp_path / "run" / "recipe.yaml"
    saved.parent.mkdir()
    saved.write_text(text)
    assert recipe_hash(load_recipe(saved)) == recipe_hash(recipe)  # a resume's identity
    monkeypatch.setattr(credentials, "_held", {})  # a new process: nothing held
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.mlflow/credentials either
    with pytest.raises(RecipeError, match=r"tracking.uri: http://\*\*\*@host:5000 had cred"):
        load_recipe(saved)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "user")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "p@ss/w0rd")
    assert credentials.reveal(load_recipe(saved).tracking.uri) == "http://host:5000"


class _Logs:
    """A job's log as the Jobs API returns it, growing by one piece per poll."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces, self.polls = pieces, 0

    def get_job_status(self, job: str) -> str:
        self.polls += 1
        return "SUCCEEDED" if self.polls >= len(self.pieces) else "RUNNING"

    def get_job_logs(self, job: str) -> str:
        return "".join(self.pieces[: self.polls])


def test_submit_relays_the_job_log_without_passwords(capsys):
    """A URI cut in two by a poll is shown whole and redacted, never half of it raw."""
    from orchestrator import submit

    pieces = ["step 1\nsee http://user:p@", "ss/w0rd@host:5000/#/runs/1\n", "done\n"]
    assert submit.follow_job(_Logs(pieces), "j", poll_s=0) == 0
    out = capsys.readouterr().out
    assert "see http://***@host:5000/#/runs/1\n" in out and "done\n" in out
    assert "p@" not in out and "w0rd" not in out
    with pytest.raises(RecipeError) as err:
        submit._client("http://user:p@ss/w0rd@127.0.0.1:1")
    assert "no Ray Jobs API at 'http://***@127.0.0.1:1'" in str(err.value)
    assert "w0rd" not in capsys.readouterr().err


_MLFLOW_SERVER = """
import os, sys
os.environ["_MLFLOW_SERVER_FILE_STORE"] = sys.argv[1]
os.environ["_MLFLOW_SERVER_ARTIFACT_ROOT"] = sys.argv[2]
from mlflow.server import app
from werkzeug.serving import make_server
server = make_server("127.0.0.1", 0, app, threaded=True)
print(server.server_port, flush=True)
server.serve_forever()
"""


@pytest.fixture
def mlflow_server(tmp_path_factory):
    """MLflow's own tracking server (its Flask app) on a loopback port of its own."""
    root = tmp_path_factory.mktemp("mlflow_server")
    proc = subprocess.Popen(
        [sys.executable, "-c", _MLFLOW_SERVER, f"sqlite:///{root / 'db.sqlite'}", str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        port = int(proc.stdout.readline())
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
                break
            except OSError:
                assert time.monotonic() < deadline, "the MLflow server did not start"
                time.sleep(0.2)
        yield port
    finally:
        proc.kill()
        proc.wait()


def test_a_run_with_an_mlflow_password_writes_and_prints_it_nowhere(
    ray_session, tiny_models, tmp_path, mlflow_server, capsys
):
    from mlflow.tracking import MlflowClient

    secret = "p@ss%2Fw0rd"  # `/` percent-encoded, as a working URI needs; `@` raw
    uri = f"http://alice:{secret}@127.0.0.1:{mlflow_server}"
    raw = base_recipe(tmp_path, tiny_models, tracking={"uri": uri})
    raw["train"].update(steps=2, warmup_steps=1)
    raw["student"]["world_size"] = 1
    assert main(["run", str(write_recipe(tmp_path, raw))]) == 0
    out = capsys.readouterr()
    shown = f"http://***@127.0.0.1:{mlflow_server}"
    (run_dir,) = (tmp_path / "runs").glob("t-*")
    state = json.loads((run_dir / "state.json").read_text())
    assert state["tracking_uri"] == shown and f"{shown} (run {state['run_id']})" in out.out
    assert json.loads((run_dir / "summary.json").read_text())["tracking_uri"] == shown
    written = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert any(p.name == "recipe.yaml" and "mlartifacts" in p.parts for p in written)
    for text in [out.out, out.err, *(p.read_bytes().decode("latin-1") for p in written)]:
        assert "p@ss" not in text and "w0rd" not in text and "alice" not in text
    run = MlflowClient(f"http://127.0.0.1:{mlflow_server}").get_run(state["run_id"])
    assert run.data.params["tracking.uri"] == shown and run.info.status == "FINISHED"
    assert "loss" in run.data.metrics
