"""Faults during a run, on the real Ray, teacher actors and DeepSpeed ranks: a teacher
SIGKILLed three times while scoring is restarted and its calls run again (the run ends with
every step and the weights of an uninterrupted run); a student rank SIGKILLed inside a step
stops the run within seconds with one line and a resumable run directory, whose resume ends
with the uninterrupted weights; an unreachable Ray or MLflow address is one line, exit 2."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import base_recipe, write_recipe
from mlflow.tracking import MlflowClient
from ray.exceptions import ObjectLostError, OutOfMemoryError
from safetensors.torch import load_file

from actors.models import save_tiny_llama
from orchestrator.checkpoint import read_ledger
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
        student={"world_size": 2},  # a dead rank's peer sits in a collective
    )
    raw["run"]["name"] = name
    return raw


def _run_dir(tmp_path: Path, name: str) -> Path:
    (run_dir,) = (tmp_path / "runs").glob(f"{name}-*")
    return run_dir


def _steps_logged(run_dir: Path) -> list[int]:
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    run_id = json.loads((run_dir / "state.json").read_text())["run_id"]
    return sorted(m.step for m in client.get_metric_history(run_id, "loss"))


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "student" / "model.safetensors")


def _killer(class_name, method, times, killed, stop, ready=lambda: True, hit=None):
    """SIGKILL (or `hit(pid)`) an actor of `class_name` while one of its `method` calls is
    running (Ray titles a worker `ray::Class.method` while it runs one), `times` times, a
    new process each time, once `ready()`."""
    import psutil

    hit = hit or (lambda pid: os.kill(pid, signal.SIGKILL))
    title = f"ray::{class_name}.{method}"
    while not ready() and not stop.is_set():
        time.sleep(0.05)
    while len(killed) < times and not stop.is_set():
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if cmd.startswith(title) and proc.info["pid"] not in killed:
                hit(proc.info["pid"])
                killed.append(proc.info["pid"])
                break
        time.sleep(0.02)


def _with_kills(class_name: str, method: str, times: int, run, ready=lambda: True, hit=None):
    killed: list[int] = []
    stop = threading.Event()
    args = (class_name, method, times, killed, stop, ready, hit)
    thread = threading.Thread(target=_killer, args=args)
    thread.start()
    try:
        return run(), killed
    finally:
        stop.set()
        thread.join()


@pytest.fixture(scope="module")
def clean(ray_session, tiny_models, slow_teacher, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The final weights of the uninterrupted run every faulted run must end with."""
    tmp_path = tmp_path_factory.mktemp("clean")
    raw = _raw(tmp_path, tiny_models, slow_teacher, "clean")
    assert main(["run", str(write_recipe(tmp_path, raw, "clean.yaml"))]) == 0
    return _weights(_run_dir(tmp_path, "clean"))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_teacher_killed_three_times_while_scoring_loses_nothing(
    clean, tiny_models, slow_teacher, tmp_path
):
    faulty = _raw(tmp_path, tiny_models, slow_teacher, "faulty")
    path = write_recipe(tmp_path, faulty, "faulty.yaml")
    code, killed = _with_kills("TeacherActor", "score", 3, lambda: main(["run", str(path)]))
    assert code == 0 and len(killed) == 3
    run_dir = _run_dir(tmp_path, "faulty")
    assert read_ledger(run_dir)["step"] == 12
    assert _steps_logged(run_dir) == list(range(1, 13))  # every step once
    assert _same(clean, _weights(run_dir))


def _after_first_checkpoint(tmp_path: Path):
    def ready() -> bool:  # kill after the first checkpoint (step 4)
        return any((tmp_path / "runs").glob("faulty-*/checkpoints/latest.json"))

    return ready


