"""WeightSnapshot: the student's weights on their way from the DeepSpeed ranks to the
rollout engines, through the object store (never through files).

Tensors travel as numpy arrays, so Ray ships them out-of-band and an engine reads them
without a copy; bfloat16 (which numpy lacks) travels as its raw 16 bits and is viewed back.
Every snapshot carries its version: the number of optimizer steps behind those weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

# rollout.weight_sync values that push through vLLM's GPU weight transfer (vllm_transfer.py),
# and the rollout actors' concurrency group those pushes run in
GPU_SYNC = ("nccl", "ipc", "rdt")
TRANSFER_GROUP = "transfer"


@dataclass
class WeightSnapshot:
    version: int
    arrays: dict[str, np.ndarray]  # HF parameter name -> values (bf16 as int16 bits)
    dtypes: dict[str, str] = field(default_factory=dict)  # name -> torch dtype name
    gather_s: float = 0.0  # time the ranks spent gathering it (ZeRO-3: all-gathers)
    pushed_bytes: int = 0  # GPU weight_sync: a receipt, the ranks pushed this many bytes

    @classmethod
    def of(cls, state: dict[str, torch.Tensor], version: int, gather_s: float) -> WeightSnapshot:
        arrays, dtypes = {}, {}
        seen: dict[int, str] = {}
        for name, tensor in state.items():
            t = tensor.detach().to("cpu").contiguous()
            dtypes[name] = str(t.dtype).removeprefix("torch.")
            if t.dtype == torch.bfloat16:
                t = t.view(torch.int16)
            ptr = t.data_ptr()
            if ptr in seen and t.numel():  # tied weights: one array, two names
                arrays[name] = arrays[seen[ptr]]
                continue
            seen[ptr] = name
            arrays[name] = t.numpy().copy()  # the rank's parameters keep training
        return cls(version=version, arrays=arrays, dtypes=dtypes, gather_s=gather_s)

    @property
    def pushed(self) -> bool:
        """A receipt: the weights went to the engines through vLLM's weight transfer."""
        return self.pushed_bytes > 0

    @property
    def nbytes(self) -> int:
        """Bytes on the wire: shared (tied) arrays count once."""
        unique = {id(a): a.nbytes for a in self.arrays.values()}
        return int(sum(unique.values())) or self.pushed_bytes

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) views of the arrays, in their original dtypes."""
        for name, array in self.arrays.items():
            t = torch.from_numpy(np.asarray(array))
            if self.dtypes.get(name) == "bfloat16":
                t = t.view(torch.bfloat16)
            yield name, t
