"""TeacherPool: the replicas of one teacher, behind one handle that spreads work over them."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import ray

from actors.teacher import TeacherActor
from orchestrator.ray_env import actor_options
from orchestrator.recipe import DistillConfig, TeacherConfig


class TeacherPool:
    def __init__(
        self, cfg: TeacherConfig, distill: DistillConfig, max_model_len: int = 2048
    ) -> None:
        self.cfg = cfg
        remote = ray.remote(TeacherActor).options(
            **actor_options(cfg.num_cpus, cfg.num_gpus, cfg.threads),
            max_restarts=2,
        )
        self.replicas = [
            remote.remote(
                cfg.name,
                cfg.model,
                top_k=distill.top_k,
                temperature=distill.temperature,
                dtype=cfg.dtype,
                threads=cfg.threads,
                chunk_bytes=distill.chunk_mb * 2**20,
                backend=cfg.backend,
                max_model_len=max_model_len,
            )
            for _ in range(cfg.replicas)
        ]
        self._next = itertools.cycle(range(cfg.replicas))
        self._info: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.cfg.name

    def info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = ray.get(self.replicas[0].info.remote())
        return self._info

    def score(self, shard_ref: ray.ObjectRef) -> ray.ObjectRef:
        """A TeacherSignal ref for the shard, from the next replica in turn."""
        return self.replicas[next(self._next)].score.remote(shard_ref)

    def generate(
        self,
        prompts: list[str],
        sampling: dict[str, Any],
        chunk: int,
        on_chunk: Callable[[int], None],
    ) -> list[dict[str, str]]:
        """Responses for all prompts, each `{"response", "finish_reason"}` (see
        TeacherActor.generate), chunks spread over the replicas, order kept."""
        chunks = [prompts[i : i + chunk] for i in range(0, len(prompts), chunk)]
        refs = [
            self.replicas[i % len(self.replicas)].generate.remote(c, {**sampling, "seed": i})
            for i, c in enumerate(chunks)
        ]
        out: list[dict[str, str]] = []
        for ref, c in zip(refs, chunks, strict=True):
            out.extend(ray.get(ref))
            on_chunk(len(c))
        return out

    def shutdown(self) -> None:
        for actor in self.replicas:
            ray.kill(actor)
