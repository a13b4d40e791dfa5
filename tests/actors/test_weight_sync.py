"""`rollout.weight_sync` without an engine or Ray: which path a vLLM engine's load takes when
forced, and the CPU-checkable parts of the GPU push (`actors/vllm_transfer.py`): vLLM's names
and init info, the fleet places of several engines, the source's two channels agreeing, and a
pushed round holding the sampling lock. Moving bytes over NCCL / CUDA IPC / NIXL needs GPUs
and is not tested here."""

from __future__ import annotations

import threading
from dataclasses import asdict

import pytest
import torch

from actors.vllm_backend import VLLMEngine
from actors.vllm_transfer import (
    BACKENDS,
    Receiver,
    StateSource,
    engine_options,
    fleet_place,
    trainer_info,
)
from actors.weights import GPU_SYNC, WeightSnapshot


class FakeLLM:
    """What VLLMEngine.load_weights and Receiver call on vLLM's LLM, recorded."""

    def __init__(self, in_place_ok: bool = True) -> None:
        self.in_place_ok, self.calls = in_place_ok, []

    def collective_rpc(self, fn, args=()):
        self.calls.append(fn.__name__)
        return [self.in_place_ok if fn.__name__ == "load_in_place" else len(args[0])]

    def __getattr__(self, name):  # the control plane and reset_prefix_cache
        return lambda *args: self.calls.append(name)


def _engine(weight_sync: str, llm: FakeLLM) -> VLLMEngine:
    engine = VLLMEngine.__new__(VLLMEngine)  # no vLLM engine: only the load decision
    engine.llm, engine.weight_sync = llm, weight_sync
    return engine


SNAPSHOT = WeightSnapshot.of({"w": torch.ones(2, 2)}, 3, 0.0)


def test_reload_is_forced_and_never_tries_in_place():
    llm = FakeLLM()
    assert _engine("reload", llm).load_weights(SNAPSHOT) == "reload"
    assert llm.calls == ["_reload", "reset_prefix_cache"]


def test_in_place_is_forced_and_says_so_when_it_cannot():
    assert _engine("in_place", FakeLLM()).load_weights(SNAPSHOT) == "in_place"
    llm = FakeLLM(in_place_ok=False)
    with pytest.raises(RuntimeError, match="rollout.weight_sync: in_place"):
        _engine("in_place", llm).load_weights(SNAPSHOT)
    assert "_reload" not in llm.calls


def test_auto_falls_back_to_reload():
    llm = FakeLLM(in_place_ok=False)
    assert _engine("auto", llm).load_weights(SNAPSHOT) == "reload"
    assert llm.calls == ["load_in_place", "_reload", "reset_prefix_cache"]
    assert _engine("auto", FakeLLM()).load_weights(SNAPSHOT, in_place=False) == "reload"


def test_a_receipt_is_told_apart_from_a_snapshot():
    receipt = WeightSnapshot(4, {}, pushed_bytes=123)
    assert receipt.pushed and receipt.nbytes == 123
    assert not SNAPSHOT.pushed and SNAPSHOT.nbytes == 16


def test_our_modes_are_backends_vllm_registers_on_both_ends():
    from vllm.distributed.weight_transfer import (
        WeightTransferEngineFactory,
        WeightTransferTrainerFactory,
    )

    assert set(BACKENDS) == set(GPU_SYNC)
    for mode in GPU_SYNC:
        assert BACKENDS[mode] in WeightTransferEngineFactory._registry
        assert BACKENDS[mode] in WeightTransferTrainerFactory._registry
        config = engine_options(mode)["weight_transfer_config"]
        assert config.backend == BACKENDS[mode]
    assert engine_options("rdt")["distributed_executor_backend"] == "ray"
    assert engine_options("ipc", 0.5)["gpu_memory_utilization"] == 0.5  # a rank has the rest
    assert "gpu_memory_utilization" not in engine_options("nccl", 0.5)
    assert engine_options("auto") == {} and engine_options("reload") == {}
    for mode in ("nccl", "ipc"):
        info = trainer_info(mode, rank=0, engines=2)
        assert info.backend == BACKENDS[mode] and info.is_sender
    assert trainer_info("nccl", rank=0, engines=2).world_size == 3  # the trainer + 2 engines


