"""The TeacherSignal wire format: what a teacher sends to the students for one shard.

Signals are numpy arrays so Ray ships them out-of-band and workers read them zero-copy from
the object store. Full-vocab logits never leave the teacher: only the temperature-scaled
top-k ids (uint16 when the vocab fits, else int32) and their log-probs (float16) travel.
A signal holds only the shard's loss positions, in row-major order ([P, k] with
P = loss_mask.sum()); position t is the teacher's distribution over the token at t+1, the
same alignment as a causal LM's logits. Prompt and padding positions cost nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from actors.batch import TokenBatch


def id_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the id bytes whenever every id fits in it."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


FINAL = -1  # the HiddenStates key of the backbone's final normalised output (signal: hidden)


@dataclass(frozen=True)
class HiddenStates:
    """The teacher's hidden states at the signal's loss positions: {layer: [P, H] float16},
    layers numbered as HF's `hidden_states` (0: the embeddings, i < L: block i's output, L:
    the backbone's final, normalised output). Shipped out-of-band like the top-k arrays;
    feature distillation reads them."""

    layers: dict[int, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        lengths = {h.shape[0] for h in self.layers.values()}
        for layer, h in self.layers.items():
            if h.dtype != np.float16 or h.ndim != 2:
                raise ValueError(f"hidden layer {layer}: {h.dtype} {h.shape}, want [P, H] float16")
        if len(lengths) > 1:
            raise ValueError(f"hidden layers cover different position counts: {sorted(lengths)}")

    def __bool__(self) -> bool:
        return bool(self.layers)

    @property
    def nbytes(self) -> int:
        return sum(h.nbytes for h in self.layers.values())

    def rows(self, start: int, stop: int) -> HiddenStates:
        return HiddenStates({k: v[start:stop] for k, v in self.layers.items()})


@dataclass
class TeacherSignal:
    teacher: str
    ids: np.ndarray  # [P, k] uint16 | int32
    logprobs: np.ndarray  # [P, k] float16, log_softmax(logits / temperature) over the vocab
    temperature: float
    busy_s: float = 0.0  # wall time the teacher spent on this shard, inside the actor
    cpu_s: float = 0.0  # CPU time of the actor process for this shard (cores are shared)
    hidden: HiddenStates = field(default_factory=HiddenStates)
    replica: int | None = None  # which replica of the teacher scored it
    routed_rows: np.ndarray | None = None  # the shard rows it covers (routing); None: all

    @property
    def nbytes(self) -> int:
        return int(self.ids.nbytes + self.logprobs.nbytes + self.hidden.nbytes)

    def rows(self, start: int, stop: int) -> TeacherSignal:
        """The loss positions [start, stop) (see TokenBatch.row_offsets)."""
        return TeacherSignal(
            teacher=self.teacher,
            ids=self.ids[start:stop],
            logprobs=self.logprobs[start:stop],
            temperature=self.temperature,
            busy_s=self.busy_s,
            cpu_s=self.cpu_s,
            hidden=self.hidden.rows(start, stop),
            replica=self.replica,
        )

    def covering(self, batch: TokenBatch) -> TeacherSignal:
        """This signal on all of the batch's loss positions: a signal that scored only some
        rows (routing by a data field) gets empty (-inf) entries on the others."""
        if self.routed_rows is None:
            return self
        offsets = batch.row_offsets()
        k = self.ids.shape[1]
        ids = np.zeros((int(offsets[-1]), k), dtype=self.ids.dtype)
        logprobs = np.full((int(offsets[-1]), k), -np.inf, dtype=np.float16)
        at = 0
        for row in self.routed_rows:
            a, b = int(offsets[row]), int(offsets[row + 1])
            ids[a:b], logprobs[a:b] = self.ids[at : at + b - a], self.logprobs[at : at + b - a]
            at += b - a
        if self.hidden:
            raise ValueError(f"teacher {self.teacher}: routed signals carry no hidden states")
        return TeacherSignal(
            self.teacher,
            ids,
            logprobs,
            self.temperature,
            self.busy_s,
            self.cpu_s,
            replica=self.replica,
        )

    def torch_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids int64, logprobs float32) as torch tensors for the loss functions."""
        ids = torch.from_numpy(self.ids.astype(np.int64))
        return ids, torch.from_numpy(self.logprobs.astype(np.float32))


@torch.no_grad()
def topk_signal(
    features: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    *,
    k: int,
    temperature: float,
    teacher: str,
    vocab_size: int,
    chunk: int,
) -> TeacherSignal:
    """Exact top-k of log_softmax(head(features) / T) in float32, over chunks of positions on
    the teacher's device: at most one [chunk, vocab] buffer exists at a time and only [P, k]
    reaches host memory."""
    n = features.shape[0]
    top_ids = torch.empty((n, k), dtype=torch.long, device=features.device)
    top_lp = torch.empty((n, k), dtype=torch.float16, device=features.device)
    for a in range(0, n, chunk):  # on the device; one copy to the host at the end
        logits = head(features[a : a + chunk])[:, :vocab_size].float()
        lp, ix = torch.topk(torch.log_softmax(logits / temperature, dim=-1), k, dim=-1)
        top_lp[a : a + chunk], top_ids[a : a + chunk] = lp, ix
    ids = top_ids.cpu().numpy().astype(id_dtype(vocab_size))
    logprobs = top_lp.cpu().numpy()
    return TeacherSignal(teacher=teacher, ids=ids, logprobs=logprobs, temperature=temperature)
