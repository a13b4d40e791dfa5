"""The `rollout` section: the engines that write the student's own samples, and the rules
it must keep with the student's group (used whenever distill.lambda > 0)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from orchestrator.config_base import Placed, StudentConfig


class RolloutConfig(Placed):
    """The engines that write the student's samples (distill.mode: on_policy)."""

    backend: Literal["hf", "vllm"] = "hf"
    replicas: int = Field(1, ge=1)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    temperature: float = Field(1.0, ge=0, description="0: greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(32, ge=1)
    samples_per_prompt: int = Field(1, ge=1)
    sync_every: int = Field(1, ge=1, description="optimizer steps between weight syncs")
    max_staleness: int = Field(
        0, ge=0, description="0: strictly on-policy; 1: one-step-off (generation overlaps training)"
    )
    weight_sync: Literal["auto", "in_place", "reload", "nccl", "ipc", "rdt"] = Field(
        "auto",
        description="how a vLLM engine takes the ranks' weights. auto: in place on CPU, else "
        "vLLM's reload_weights; in_place / reload: force one of those; nccl (engines on their "
        "own GPUs or nodes), ipc (engines sharing the ranks' GPUs), rdt (vLLM's sharded_rdt "
        "over Ray): vLLM's GPU weight transfer, pushed by the ranks",
    )


def check(r: RolloutConfig, student: StudentConfig, batch_size: int) -> None:
    """The engines' settings against the student group they sample for."""
    if r.weight_sync != "auto" and r.backend != "vllm":
        raise ValueError(
            f"rollout.weight_sync: {r.weight_sync!r} is how a vLLM engine loads weights; "
            f"it needs rollout.backend: vllm (hf copies them in place)"
        )
    if r.weight_sync in ("ipc", "rdt") and student.zero_stage == 3 and student.world_size > 1:
        raise ValueError(
            f"rollout.weight_sync: {r.weight_sync!r} sends each rank's full copy of the "
            f"weights; under student.zero_stage 3 only rank 0 gathers one (use nccl)"
        )
    if r.sync_every > r.max_staleness + 1:
        raise ValueError(
            f"rollout.sync_every: {r.sync_every} with max_staleness={r.max_staleness} "
            f"would write samples more than {r.max_staleness} steps stale"
        )
    per_rank = batch_size // max(student.world_size, 1)
    if per_rank % r.samples_per_prompt:
        raise ValueError(
            f"rollout.samples_per_prompt: {r.samples_per_prompt} does not divide the "
            f"per-rank batch {per_rank} (a prompt's samples stay on one rank)"
        )
