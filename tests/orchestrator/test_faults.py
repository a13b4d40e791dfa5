"""Faults during a run, on the real Ray, teacher actors and DeepSpeed ranks: a teacher
SIGKILLed three times while scoring is restarted and its calls run again (the run ends with
every step and the weights of an uninterrupted run); a student rank SIGKILLed inside a step
stops the run within seconds with one line and a resumable run directory, whose resume ends
with the uninterrupted weights; an unreachable Ray or MLflow address is one line, exit 2."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import base_recipe, write_recipe
from safetensors.torch import load_file

from actors.models import save_tiny_llama
from orchestrator.cli import main
from orchestrator.tracking import flatten


@pytest.fixture(scope="module")
def slow_teacher(tmp_path_factory) -> str:
    """A teacher heavy enough that it is scoring most of the time."""
    return save_tiny_llama(
        str(tmp_path_factory.mktemp("fault_models") / "teacher"), seed=1, hidden=256, layers=4
    )


def _raw(tmp_path: Path, tiny_models: dict[str, str], teacher: str, name: str) -> dict:
    raw = base_recipe(
        tmp_path,
        {**tiny_models, "teacher": teacher},
        data={"seq_len": 64, "heldout": 4, "synthetic": {"num_sequences": 96}},
        train={"steps": 12, "batch_size": 8, "micro_batch_size": 4, "log_every": 4},
        checkpoint={"every": 4},
        distill={"prefetch_depth": 3},
    )
    raw["run"]["name"] = name
    return raw


def _run_dir(tmp_path: Path, name: str) -> Path:
    (run_dir,) = (tmp_path / "runs").glob(f"{name}-*")
    return run_dir


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "student" / "model.safetensors")


def _killer(class_name: str, method: str, times: int, killed: list[int], stop: threading.Event):
    """SIGKILL an actor of `class_name` while one of its `method` calls is running, `times`
    times, each after the previous one came back."""
    from ray.util.state import list_actors, list_tasks

    seen: set[int] = set()
    while len(killed) < times and not stop.is_set():
        running = list_tasks(
            filters=[("name", "=", f"{class_name}.{method}"), ("state", "=", "RUNNING")]
        )
        alive = {
            a.actor_id: a.pid
            for a in list_actors(filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")])
        }
        for task in running:
            pid = alive.get(task.actor_id)
            if pid and pid not in seen:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                seen.add(pid)
                break
        time.sleep(0.05)


def _with_kills(class_name: str, method: str, times: int, run):
    killed: list[int] = []
    stop = threading.Event()
    thread = threading.Thread(target=_killer, args=(class_name, method, times, killed, stop))
    thread.start()
    try:
        return run(), killed
    finally:
        stop.set()
        thread.join()


def test_teacher_killed_three_times_while_scoring_loses_nothing(
    ray_session, tiny_models, slow_teacher, tmp_path
):
    clean = _raw(tmp_path, tiny_models, slow_teacher, "clean")
    assert main(["run", str(write_recipe(tmp_path, clean, "clean.yaml"))]) == 0
    faulty = _raw(tmp_path, tiny_models, slow_teacher, "faulty")
    path = write_recipe(tmp_path, faulty, "faulty.yaml")
    code, killed = _with_kills("TeacherActor", "score", 3, lambda: main(["run", str(path)]))
    assert code == 0 and len(killed) == 3
    run_dir = _run_dir(tmp_path, "faulty")
    state = json.loads((run_dir / "state.json").read_text())
    assert state["step"] == 12
    a, b = _weights(_run_dir(tmp_path, "clean")), _weights(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dead_student_rank_stops_the_run_in_one_line_and_resume_finishes_it(
    ray_session, tiny_models, slow_teacher, tmp_path, capsys
):
    clean = _raw(tmp_path, tiny_models, slow_teacher, "clean")
    assert main(["run", str(write_recipe(tmp_path, clean, "clean.yaml"))]) == 0
    faulty = _raw(tmp_path, tiny_models, slow_teacher, "faulty")
    path = write_recipe(tmp_path, faulty, "faulty.yaml")
    capsys.readouterr()
    start = time.monotonic()
    code, killed = _with_kills("StudentWorker", "train_step", 1, lambda: main(["run", str(path)]))
    assert time.monotonic() - start < 120  # not the 30-minute process-group timeout
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(killed) == 1
    assert err[-1].startswith("raydistill: run stopped: ") and "actor died" in err[-1]
    run_dir = _run_dir(tmp_path, "faulty")
    assert "raydistill resume" in err[-1] and str(run_dir) in err[-1]
    assert main(["resume", str(run_dir)]) == 0
    a, b = _weights(_run_dir(tmp_path, "clean")), _weights(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unreachable_ray_address_is_one_line(tmp_path, tiny_models, capsys):
    raw = base_recipe(tmp_path, tiny_models, cluster={"address": "127.0.0.1:1"})
    start = time.monotonic()
    assert main(["run", str(write_recipe(tmp_path, raw))]) == 2
    assert time.monotonic() - start < 30
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[-1]] and "cluster.address: no Ray cluster at '127.0.0.1:1'" in err[-1]
    assert not any((tmp_path / "runs").glob("t-*"))


def test_unreachable_mlflow_uri_is_one_line_without_its_password(tmp_path, tiny_models, capsys):
    uri = "http://alice:s3cret@127.0.0.1:1"
    raw = base_recipe(tmp_path, tiny_models, tracking={"uri": uri})
    assert main(["run", str(write_recipe(tmp_path, raw))]) == 2
    err = capsys.readouterr().err.strip()
    assert "tracking.uri: no MLflow server answers at http://***@127.0.0.1:1" in err
    assert "s3cret" not in err and not (tmp_path / "runs").exists()


def test_secrets_never_reach_mlflow_params():
    params = flatten(
        {"tracking": {"uri": "https://bob:hunter2@mlflow.example/x"}, "hub": {"api_key": "k"}}
    )
    assert params == {"tracking.uri": "https://***@mlflow.example/x", "hub.api_key": "***"}
