"""CachedTeacher: a teacher's top-k read back from its offline cache (`actors/signal_cache.py`)
instead of computed: no model, the same TeacherSignal a live replica sends, through the
object store the same way. The cache is keyed by dataset row, so each call names the cache
rows of the shard's rows (`examples`). With `hidden_layers` it ships the hidden states of
those layers the cache stores beside the top-k (`cache build` of a feature recipe)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from actors.batch import TokenBatch
from actors.process import reusable, yield_cpu
from actors.signal import HiddenStates, TeacherSignal
from actors.signal_cache import CacheReader


class CachedTeacher:
    def __init__(
        self,
        name: str,
        root: str,
        top_k: int,
        temperature: float,
        hidden_layers: tuple[int, ...] = (),
    ) -> None:
        self.name = name
        self.reader = CacheReader(Path(root))
        self.top_k = top_k
        self.hidden_layers = tuple(hidden_layers)
        self.temperature = temperature
        self.served = {"calls": 0, "rows": 0}  # shards read, as a live teacher counts them

    def node(self) -> dict[str, str]:
        import ray

        return {"node": ray.get_runtime_context().get_node_id(), "model": str(self.reader.root)}

    def park(self) -> bool:
        """Kept for another run of the same driver: its counts start again. False when Ray
        restarted it."""
        self.served = {"calls": 0, "rows": 0}
        return reusable()

    def yield_cpu(self, level: int) -> int:
        return yield_cpu(level)

    def info(self) -> dict[str, Any]:
        """What it served (the rest of a teacher's info is in the manifest, on the driver)."""
        return {"name": self.name, "served": dict(self.served), "replica": 0}

    def score(
        self, batch: TokenBatch, rows: list[int] | None = None, examples: list[int] | None = None
    ) -> TeacherSignal:
        """The cached top-k at the loss positions of the shard (or of only its `rows`);
        `examples[i]`: the cache row of the shard's row i."""
        if examples is None or len(examples) != len(batch):
            raise ValueError(f"cached teacher {self.name}: each shard row needs its cache row")
        start, cpu_start = time.perf_counter(), time.process_time()
        picked = batch if rows is None else batch.take(rows)
        cache_rows = examples if rows is None else [examples[r] for r in rows]
        ids, logprobs = self.reader.read(cache_rows, self.top_k)
        if len(ids) != picked.num_tokens:  # the cache is of other data: never a silent mismatch
            raise ValueError(
                f"cached teacher {self.name}: {len(ids)} cached positions for a shard with "
                f"{picked.num_tokens} loss positions"
            )
        if cache_rows:
            self.served["calls"] += 1
            self.served["rows"] += len(cache_rows)
        states = {layer: self.reader.read_hidden(cache_rows, layer) for layer in self.hidden_layers}
        signal = TeacherSignal(
            teacher=self.name,
            ids=ids,
            logprobs=logprobs,
            temperature=self.temperature,
            hidden=HiddenStates(states),
        )
        if rows is not None:
            signal.routed_rows = np.asarray(rows, dtype=np.int64)
        signal.busy_s = time.perf_counter() - start
        signal.cpu_s = time.process_time() - cpu_start
        return signal