def test_dead_student_rank_is_brought_back_from_the_checkpoint_in_the_same_run(
    clean, tiny_models, slow_teacher, tmp_path, capsys
):
    path = write_recipe(tmp_path, _raw(tmp_path, tiny_models, slow_teacher, "faulty"), "f.yaml")
    capsys.readouterr()
    code, killed = _with_kills(
        "StudentWorker",
        "train_step",
        1,
        lambda: main(["run", str(path)]),
        _after_first_checkpoint(tmp_path),
    )
    assert code == 0 and len(killed) == 1
    assert "bringing the student group back from the checkpoint" in capsys.readouterr().out
    run_dir = _run_dir(tmp_path, "faulty")
    assert read_ledger(run_dir)["step"] == 12
    # the rolled-back steps were trained and logged again: MLflow holds each step once
    assert _steps_logged(run_dir) == list(range(1, 13))
    assert _same(clean, _weights(run_dir))


def test_frozen_student_rank_is_detected_within_the_step_bound_and_restored(
    clean, tiny_models, slow_teacher, tmp_path, capsys
):
    """SIGSTOP: the rank does not die, it stops answering; its peers wait in a collective."""
    raw = _raw(tmp_path, tiny_models, slow_teacher, "faulty")
    raw["cluster"] = {"step_timeout_s": 10}
    path = write_recipe(tmp_path, raw, "f.yaml")
    capsys.readouterr()
    frozen_at: list[float] = []

    def freeze(pid: int) -> None:
        os.kill(pid, signal.SIGSTOP)
        frozen_at.append(time.monotonic())

    code, frozen = _with_kills(
        "StudentWorker",
        "train_step",
        1,
        lambda: main(["run", str(path)]),
        _after_first_checkpoint(tmp_path),
        hit=freeze,
    )
    out = capsys.readouterr().out
    assert code == 0 and len(frozen) == 1
    assert "no answer within 10s from student rank" in out
    assert "bringing the student group back" in out
    run_dir = _run_dir(tmp_path, "faulty")
    assert _steps_logged(run_dir) == list(range(1, 13))
    assert _same(clean, _weights(run_dir))
    import psutil

    assert not psutil.pid_exists(frozen[0]) or psutil.Process(frozen[0]).status() == "zombie"


