"""Actors kept warm between runs in one Ray (orchestrator/warm.py), on real actors and
DeepSpeed ranks: the next run of the same shape is served by the same processes and ends
with the weights a fresh start gives; a teacher folder rewritten in place and the actors of
a failed run are never reused."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import psutil
import pytest
from conftest import base_recipe, write_recipe
from safetensors.torch import load_file

from orchestrator import train_loop, warm
from orchestrator.driver import execute, new_run_dir
from orchestrator.preflight import preflight
from orchestrator.recipe import load_recipe


def _pids(result) -> dict[str, list[int]]:
    run_dir = Path(result.summary["student_dir"]).parent
    placement = json.loads((run_dir / "placement.json").read_text())
    return {k: [a["pid"] for a in v] for k, v in placement.items()}


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _weights(result) -> dict:
    return load_file(Path(result.summary["student_dir"]) / "model.safetensors")


def test_the_next_run_reuses_the_processes_and_trains_the_same(
    ray_session, tiny_models, tmp_path, monkeypatch
):
    teacher = str(tmp_path / "teacher")
    shutil.copytree(tiny_models["teacher"], teacher)
    raw = base_recipe(
        tmp_path,
        {**tiny_models, "teacher": teacher},
        train={"steps": 6, "log_every": 3},
        student={"world_size": 2},
    )
    recipe = preflight(load_recipe(write_recipe(tmp_path, raw)))
    warm.release()
    fresh = execute(recipe, new_run_dir(recipe))
    again = execute(recipe, new_run_dir(recipe))
    assert _pids(again) == _pids(fresh)
    a, b = _weights(fresh), _weights(again)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert again.summary["teacher_served"] == fresh.summary["teacher_served"]  # per run

    # the teacher's folder rewritten in place: a new replica loads it; the ranks serve again
    config = Path(teacher) / "config.json"
    config.write_text(config.read_text())
    os.utime(config, ns=(1, 1))
    changed = execute(recipe, new_run_dir(recipe))
    pids = _pids(changed)
    assert pids["teacher tiny"] != _pids(again)["teacher tiny"]
    assert pids["student student"] == _pids(again)["student student"]

    # a run that fails parks nothing (it took the parked ones, and they are killed)
    def fail(self, *args, **kwargs):
        raise RuntimeError("boom")

    assert warm.parked()
    monkeypatch.setattr(train_loop.TrainLoop, "run", fail)
    with pytest.raises(RuntimeError, match="boom"):
        execute(recipe, new_run_dir(recipe))
    assert not warm.parked()
    deadline = time.monotonic() + 30
    alive = set(sum(pids.values(), []))
    while alive and time.monotonic() < deadline:
        alive = {p for p in alive if _running(p)}
        time.sleep(0.2)
    assert not alive  # the processes it took are gone, not merely forgotten


def test_a_folder_stamp_changes_with_any_file(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"12")
    before = warm.folder_stamp(str(tmp_path))
    (tmp_path / "a.bin").write_bytes(b"123")
    assert warm.folder_stamp(str(tmp_path)) != before
    assert warm.folder_stamp("HuggingFaceTB/SmolLM2-135M-Instruct") == []
    assert warm.folder_stamp(None) == warm.folder_stamp("") == []  # not the working folder
