"""Resume is exact, and the run is really recorded in MLflow (read back with its client)."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import torch
from conftest import base_recipe, write_recipe
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from orchestrator.checkpoint import read_ledger, tag_for, write_json
from orchestrator.cli import main
from orchestrator.critical_path import WAIT_SHARE
from orchestrator.tracking import Tracker, prepare_store


def _run_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("t-"))


def test_resume_matches_uninterrupted_run(ray_session, tiny_models, tmp_path, capsys):
    raw = base_recipe(
        tmp_path,
        tiny_models,
        student={"zero_stage": 2, "world_size": 2},
        train={"steps": 12},
        checkpoint={"every": 4},
    )
    path = write_recipe(tmp_path, raw)
    runs = tmp_path / "runs"

    assert main(["run", str(path)]) == 0
    (full,) = _run_dirs(runs)
    assert main(["run", str(path), "--stop-after", "5"]) == 0
    (stopped,) = [d for d in _run_dirs(runs) if d != full]
    assert read_ledger(stopped)["step"] == 5
    assert not (stopped / "summary.json").exists()
    assert "raydistill resume" in capsys.readouterr().out

    # step 5 was already queued on the ranks when step 4's checkpoint was taken: resuming
    # from step 4 must still retrace the uninterrupted run exactly
    from_4 = runs / "from-4" / stopped.name
    shutil.copytree(stopped, from_4)
    (from_4 / "state.json").unlink()  # its own MLflow run
    ledger = read_ledger(stopped)
    assert ledger["committed"] == [tag_for(4), tag_for(5)]
    write_json(
        from_4 / "checkpoints" / "latest.json",
        {**ledger, "step": 4, "tag": tag_for(4), "committed": [tag_for(4)]},
    )

    assert main(["resume", str(stopped)]) == 0
    assert main(["resume", str(from_4)]) == 0
    assert read_ledger(stopped)["step"] == 12
    a = load_file(full / "student" / "model.safetensors")
    for resumed in (stopped, from_4):
        b = load_file(resumed / "student" / "model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (resumed, key)

    # both runs logged every step exactly once
    client = MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    run_ids = [json.loads((d / "state.json").read_text())["run_id"] for d in (full, stopped)]
    for run_id in run_ids:
        steps = [m.step for m in client.get_metric_history(run_id, "loss")]
        assert sorted(steps) == list(range(1, 13))
        assert client.get_run(run_id).info.status == "FINISHED"

    capsys.readouterr()  # a finished run is not resumed again
    assert main(["resume", str(stopped)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"raydistill: error: {stopped}: this run already finished"]


def test_mlflow_run_params_metrics_and_student(ray_session, tiny_models, tmp_path):
    raw = base_recipe(tmp_path, tiny_models, train={"steps": 12})
    assert main(["run", str(write_recipe(tmp_path, raw))]) == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("raydistill")
    (run,) = client.search_runs([exp.experiment_id])
    params = run.data.params
    assert params["train.steps"] == "12"
    assert params["distill.top_k"] == "16"
    assert params["teacher.tiny.vocab_size"] == "96"
    assert int(params["student.num_params"]) > 0
    m = run.data.metrics
    for key in (
        "loss",
        "kd",
        "ce",
        "kl/tiny",
        "tokens_per_s",
        "teacher_busy_s",
        "teacher_busy_s/tiny",
        "teacher_cpu_s/tiny",
        "student_busy_s",
        "student_cpu_s",
        "actors_cpu_s",
        "inflight_depth",
        "bytes_moved",
        "eval/kl",
        "eval/ppl",
    ):
        assert key in m, key
    assert m["signal_bytes_per_token"] == 16 * 4  # uint16 id + float16 log-prob, k=16
    assert m["tokens_per_s"] > 0 and m["bytes_moved"] > 0
    kl = client.get_metric_history(run.info.run_id, "eval/kl")
    assert [x.step for x in kl] == [0, 12] and kl[1].value < kl[0].value
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"recipe.yaml", "student", "summary.json", "curves.png"} <= artifacts
    student = {a.path for a in client.list_artifacts(run.info.run_id, "student")}
    assert "student/config.json" in student

    # the tiny ranks never wait for the teacher: watched over steps 4-7 (after the start-up
    # step and the 2 the prefetch window covers), it yields shared cores from step 7 on (its
    # answer arrives behind the scoring it has queued), and is back at 0 when parked
    def history(key: str) -> list[float]:
        rows = client.get_metric_history(run.info.run_id, key)
        return [m.value for m in sorted(rows, key=lambda m: m.step)]

    waits, walls = history("signal_wait_s"), history("step_time_s")
    shares = [w / t for w, t in zip(waits, walls, strict=True)]
    assert statistics.mean(shares[3:7]) <= WAIT_SHARE, shares
    nice = history("teacher_nice")
    assert nice[:6] == [0.0] * 6 and set(nice[9:]) == {19.0}, nice
    (run_dir,) = _run_dirs(tmp_path / "runs")
    (replica,) = json.loads((run_dir / "placement.json").read_text())["teacher tiny"]
    stats = Path(f"/proc/{replica['pid']}/task").glob("*/stat")
    assert {int(p.read_text().rsplit(")", 1)[1].split()[16]) for p in stats} == {0}


def test_tracker_replays_a_checkpoints_rows_once(tmp_path):
    """A crash between the ledger and MLflow: the resumed run's tracker logs the rows kept
    with the checkpoint, minus those MLflow already holds (also when MLflow took part of
    them), and a second replay (a restore in the same run) logs nothing."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = Tracker(uri, "e", tmp_path / "art", "r", None)
    for step in range(1, 5):
        first.log_metrics(step, {"loss": 1.0 / step, "kl": 2.0 / step})
    first.log_metrics(4, {"eval/kl": 0.5})
    rows = first.pending_rows()  # what the checkpoint at step 4 keeps
    kept = [r for r in rows if r[0] == "loss" or r[3] <= 2]  # MLflow took part of them
    first.discard()
    first.replay(kept)
    run_id = first.run_id

    resumed = Tracker(uri, "e", tmp_path / "art", "r", run_id)
    resumed.replay(rows)
    resumed.replay(rows)
    resumed.log_metrics(5, {"loss": 0.1})
    resumed.commit()
    client = MlflowClient(tracking_uri=uri)
    history = {k: [m.step for m in client.get_metric_history(run_id, k)] for k in ("loss", "kl")}
    assert sorted(history["loss"]) == [1, 2, 3, 4, 5]
    assert sorted(history["kl"]) == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run_id, "eval/kl")] == [4]


