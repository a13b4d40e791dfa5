"""GPU weight sync (`rollout.weight_sync`: nccl, ipc, rdt) through vLLM's weight-transfer engines.

The CPU paths pull: an engine loads a WeightSnapshot from the object store at its next call.
vLLM's weight transfer is pushed by the trainer instead, so here the ranks push:
- the ranks' end is vLLM's own trainer engine, `WeightTransferTrainerFactory.trainer_init`
  (once, at the first push), then `send_weights()` per sync, reading a `WeightSource`;
- the engines' end is vLLM's worker engine, made by the LLM from its `weight_transfer_config`
  (`engine_options`) and driven through the LLM's control plane: `init_weight_transfer_engine`,
  `start_weight_update`, `update_weights`, `finish_weight_update` (`Receiver`);
- between them, `EngineClient` speaks vLLM's `VLLMWeightSyncClient` protocol to our rollout
  actors, in their `transfer` concurrency group.

Backends (vLLM's names in `BACKENDS`):
- nccl: rank 0 broadcasts to every engine over a NCCL group of its own (engines on their own
  GPUs or nodes);
- ipc: CUDA IPC handles to each rank's own full copy; an engine maps the one on its GPU
  (engines sharing the ranks' GPUs; every rank takes part);
- rdt: vLLM's `sharded_rdt`: engines pull over NIXL from a Ray actor per rank; vLLM wants its
  Ray executor for it, and `nixl` installed.

When. A push is queued on the ranks behind the train step it follows, as a snapshot is, so
it sends exactly that step's weights; rank 0 returns a receipt (a WeightSnapshot without
tensors). On an engine a round holds, from start to finish, the lock that sampling holds, so
weights never change under a generate call: the push waits for the engine's current call. A
call that needs version v waits, without the lock, for the receipt of v. An engine holds the
newest version pushed, never an older one than a call asked for.

Written against vLLM 0.32's API and checked on CPU only (names, init info, the round's
locking); not yet run on a GPU.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from vllm.distributed.weight_transfer import (
    ParamMeta,
    WeightSource,
    WeightTransferTrainerFactory,
)

from actors.weights import GPU_SYNC, TRANSFER_GROUP

BACKENDS = {"nccl": "nccl", "ipc": "ipc", "rdt": "sharded_rdt"}  # ours -> vLLM's registry
TIMEOUT_S = 600.0  # one control-plane call on every engine (a round waits for a generate call)


def engine_options(weight_sync: str, gpu_share: float = 0.0) -> dict[str, Any]:
    """What the LLM is built with for `weight_sync` (nothing for the CPU paths). `gpu_share`:
    the engine's fraction of its GPU (`rollout.num_gpus`)."""
    if weight_sync not in GPU_SYNC:
        return {}
    from vllm.config import WeightTransferConfig

    options: dict[str, Any] = {
        "weight_transfer_config": WeightTransferConfig(backend=BACKENDS[weight_sync])
    }
    if weight_sync == "rdt":  # vLLM's sharded_rdt engine refuses any executor but Ray's
        options["distributed_executor_backend"] = "ray"
    if weight_sync == "ipc" and 0 < gpu_share < 1:  # a rank holds the rest of this GPU:
        options["gpu_memory_utilization"] = gpu_share  # vLLM's default 0.9 would not start
    return options