def test_each_engine_of_a_fleet_gets_its_own_place():
    from vllm.distributed.weight_transfer.nccl_common import (
        NCCLWeightTransferInitInfo,
        worker_init_payload,
    )
    from vllm.distributed.weight_transfer.sharded_rdt_engine import (
        ShardedRDTWeightTransferInitInfo,
    )

    nccl = worker_init_payload(
        NCCLWeightTransferInitInfo(
            master_address="10.0.0.1", master_port=1234, rank_offset=1, world_size=4
        )
    )
    assert [fleet_place(nccl, i, 3)["rank_offset"] for i in range(3)] == [1, 2, 3]
    rdt = asdict(ShardedRDTWeightTransferInitInfo(trainer_actor_names=["s0"], num_consumers=3))
    placed = [fleet_place(rdt, i, 3) for i in range(3)]
    assert [(p["replica_rank"], p["num_replicas"]) for p in placed] == [(0, 3), (1, 3), (2, 3)]
    for p in placed:  # what vLLM's engine parses them into
        ShardedRDTWeightTransferInitInfo(**p)
    assert fleet_place({"packed": False}, 1, 3) == {"packed": False}  # ipc


def test_the_source_declares_what_it_yields():
    state = {"a": torch.zeros(3, 2), "b": torch.ones(4, dtype=torch.bfloat16)}
    source = StateSource(state, torch.device("cpu"))
    declared = [(m.name, m.dtype, m.shape) for m in source.metadata()]
    yielded = [(n, t.dtype, tuple(t.shape)) for n, t in source]
    assert declared == yielded == [("a", torch.float32, (3, 2)), ("b", torch.bfloat16, (4,))]
    assert [names for names, _ in source.iter_groups()] == [["a", "b"]]


def test_a_pushed_round_holds_the_sampling_lock_until_its_version_is_set():
    lock, loaded = threading.Lock(), []
    llm = FakeLLM()
    receive = Receiver(llm, lock, lambda v, s: loaded.append((v, lock.locked())))
    receive("init_weight_transfer_engine", {"init_info": {"packed": False}})
    assert not lock.locked()
    receive("start_weight_update")
    assert lock.locked()  # a generate call would wait here
    receive("update_weights", {"update_info": {"names": []}})
    receive("finish_weight_update", "7")
    assert not lock.locked() and loaded == [(7, True)]  # the version, set before the release
    assert llm.calls == [
        "init_weight_transfer_engine",
        "start_weight_update",
        "update_weights",
        "finish_weight_update",
        "reset_prefix_cache",
    ]
    with pytest.raises(ValueError, match="not a weight-transfer call"):
        receive("generate")


def test_a_failed_round_lets_sampling_go_on():
    class Failing(FakeLLM):
        def update_weights(self, request):
            raise RuntimeError("NCCL peer gone")

    lock = threading.Lock()
    receive = Receiver(Failing(), lock, lambda v, s: None)
    receive("start_weight_update")
    with pytest.raises(RuntimeError, match="peer gone"):
        receive("update_weights", {})
    assert not lock.locked()


def test_an_engine_reports_a_push_once_and_refuses_one_it_missed(monkeypatch):
    import actors.rollout
    from actors.rollout import RolloutEngine

    receipts = {"v2": WeightSnapshot(2, {}, gather_s=0.1, pushed_bytes=100)}
    monkeypatch.setattr(actors.rollout.ray, "get", lambda ref, **kw: receipts[ref])
    engine = RolloutEngine.__new__(RolloutEngine)  # no model: only the receipt bookkeeping
    engine.weight_sync, engine.version, engine.receipt, engine.round_s = "nccl", -1, -1, 0.0
    with pytest.raises(RuntimeError, match="restarted after them"):
        engine._sync(2, ["v2"])  # a restarted engine never got version 2
    engine._loaded(2, 0.05)  # what a finished round on this engine does
    assert engine._sync(2, ["v2"]) == {
        "sync_in_place": 0.0,
        "sync_load_s": 0.05,
        "sync_gather_s": 0.1,
        "sync_bytes": 100.0,
    }
    assert engine._sync(2, ["v2"]) == {}  # reported once
