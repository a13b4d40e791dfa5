"""Several teachers in one run, on the real Ray, teacher actors and DeepSpeed ranks:
routing by a data field sends each example to its teacher only (counted in the actors),
replicas are chosen by outstanding requests, teachers of a step run concurrently, and a
blended run logs per-teacher KL, shares and replica load to MLflow."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import ray
import toy_teachers
from conftest import base_recipe, write_recipe
from mlflow.tracking import MlflowClient

from actors.batch import TokenBatch
from orchestrator.cli import main
from orchestrator.recipe import DistillConfig
from orchestrator.teacher_config import TeacherConfig
from orchestrator.teachers import LiveTeacherPool

ray.cloudpickle.register_pickle_by_value(toy_teachers)  # the actors need not import tests/


def _data(tmp_path: Path, n: int = 40) -> Path:
    words = ["the cat sat", "a dog ran far", "we see the sea", "hello there friend"]
    path = tmp_path / "routed.jsonl"
    rows = [{"text": f"{words[i % 4]} {i}", "teacher": "a" if i % 3 else "b"} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _two_teachers(models: dict[str, str], **extra) -> list[dict]:
    return [
        {"name": "a", "model": models["teacher"], "num_cpus": 0.2, **extra},
        {"name": "b", "model": models["teacher"], "num_cpus": 0.2, **extra},
    ]


def _history(run_dir: Path, key: str) -> list[float]:
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    run_id = json.loads((run_dir / "state.json").read_text())["run_id"]
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_route_by_field_scores_each_example_with_its_teacher_only(
    ray_session, chat_models, tmp_path
):
    steps, batch, heldout = 4, 8, 8
    raw = base_recipe(
        tmp_path,
        chat_models,
        teachers=_two_teachers(chat_models),
        data={"source": "file", "path": str(_data(tmp_path)), "seq_len": 24, "heldout": heldout},
        distill={"aggregate": "route", "teacher_key": "teacher", "top_k": 8},
        train={"steps": steps, "batch_size": batch, "micro_batch_size": 4, "log_every": 2},
    )
    assert main(["run", str(write_recipe(tmp_path, raw))]) == 0
    (run_dir,) = (tmp_path / "runs").glob("t-*")
    served = json.loads((run_dir / "summary.json").read_text())["teacher_served"]
    # each training example scored once, by one teacher; held-out examples by both (eval)
    assert served["a"]["rows"] + served["b"]["rows"] == steps * batch + 2 * heldout
    assert served["a"]["rows"] > served["b"]["rows"] > heldout  # rows are 2:1 a:b
    shares = np.array([_history(run_dir, "share/a"), _history(run_dir, "share/b")])
    np.testing.assert_allclose(shares.sum(0), 1.0, atol=1e-6)
    assert all(np.isfinite(_history(run_dir, "kl/b")))


def test_blended_run_logs_per_teacher_kl_share_and_replica_load(ray_session, tiny_models, tmp_path):
    teachers = _two_teachers(tiny_models)
    teachers[0].update(replicas=2, num_cpus=0.1, weight=3.0)
    # per-teacher k; a mixture takes every teacher at distill.temperature (stated again here)
    teachers[1].update(top_k=8, temperature=2.0)
    raw = base_recipe(
        tmp_path,
        tiny_models,
        teachers=teachers,
        distill={"aggregate": "confidence", "top_k": 16, "temperature": 2.0},
        train={"steps": 6, "log_every": 3},
    )
    assert main(["run", str(write_recipe(tmp_path, raw))]) == 0
    (run_dir,) = (tmp_path / "runs").glob("t-*")
    for key in ("kl/a", "kl/b", "share/a", "share/b", "teacher_busy_s/a/r1"):
        assert len(_history(run_dir, key)) == 6, key
    served = [_history(run_dir, f"teacher_served/a/r{i}")[-1] for i in (0, 1)]
    assert min(served) > 0  # both replicas of a served requests
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval_after"]["kl/a"] < summary["eval_before"]["kl/a"]


def _shard(n_rows: int = 2) -> ray.ObjectRef:
    ids = np.random.default_rng(0).integers(8, 90, size=(n_rows, 16)).astype(np.int32)
    mask = np.ones_like(ids, dtype=bool)
    mask[:, -1] = False
    return ray.put(TokenBatch(ids, np.ones_like(ids, dtype=np.int8), mask))


def _pool(model: str, actor_class: type, replicas: int = 1, name: str = "t") -> LiveTeacherPool:
    cfg = TeacherConfig(name=name, model=model, replicas=replicas, num_cpus=0.1)
    return LiveTeacherPool(cfg, DistillConfig(top_k=8), actor_class=actor_class)


def test_least_outstanding_sends_more_to_the_fast_replica(ray_session, tiny_models):
    pool = _pool(tiny_models["teacher"], toy_teachers.SlowFirstReplica, replicas=2)
    try:
        shard = _shard()
        ray.get([pool.score(shard), pool.score(shard)])  # both replicas up
        start = list(pool.balance.served)
        pending: list[ray.ObjectRef] = []
        for _ in range(16):  # a stream with two requests in flight, as the loop keeps
            pending.append(pool.score(shard))
            if len(pending) >= 2:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)
        ray.get(pending)
        slow, fast = (pool.balance.served[i] - start[i] for i in (0, 1))
        assert slow > 0 and fast >= 2 * slow, (slow, fast)  # round-robin would give 8 / 8
    finally:
        pool.shutdown()


def test_teachers_of_a_step_run_concurrently(ray_session, tiny_models):
    pools = [_pool(tiny_models["teacher"], toy_teachers.Sleepy, name=n) for n in ("x", "y")]
    try:
        shard = _shard()
        ray.get([p.score(shard) for p in pools])  # warm: actors up, model loaded
        start = time.perf_counter()
        ray.get([p.score(shard) for p in pools])
        elapsed = time.perf_counter() - start
        serial = 2 * toy_teachers.Sleepy.DELAY_S
        assert elapsed < 0.8 * serial, elapsed  # about the longer call, not the sum
    finally:
        for p in pools:
            p.shutdown()