class Receiver:
    """An engine's end of a push: vLLM's control plane on the LLM. A round holds `lock`
    from start_weight_update to finish_weight_update; `loaded(version, seconds)` is called
    before the lock is let go, so no sample is written between new weights and their
    version."""

    def __init__(self, llm: Any, lock: threading.Lock, loaded: Callable[[int, float], None]):
        self.llm, self.lock, self.loaded = llm, lock, loaded
        self.started = 0.0

    def __call__(self, call: str, arg: Any = None) -> None:
        if call == "start_weight_update":
            self.lock.acquire()
            self.started = time.perf_counter()
            self._or_release(self.llm.start_weight_update)
        elif call == "update_weights":
            self._or_release(self.llm.update_weights, arg)
        elif call == "finish_weight_update":
            try:
                self.llm.finish_weight_update(arg)  # vLLM records it as the weight version
                self.llm.reset_prefix_cache()  # KV of the old weights must not serve requests
                self.loaded(int(arg), time.perf_counter() - self.started)
            finally:
                self.lock.release()
        elif call in ("init_weight_transfer_engine", "shutdown_weight_transfer_engine"):
            with self.lock:
                getattr(self.llm, call)(*([] if arg is None else [arg]))
        else:
            raise ValueError(f"not a weight-transfer call: {call!r}")

    def _or_release(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except BaseException:
            self.lock.release()  # a failed round must not lock sampling out
            raise


class EngineClient:
    """vLLM's `VLLMWeightSyncClient` protocol (four methods, structural) over our rollout
    actors: each call goes to every engine at once, as vLLM's `RayVLLMWeightSyncClient` does
    for LLM actors, in their `transfer` concurrency group (their own thread may be waiting
    for this very push). `version` stamps the round."""

    def __init__(self, engines: list[Any]) -> None:
        self.engines = engines
        self.version = -1

    def _all(self, call: str, arg: Any = None) -> None:
        self._each(call, [arg] * len(self.engines))

    def _each(self, call: str, args: list[Any]) -> None:
        import ray

        group = {"concurrency_group": TRANSFER_GROUP}
        refs = [
            e.weight_transfer.options(**group).remote(call, arg)
            for e, arg in zip(self.engines, args, strict=True)
        ]
        ray.get(refs, timeout=TIMEOUT_S)

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        n = len(self.engines)
        infos = [fleet_place(init_info, i, n) for i in range(n)]
        self._each("init_weight_transfer_engine", [{"init_info": x} for x in infos])

    def start_weight_update(self) -> None:
        self._all("start_weight_update")

    def update_weights(self, update_info: Any) -> None:
        self._all("update_weights", {"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all("finish_weight_update", weight_version or str(self.version))


def fleet_place(init_info: dict[str, Any], i: int, n: int) -> dict[str, Any]:
    """Engine i's own worker init info. Each engine is a vLLM deployment of one worker whose
    index restarts at 0, so the engines would collide: nccl gives engine i group rank
    `rank_offset + i` (the trainer is 0), sharded_rdt takes `replica_rank` i of `num_replicas`
    n (vLLM's fields for a fleet of independent engines); ipc needs nothing."""
    if "rank_offset" in init_info:
        return {**init_info, "rank_offset": int(init_info["rank_offset"]) + i}
    if "replica_rank" in init_info:
        return {**init_info, "replica_rank": i, "num_replicas": n}
    return init_info


class StateSource(WeightSource):
    """vLLM's `WeightSource` over a rank's state dict (HF names), read on the rank's GPU
    (ZeRO-3's gathered copy may sit on the CPU). `state` is swapped in before each push."""

    def __init__(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        self.state, self.device = state, device

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(name, t.dtype, tuple(t.shape)) for name, t in self.state.items()]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in self.state.items():
            yield name, t.detach().to(self.device)


def trainer_info(mode: str, rank: int, engines: int) -> Any:
    """vLLM's trainer init info for `mode`; an engine is one vLLM worker (no tensor
    parallelism), so there are `engines` receivers."""
    import ray

    if mode == "nccl":
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        with socket.socket() as s:  # the group's rendezvous, on rank 0's node
            s.bind(("", 0))
            port = s.getsockname()[1]
        address = ray.util.get_node_ip_address()
        return NCCLTrainerInitInfo(
            master_address=address, master_port=port, world_size=1 + engines, rank=rank
        )
    if mode == "ipc":
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

        return IPCTrainerInitInfo(rank=rank)
    from vllm.distributed.weight_transfer.sharded_rdt_trainer import ShardedRDTTrainerInitInfo

    namespace = ray.get_runtime_context().namespace  # where the engines find the servers
    return ShardedRDTTrainerInitInfo(
        num_consumers=engines, rank=rank, trainer_actor_namespace=namespace
    )


def sends_on(mode: str, rank: int) -> bool:
    """Which ranks run a trainer engine: every rank for ipc and rdt (their IPC handles and
    serve actors are gathered over the ranks' process group), rank 0 alone for nccl (the
    only trainer in its broadcast group)."""
    return rank == 0 or mode != "nccl"


class WeightSender:
    """A rank's end of the push: vLLM's trainer engine for `mode`, made at the first push."""

    def __init__(
        self,
        mode: str,
        engines: list[Any],
        rank: int,
        state: dict[str, torch.Tensor],
        device: torch.device,
    ) -> None:
        self.client = EngineClient(engines)
        self.source = StateSource(state, device)
        info = trainer_info(mode, rank, len(engines))
        self.engine = WeightTransferTrainerFactory.trainer_init(
            info, client=self.client, source=self.source
        )

    def send(self, state: dict[str, torch.Tensor], version: int) -> int:
        """Push `state` as `version` to every engine; the bytes sent."""
        self.source.state, self.client.version = state, version
        self.engine.send_weights()
        seen = {t.data_ptr(): t.numel() * t.element_size() for t in state.values()}
        return int(sum(seen.values()))
