"""What a student rank or a rollout engine is told at construction: typed and frozen, so a
misspelt setting fails where the spec is built, and no default is repeated inside the actor.
Actors know nothing of recipes; `orchestrator/students.py` and `orchestrator/rollouts.py`
build these from one."""

from __future__ import annotations

from dataclasses import dataclass

from actors.features import FeatureSpec
from actors.objective import LossSpec


@dataclass(frozen=True)
class RLSpec:
    """RLAIF's part of the objective (actors/rl_objective.py)."""

    algorithm: str
    rl_weight: float
    kd_weight: float
    kl_coef: float
    kl_estimator: str
    clip_eps: float
    scale_std: bool
    dpo_beta: float
    sft_weight: float
    group_size: int  # samples per prompt
    temperature: float  # the rollouts' sampling T: the policy's log-probs are taken at it


@dataclass(frozen=True)
class WorkerSpec:
    name: str  # the group's name (what a peer's signal is called)
    model: str  # a folder or known name; each rank resolves it on its node
    layers: list[int] | None
    loss: LossSpec
    top_k: int  # what this student sends when it is a peer
    teacher_weights: list[float]  # one per signal it trains on
    aggregate: str
    confidence_by: str
    confidence_temperature: float
    routed_by_field: bool
    zero_stage: int
    gradient_checkpointing: bool
    dtype: str
    threads: int
    seed: int
    optimizer: str
    lr: float
    weight_decay: float
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float
    grad_clip: float
    micro_batch_size: int
    grad_accum: int
    chunk_bytes: int
    rl: RLSpec | None = None
    features: FeatureSpec | None = None  # feature distillation from one teacher's states
    # distill.signal hidden: (teacher, model) whose exact distributions the ranks rebuild
    dense_teachers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class EngineSpec:
    """A rollout engine: the student's weights (then synced from the ranks), sampling only."""

    model: str  # a folder or known name; each engine resolves it on its node
    layers: list[int] | None
    backend: str  # hf | vllm
    dtype: str
    threads: int
    weight_sync: str  # how the ranks' weights reach it (actors/weights.py)
    num_gpus: float
    stop_ids: list[int]  # tokens that end a sample
    pad: int
    seed: int
    max_model_len: int  # prompt + new tokens