def test_the_store_is_prepared_quietly_without_a_run(tmp_path, capfd):
    """The store opened while the actors start: its tables exist afterwards, it holds no
    experiment of ours and no run (a refused run leaves none), MLflow's notices stay off
    the console; a server is left to the Tracker (its client retries for minutes)."""
    db = tmp_path / "new" / "mlflow.db"
    db.parent.mkdir()
    prepare_store(f"sqlite:///{db}").join(timeout=120)
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    assert [e.name for e in client.search_experiments()] == ["Default"]
    assert client.search_runs(["0"]) == []
    assert prepare_store("http://127.0.0.1:9/mlflow") is None  # a server: the Tracker's
    out, err = capfd.readouterr()
    assert "database tables" not in out + err, err


def test_a_new_store_is_a_copy_of_an_empty_one_made_once(tmp_path, monkeypatch):
    """A new sqlite store is seeded from an empty one (its schema migrations run once per
    machine): same tables and schema version as a store MLflow makes, the Default experiment
    where this store's MLflow puts it, and a store that exists is never replaced."""
    import sqlite3

    from orchestrator.tracking import seed_store

    monkeypatch.setenv("RAYDISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)

    def schema(db: Path) -> tuple[list, list]:
        """Tables, indexes and their columns and constraints (MLflow's own migrations
        write a table's constraints in varying order), and the schema version."""
        with sqlite3.connect(db) as con:
            rows = con.execute("SELECT name, sql FROM sqlite_master ORDER BY name").fetchall()
            version = con.execute("SELECT version_num FROM alembic_version").fetchall()
        con.close()
        parts = [
            (name, sorted(x.strip(" ,") for x in (sql or "").splitlines())) for name, sql in rows
        ]
        return parts, version

    made = tmp_path / "made.db"
    made_client = MlflowClient(tracking_uri=f"sqlite:///{made}")
    (default,) = made_client.search_experiments()
    seeded = [tmp_path / f"a{i}" / "mlflow.db" for i in range(2)]
    for db in seeded:
        db.parent.mkdir()
        seed_store(f"sqlite:///{db}")
    (template,) = (tmp_path / "cache" / "mlflow").glob("empty-*.db")
    assert schema(seeded[0]) == schema(made) == schema(seeded[1])
    client = MlflowClient(tracking_uri=f"sqlite:///{seeded[0]}")
    (ours,) = client.search_experiments()
    assert (ours.name, ours.artifact_location) == ("Default", default.artifact_location)
    run = client.create_run("0")
    stamp = template.stat().st_mtime_ns
    seed_store(f"sqlite:///{seeded[0]}")  # exists: left alone
    assert client.get_run(run.info.run_id).info.run_id == run.info.run_id
    assert template.stat().st_mtime_ns == stamp  # made once
    assert sorted(p.name for p in seeded[0].parent.iterdir()) == ["mlflow.db"]  # no leftovers
