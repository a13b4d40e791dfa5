"""A whole node lost mid-run (two nodes on 127.0.0.1, in a subprocess): the node that hosts a
teacher replica and a student rank is SIGKILLed once the first checkpoint is committed. The
run goes on: the teacher replica is restarted on the surviving node (the head), the student
group is brought back there from the checkpoint, and MLflow holds exactly one `loss` row per
step.

Ray reports the lost node's rank as unavailable, or a surviving rank's collective fails first
(its peer's socket closed): either way the group is lost, not the run. The second case is
also checked on its own, on one node, with a real gloo group of two actors."""

from __future__ import annotations

import os
import signal
import socket
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import ray
from conftest import base_recipe, run_multinode

from orchestrator.faults import RuntimeFault, gather

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors need not import tests/

STEPS = 8


@pytest.mark.slow
def test_a_lost_node_loses_no_step(tmp_path: Path, tiny_models: dict[str, str]) -> None:
    raw = base_recipe(
        tmp_path,
        tiny_models,
        train={"steps": STEPS, "batch_size": 4, "micro_batch_size": 2, "log_every": 1},
        checkpoint={"every": 2},
    )
    raw["teachers"][0].update(replicas=2, num_cpus=0.25, resources={"worker": 1})
    raw["student"].update(num_cpus=0.25, resources={"worker": 1}, placement="spread", world_size=2)
    out, stdout = run_multinode(raw, tmp_path, "--node-loss")
    doomed, survivor = out["nodes"]["doomed"], out["nodes"]["survivor"]
    run = out["node_loss"]
    before, after = run["placement_before"], run["placement_after"]
    teachers, students = "teacher tiny", "student student"
    # the killed node hosted a teacher replica and a student rank, mid-run
    assert doomed in [t["node"] for t in before[teachers]]
    assert doomed in [s["node"] for s in before[students]]
    assert 0 < run["killed_after_step"] < STEPS
    assert "bringing the student group back from the checkpoint" in stdout
    # everything now runs on the surviving node; every step logged exactly once
    assert [t["node"] for t in after[teachers]] == [survivor] * 2
    assert [s["node"] for s in after[students]] == [survivor] * 2
    assert run["steps"] == STEPS
    assert run["rows_per_step"] == {str(s): 1 for s in range(1, STEPS + 1)}


@ray.remote(num_cpus=0)
class _Rank:
    """One rank of a bare gloo group (torch.distributed, no DeepSpeed)."""

    def join(self, rank: int, port: int) -> int:
        import torch.distributed as dist

        url = f"tcp://127.0.0.1:{port}"
        dist.init_process_group(
            "gloo", init_method=url, rank=rank, world_size=2, timeout=timedelta(seconds=60)
        )
        return os.getpid()

    def all_reduce(self) -> float:
        import torch
        import torch.distributed as dist

        t = torch.ones(1)
        dist.all_reduce(t)
        return float(t)


def test_a_rank_whose_peer_vanished_inside_a_collective_means_the_group_is_lost(ray_session):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    survivor, peer = _Rank.remote(), _Rank.remote()
    _, peer_pid = ray.get([survivor.join.remote(0, port), peer.join.remote(1, port)], timeout=120)
    try:
        ref = survivor.all_reduce.remote()  # waits for the peer, which never joins in
        assert ray.wait([ref], timeout=2)[0] == []
        os.kill(peer_pid, signal.SIGKILL)
        with pytest.raises(RuntimeFault) as caught:
            gather([ref], "train step 3", timeout_s=60, who=["student rank 0"], students=True)
    finally:
        ray.kill(survivor)
        ray.kill(peer)
    assert caught.value.student_lost, str(caught.value)
    assert not caught.value.timed_out
    assert "train step 3: student rank 0: RuntimeError: " in str(caught.value)
    assert "Connection" in str(caught.value)