@pytest.mark.slow
def test_out_of_memory_in_a_rank_is_one_line_and_resumable(
    ray_session, tiny_models, tmp_path, capsys
):
    """An address-space limit (RLIMIT_AS) on one rank's process, set inside a step: its
    next large allocation fails as it would on a full machine. A 64k vocab makes each
    step's logits large enough (> 32 MB) that the allocator maps new memory for them."""
    import resource

    big = {
        k: save_tiny_llama(str(tmp_path / k), seed=i, vocab_size=65536, hidden=16, layers=1)
        for i, k in enumerate(("teacher", "student"))
    }
    raw = _raw(tmp_path, big, big["teacher"], "faulty")
    raw["distill"]["chunk_mb"] = 256
    path = write_recipe(tmp_path, raw, "f.yaml")
    capsys.readouterr()

    def squeeze(pid: int) -> None:
        import psutil

        vms = psutil.Process(pid).memory_info().vms
        resource.prlimit(pid, resource.RLIMIT_AS, (vms // 2, vms // 2))

    code, hit = _with_kills(
        "StudentWorker",
        "train_step",
        1,
        lambda: main(["run", str(path)]),
        _after_first_checkpoint(tmp_path),
        hit=squeeze,
    )
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert code == 2 and len(hit) == 1, cap.out[-3000:] + cap.err[-3000:]  # change the recipe
    assert err[-1].startswith("raydistill: run stopped: train step ")
    assert "out of memory in " in err[-1] and "lower train.micro_batch_size" in err[-1]
    run_dir = _run_dir(tmp_path, "faulty")
    assert f"raydistill resume {run_dir}" in err[-1]
    assert main(["resume", str(run_dir)]) == 0
    assert _steps_logged(run_dir) == list(range(1, 13))


def test_dead_student_rank_stops_the_run_in_one_line_and_resume_finishes_it(
    clean, tiny_models, slow_teacher, tmp_path, capsys
):
    faulty = _raw(tmp_path, tiny_models, slow_teacher, "faulty")
    faulty["cluster"] = {"max_student_restores": 0}
    path = write_recipe(tmp_path, faulty, "faulty.yaml")
    capsys.readouterr()
    start = time.monotonic()

    code, killed = _with_kills(
        "StudentWorker",
        "train_step",
        1,
        lambda: main(["run", str(path)]),
        _after_first_checkpoint(tmp_path),
    )
    assert time.monotonic() - start < 120  # not the 30-minute process-group timeout
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(killed) == 1
    assert err[-1].startswith("raydistill: run stopped: ") and "actor died" in err[-1]
    run_dir = _run_dir(tmp_path, "faulty")
    assert "raydistill resume" in err[-1] and str(run_dir) in err[-1]
    assert main(["resume", str(run_dir)]) == 0
    assert read_ledger(run_dir)["step"] == 12
    assert _steps_logged(run_dir) == list(range(1, 13))  # the failed run's extra rows dropped
    assert _same(clean, _weights(run_dir))


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


def test_a_placement_the_cluster_cannot_hold_is_refused_before_any_actor(
    ray_session, tiny_models, tmp_path, capsys
):
    raw = base_recipe(tmp_path, tiny_models, student={"world_size": 2})
    raw["teachers"][0].update(replicas=3, num_cpus=1.0)  # 3 + 2 x 0.25 > the 2 CPUs here
    assert main(["run", str(write_recipe(tmp_path, raw))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cluster: the run needs 3.5 CPUs at once" in err[0]
    assert "teachers.0 3 x 1" in err[0] and "the Ray cluster has 2" in err[0]
    raw["teachers"][0].update(replicas=1, num_cpus=0.25, num_gpus=1.0)
    assert main(["run", str(write_recipe(tmp_path, raw))]) == 2
    assert "the run needs 1 GPUs at once" in capsys.readouterr().err
    assert not any((tmp_path / "runs").glob("t-*"))


def test_frozen_teacher_replica_is_restarted_by_name_and_the_run_loses_nothing(
    clean, tiny_models, slow_teacher, tmp_path, capsys
):
    """SIGSTOP a teacher replica inside `score`: the ranks wait on its signal, the step runs
    past its bound, the probe finds the replica silent, it is restarted and its calls run
    again; the students are never restored and the run ends with the uninterrupted weights."""
    raw = _raw(tmp_path, tiny_models, slow_teacher, "faulty")
    raw["cluster"] = {"step_timeout_s": 3}
    path = write_recipe(tmp_path, raw, "f.yaml")
    capsys.readouterr()
    frozen_at: list[float] = []
    gone_at: list[float] = []

    def freeze(pid: int) -> None:
        import psutil

        os.kill(pid, signal.SIGSTOP)
        frozen_at.append(time.monotonic())

        def watch() -> None:  # when the frozen process is killed
            with contextlib.suppress(psutil.NoSuchProcess):  # gone between the two checks
                while psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie":
                    time.sleep(0.05)
            gone_at.append(time.monotonic())

        threading.Thread(target=watch, daemon=True).start()

    start = time.monotonic()
    code, frozen = _with_kills(
        "TeacherActor", "score", 1, lambda: main(["run", str(path)]), hit=freeze
    )
    wall = time.monotonic() - start
    out = capsys.readouterr().out
    assert code == 0 and len(frozen) == 1
    assert "teacher tiny replica 0 did not answer a probe: restarted it (1/5)" in out, out[-2000:]
    assert "bringing the student group back" not in out
    run_dir = _run_dir(tmp_path, "faulty")
    assert _steps_logged(run_dir) == list(range(1, 13))
    assert _same(clean, _weights(run_dir))
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    run_id = json.loads((run_dir / "state.json").read_text())["run_id"]
    tags = client.get_run(run_id).data.tags
    assert tags.get("restarts/teacher tiny replica 0") == "1"
    assert "student_restores" not in tags
    assert gone_at, "the frozen replica was never killed"
    print(
        f"\nfrozen teacher: killed {gone_at[0] - frozen_at[0]:.1f}s after SIGSTOP; run {wall:.1f}s"
    )


def test_a_judge_that_hangs_is_restarted_at_most_max_restarts_times(ray_session, tmp_path):
    """Past its restarts a hung judge is stopped for good: its calls fail at once (dropped,
    counted) instead of a new actor and two bounded waits every step."""
    from orchestrator.judges import JudgePool
    from orchestrator.recipe import ClusterConfig
    from orchestrator.rlaif_config import JudgeConfig

    cfg = JudgeConfig(name="hangs", function="toy_judges:hangs", timeout_s=1.0, num_cpus=0.1)
    pool = JudgePool(cfg, None, ClusterConfig(max_restarts=1))
    try:
        outcomes, seconds = [], []
        for _ in range(3):
            begin = time.monotonic()
            outcomes.append(pool.collect(pool.submit("score", ["p", "q"], ["a", "b"])))
            seconds.append(time.monotonic() - begin)
        assert [o.dropped for o in outcomes] == [2, 2, 2]
        assert outcomes[0].errors == ["timeout", "timeout"]  # restarted once, hung again
        assert outcomes[1].errors[0] == "timeout"  # past max_restarts: stopped for good
        assert "timeout" not in outcomes[2].errors and seconds[2] < 1.0, (outcomes, seconds)
        assert pool.restarts == {"judge hangs replica 0": 2}  # one restart, then the stop
    finally:
        pool.shutdown()


def _freeze_when(
    title: str, frozen: list[int], stop: threading.Event, after: str | None = None
) -> None:
    """SIGSTOP the first actor process whose title turns to `title` (polled every 2 ms, so a
    call of a fraction of a second is caught while it runs), once some process has shown
    the title `after` (e.g. a rank's train step: not a call made before training)."""
    import psutil

    while after and not stop.is_set():
        titles = (" ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"]))
        if any(t.startswith(after) for t in titles):
            break
        time.sleep(0.002)
    while not frozen and not stop.is_set():
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if " ".join(proc.info["cmdline"] or []).startswith("ray::TeacherActor"):
                with contextlib.suppress(psutil.Error):
                    if " ".join(proc.cmdline()).startswith(title):
                        os.kill(proc.pid, signal.SIGSTOP)
                        frozen.append(proc.pid)
                        return
        time.sleep(0.002)


@pytest.mark.slow
def test_a_teacher_frozen_inside_a_judgment_serves_both_roles_again(
    ray_session, chat_models, tmp_path, capsys
):
    """recipes/kd_rlaif.yaml (the judge served by the teacher's replica), the replica
    SIGSTOPped while it judges: the judge's bounded wait restarts it (one restart, counted
    on the teacher's replica), the judgment is asked again and the teacher's scoring calls
    run again on the restarted replica: every step trains, no sample is dropped."""
    recipes = Path(__file__).resolve().parents[2] / "recipes"
    overrides = [
        f"teachers.0.model={chat_models['teacher']}",
        f"student.model={chat_models['student']}",
        "student.layers=null",
        f"run.output_dir={tmp_path / 'runs'}",
        "train.steps=3",
        "train.warmup_steps=0",
        "checkpoint.every=0",
        "data.seq_len=160",
        "data.heldout=4",
        "rollout.max_new_tokens=8",
        "judges.0.min_mass=0.0",
        "judges.0.timeout_s=15",
        "judges.0.kind=score",  # a rubric to read: a call long enough to be caught inside
        "judges.0.min_mass=0.0",
        "judges.0.min_agreement=0",  # a random tiny judge
        "rlaif.win_rate_by=evaluator",  # no evaluator: every judgment after the start is a step's
        "rlaif.win_rate_prompts=2",
    ]
    frozen: list[int] = []
    stop = threading.Event()
    title, after = "ray::TeacherActor.judge", "ray::StudentWorker.train_step"
    watcher = threading.Thread(target=_freeze_when, args=(title, frozen, stop, after))
    capsys.readouterr()
    watcher.start()
    try:
        code = main(["run", str(recipes / "kd_rlaif.yaml"), *overrides])
    finally:
        stop.set()
        watcher.join()
    out = capsys.readouterr().out
    assert code == 0 and len(frozen) == 1, out[-2000:]
    assert (
        "teacher smollm2 replica 0 did not answer judge rater's call within 15s: "
        "restarted it (1/5), its calls run again" in out
    ), out[-2000:]
    assert "bringing the student group back" not in out
    (run_dir,) = (tmp_path / "runs").glob("kd_rlaif-*")
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    run_id = json.loads((run_dir / "state.json").read_text())["run_id"]
    history = {
        key: [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
        for key in ("loss", "dropped_samples", "judge/rater/restarts", "judge/rater/retried")
    }
    assert len(history["loss"]) == 3, history
    assert history["dropped_samples"] == [0.0] * 3, history
    assert history["judge/rater/restarts"][-1] == 1.0, history  # one count, one actor
    assert sum(history["judge/rater/retried"]) == 1.0, history


@pytest.mark.parametrize(
    "error",
    [
        lambda: OutOfMemoryError("Task was killed due to the node running low on memory."),
        lambda: ObjectLostError("c8ef45ccd0112571" + "f" * 24 + "0100000001000000", None, ""),
    ],
    ids=["OutOfMemoryError", "ObjectLostError"],
)
def test_ray_capacity_errors_are_one_line_with_exit_2(
    error, tiny_models, tmp_path, capsys, monkeypatch
):
    """Ray's own OutOfMemoryError / ObjectLostError, raised inside a run, reach the user as
    one line (exit 2), not a traceback."""
    from orchestrator import driver

    def execute(*args, **kwargs):
        raise error()

    monkeypatch.setattr(driver, "execute", execute)
    path = write_recipe(tmp_path, base_recipe(tmp_path, tiny_models))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raydistill: run stopped: "), err
    assert "out of memory" in err[0] or "an object was lost" in err[0]
    assert "no checkpoint was written yet" in err[0]


def test_a_failing_tracking_store_never_hides_the_runs_error(
    ray_session, tiny_models, slow_teacher, tmp_path, capsys
):
    """The MLflow run is deleted by another client mid-run (after the first checkpoint, steps
    before the next one writes to MLflow), then a rank dies: marking the run FAILED fails
    too, and the user sees the rank's death (one line), not MLflow's."""
    raw = _raw(tmp_path, tiny_models, slow_teacher, "faulty")
    raw["cluster"] = {"max_student_restores": 0}
    path = write_recipe(tmp_path, raw, "f.yaml")
    capsys.readouterr()

    def delete_run_then_kill(pid: int) -> None:
        (run_dir,) = (tmp_path / "runs").glob("faulty-*")
        while 4 not in _steps_logged(run_dir):  # past the checkpoint's own MLflow rows
            time.sleep(0.01)
        run_id = json.loads((run_dir / "state.json").read_text())["run_id"]
        MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}").delete_run(run_id)
        os.kill(pid, signal.SIGKILL)

    code, killed = _with_kills(
        "StudentWorker",
        "train_step",
        1,
        lambda: main(["run", str(path)]),
        _after_first_checkpoint(tmp_path),
        hit=delete_run_then_kill,
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(killed) == 1
    assert err[-1].startswith("raydistill: run stopped: train step ") and "died" in err[-1]
    assert any("MLflow could not mark the run FAILED" in line for line in err)


def test_a_tracking_store_failing_mid_run_is_one_line_with_exit_1(
    tiny_models, tmp_path, capsys, monkeypatch
):
    """MLflow failing while a run logs (its run deleted, its server gone) is one line naming
    the store, credentials redacted, and says how to continue (the ledger comes first)."""
    from mlflow.exceptions import MlflowException

    from orchestrator import driver

    def execute(*args, **kwargs):
        raise MlflowException("cannot reach https://ann:s3cret@mlflow.example/api (run r1)")

    monkeypatch.setattr(driver, "execute", execute)
    path = write_recipe(tmp_path, base_recipe(tmp_path, tiny_models))
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raydistill: run stopped: the MLflow store"), err
    assert "s3cret" not in err[0] and "mlflow.example" in err[0]
