"""TokenBatch: the token shard that the driver puts once and teachers and students both read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TokenBatch:
    input_ids: np.ndarray  # [B, T] int32, right-padded
    attention_mask: np.ndarray  # [B, T] int8
    loss_mask: np.ndarray  # [B, T] bool: position t predicts token t+1 and counts in the loss

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum())

    @property
    def nbytes(self) -> int:
        return int(self.input_ids.nbytes + self.attention_mask.nbytes + self.loss_mask.nbytes)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def rows(self, start: int, stop: int) -> TokenBatch:
        return TokenBatch(
            self.input_ids[start:stop], self.attention_mask[start:stop], self.loss_mask[start:stop]
        )

    def take(self, rows: Sequence[int] | np.ndarray) -> TokenBatch:
        """The given rows, in that order."""
        idx = np.asarray(rows, dtype=np.int64)
        return TokenBatch(self.input_ids[idx], self.attention_mask[idx], self.loss_mask[idx])

    def shard(self, n: int) -> list[TokenBatch]:
        """n equal row slices, one per student rank."""
        if len(self) % n:
            raise ValueError(f"batch of {len(self)} rows does not split into {n} equal shards")
        size = len(self) // n
        return [self.rows(i * size, (i + 1) * size) for i in range(n)]

    @staticmethod
    def concat(a: TokenBatch, b: TokenBatch, pad: int = 0) -> TokenBatch:
        """a's rows then b's, right-padded to the wider of the two."""
        width = max(a.input_ids.shape[1], b.input_ids.shape[1])

        def wide(x: np.ndarray, fill: int) -> np.ndarray:
            out = np.full((x.shape[0], width), fill, dtype=x.dtype)
            out[:, : x.shape[1]] = x
            return out

        return TokenBatch(
            np.concatenate([wide(a.input_ids, pad), wide(b.input_ids, pad)]),
            np.concatenate([wide(a.attention_mask, 0), wide(b.attention_mask, 0)]),
            np.concatenate([wide(a.loss_mask, 0), wide(b.loss_mask, 0)]),
        )

    def trimmed(self) -> TokenBatch:
        """Drop the padding columns no row needs (dynamic padding)."""
        width = max(int(self.attention_mask.sum(1).max()), 1)
        return TokenBatch(
            self.input_ids[:, :width], self.attention_mask[:, :width], self.loss_mask[:, :width]
        )

    def loss_columns(self) -> np.ndarray:
        """The column range holding every loss position: logits are computed only there."""
        cols = np.flatnonzero(self.loss_mask.any(axis=0))
        if cols.size == 0:
            return np.zeros(1, dtype=np.int64)
        return np.arange(cols[0], cols[-1] + 1, dtype=np.int64)

    def row_offsets(self) -> np.ndarray:
        """Signals hold loss positions only, row-major: rows [a, b) are offsets[a]:offsets[b]."""
        return np.concatenate([[0], np.cumsum(self.loss_mask.sum(axis=1))]).astype(np.int64)

    def to_torch(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids int64, attention_mask int64, loss_mask bool) on device."""
        return (
            torch.from_numpy(self.input_ids.astype(np.int64)).to(device),
            torch.from_numpy(self.attention_mask.astype(np.int64)).to(device),
            torch.from_numpy(self.loss_mask.astype(bool)).to(device),
        )


def left_pad(
    rows: Sequence[Sequence[int] | np.ndarray], pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) [n, width] int64 with each row right-aligned (left padding), so
    every row continues from its own last token when generating or reading the next one."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.as_tensor(np.asarray(r, dtype=np.int64))
        attn[i, width - len(r) :] = 1
    return ids.to(device), attn.to(device)


@dataclass
class Sample:
    """One rollout: what any engine (HF or vLLM) returns for a prompt."""

    response: list[int]  # sampled ids, the stop id included when the sample ended
    logprobs: list[float]  # log_softmax(logits / T)[id] under the writing weights
    finish_reason: str  # "stop" | "length"
