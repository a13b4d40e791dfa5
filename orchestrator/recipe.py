"""The recipe: one YAML file validated into typed models, plus dotted command-line overrides.

Everything that can be checked before an actor starts is checked here: unknown keys, wrong
types, impossible values, missing files, and teacher/student vocab agreement. Each problem
becomes a RecipeError naming the field, which the CLI prints as one line with exit code 2.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from actors.aggregate import AGGREGATIONS
from actors.losses import LOSSES
from actors.objective import CE
from actors.registry import Registry
from actors.rl_losses import KL_ESTIMATORS
from actors.rl_objective import ALGORITHMS
from orchestrator import credentials


class RecipeError(Exception):
    """A problem with the user's input: one line, naming the field or file."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_SEGMENT = re.compile(r"[A-Za-z0-9._-]{1,100}")


def _path_segment(name: str) -> str:
    """Run, teacher, judge, peer and stage names become folder names: one plain segment."""
    if not _SEGMENT.fullmatch(name) or name in (".", ".."):
        raise ValueError(
            "must be 1-100 letters, digits, '.', '_' or '-', not '.' or '..' (it names a folder)"
        )
    return name


Name = Annotated[str, AfterValidator(_path_segment)]


def registered(registry: Registry) -> AfterValidator:
    """A name the registry holds: what the code can run, not a list repeating it."""

    def check(name: str) -> str:
        registry[name]  # noqa: B018 - raises naming the registered ones
        return name

    return AfterValidator(check)


class RunConfig(_Strict):
    name: Name = "run"
    output_dir: str = "runs"
    seed: int = 0
    register_as: Name | None = Field(
        None,
        description="register the final student in MLflow's model registry under this name "
        "(staged recipes: the last train stage's)",
    )


class Placed(_Strict):
    """Where each actor of a kind runs: what it reserves from Ray. `resources` are custom
    resources a node offers (`ray start --resources '{"teacher_node": 8}'`), e.g. to keep
    teachers on their own nodes."""

    num_cpus: float = Field(0.5, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources per actor, e.g. {teacher_node: 1}"
    )
    threads: int | None = Field(
        None, ge=1, description="torch threads per actor; default: the CPUs it reserves, rounded up"
    )

    @model_validator(mode="after")
    def _threads_from_cpus(self) -> Placed:
        """An actor computes with the cores Ray gives it: one thread per reserved CPU."""
        if self.threads is None:
            self.threads = max(1, math.ceil(self.num_cpus))
        return self

    @field_validator("resources")
    @classmethod
    def _custom_only(cls, v: dict[str, float]) -> dict[str, float]:
        for key, amount in v.items():
            if key in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ValueError(f"{key!r}: set num_cpus/num_gpus, not resources")
            if amount <= 0:
                raise ValueError(f"{key}: {amount} must be > 0")
        return v


class LiveSource(_Strict):
    """The teacher's replicas load its model and score what they are sent."""

    kind: Literal["live"] = "live"


class CacheSource(_Strict):
    """The teacher's signals are read from its signal cache (raydistill cache build); the
    data's rows only: the student's own samples are not in any cache."""

    kind: Literal["cache"] = "cache"
    path: str | None = Field(
        None, description="the cache folder; default <output_dir>/signal_cache/<name>"
    )
    fresh: Literal["refuse", "live"] = Field(
        "refuse",
        description="the student's own samples (distill.lambda > 0): refuse the recipe, or "
        "score them with live replicas of the teacher while the data's rows come from the "
        "cache",
    )


TeacherSource = Annotated[LiveSource | CacheSource, Field(discriminator="kind")]


class TeacherConfig(Placed):
    name: Name
    model: str = Field(description="local HF folder, known model name, or hub name")
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="vllm: scores through prompt log-probs (extra `raydistill[vllm]`)"
    )
    replicas: int = Field(1, ge=1)
    weight: float = Field(1.0, gt=0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    top_k: int | None = Field(None, ge=1, description="default: distill.top_k")
    temperature: float | None = Field(None, gt=0, description="default: distill.temperature")
    cross_tokenizer: Literal["span_map"] | None = Field(
        None,
        description="a teacher whose tokenizer differs from the student's: span_map scores "
        "its own tokenization of the text and maps its top-k onto the student's pieces",
    )
    source: TeacherSource = Field(
        default_factory=lambda: LiveSource(),
        description="live (replicas load the model) or cache (its signals read from a signal "
        "cache, raydistill cache build); default in mode offline: cache",
    )

    @model_validator(mode="before")
    @classmethod
    def _source_shorthands(cls, raw: Any) -> Any:
        """`source: live | cache` for the default settings, and recipes written before
        `source` existed (`cache: FOLDER`)."""
        if not isinstance(raw, dict):
            return raw
        raw = dict(raw)
        if isinstance(raw.get("source"), str):
            raw["source"] = {"kind": raw["source"]}
        if "cache" in raw:
            folder = raw.pop("cache")
            if folder is not None:
                if "source" in raw:
                    raise ValueError("give `source` or the older `cache`, not both")
                raw["source"] = {"kind": "cache", "path": folder}
        return raw


class StudentConfig(Placed):
    model: str = Field(description="local HF folder, known model name, or hub name")
    layers: list[int] | None = Field(None, description="keep only these decoder layers")
    world_size: int = Field(1, ge=1)
    zero_stage: Literal[0, 1, 2, 3] = 0
    gradient_checkpointing: bool = Field(
        False, description="recompute decoder layers in backward: activations O(positions x H)"
    )
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    placement: Literal["pack", "strict_pack", "spread"] = Field(
        "pack",
        description="the ranks' placement group: pack (as few nodes as fit), strict_pack "
        "(one node), spread (one rank per node where possible)",
    )


class GenerationConfig(_Strict):
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(16, ge=1)


class SyntheticConfig(_Strict):
    num_sequences: int = Field(256, ge=1)
    branching: int = Field(4, ge=1, description="likely successors per token")


class DataConfig(_Strict):
    source: Literal["synthetic", "file"] = "synthetic"
    path: str | None = Field(None, description="jsonl/parquet with `text` or `prompt`")
    responses: Literal["given", "teacher"] = "given"
    generation: GenerationConfig = GenerationConfig()
    synthetic: SyntheticConfig = SyntheticConfig()
    seq_len: int = Field(64, ge=2)
    heldout: int = Field(16, ge=1, description="examples kept out of training, for eval")
    split_seed: int = Field(
        0,
        ge=0,
        description="seed of the held-out split (and of synthetic data); run.seed only orders "
        "the batches, so runs with different seeds are evaluated on the same examples",
    )

    @model_validator(mode="after")
    def _path_for_file(self) -> DataConfig:
        if self.source == "file" and not self.path:
            raise ValueError("data.path is required when data.source is 'file'")
        return self


MODES = ("off_policy", "offline", "on_policy", "mutual", "rlaif")
# the modes whose student writes its own samples: they start rollout engines
ROLLOUT_MODES = ("on_policy", "rlaif")


def _term_name(name: str) -> str:
    if name != CE:
        LOSSES[name]  # noqa: B018 - raises naming the registered ones
    return name


class LossTerm(_Strict):
    """One term of the objective: a registered divergence to the teachers' targets, or `ce`
    (hard-label cross-entropy), with its weight."""

    loss: Annotated[str, AfterValidator(_term_name)]
    weight: float = Field(gt=0)


class DistillConfig(_Strict):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    mode: Literal[MODES] = Field(  # type: ignore[valid-type]
        "off_policy",
        description="off_policy: fixed text; offline: fixed text, every teacher read from "
        "its signal cache (raydistill cache build); on_policy: the student's own samples (GKD); "
        "mutual: students distill from each other; rlaif: judges' feedback on its samples",
    )
    lmbda: float | None = Field(
        None,
        ge=0,
        le=1,
        alias="lambda",
        description="probability that a step's batch is the student's own samples (GKD); "
        "default 1 in modes on_policy and rlaif, 0 in the others (mutual: > 0 makes the "
        "students learn on the first student's samples)",
    )
    loss: Annotated[str, registered(LOSSES)] = Field(
        "forward_kl", description=f"the divergence to the teachers: one of {LOSSES.names()}"
    )
    alpha: float = Field(0.0, ge=0, le=1, description="weight of hard-label CE")
    terms: list[LossTerm] | None = Field(
        None,
        description="instead of loss and alpha: the objective's terms with their weights, "
        f"e.g. [{{loss: reverse_kl, weight: 0.7}}, {{loss: forward_kl, weight: 0.3}}, "
        f"{{loss: ce, weight: 0.1}}]; one of {LOSSES.names()} or ce",
    )

    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(64, ge=1)
    beta: float = Field(
        0.5, ge=0, le=1, description="generalized JSD weight; 0: forward KL, 1: reverse KL (TRL)"
    )
    skew: float = Field(0.1, ge=0, le=1, description="skew KL alpha (DistiLLM); below 1")
    aggregate: Annotated[str, registered(AGGREGATIONS)] = Field(
        "sum_of_losses",
        description="how teachers combine: sum_of_losses, mean / weighted (one mixture "
        "target), confidence (per-token weights), route (one teacher per example)",
    )
    confidence_by: Literal["entropy", "gold"] = Field(
        "entropy", description="confidence: a teacher's certainty is -entropy or log p(gold)"
    )
    confidence_temperature: float = Field(
        1.0, gt=0, description="confidence: weights are softmax(log w + certainty / this)"
    )
    teacher_key: str | None = Field(
        None, description="route: the data field naming each example's teacher"
    )
    prefetch_depth: int = Field(2, ge=1, description="batches teachers work ahead")
    teacher_nice: int = Field(
        19,
        ge=0,
        le=19,
        description="when the ranks wait for signals 5% or less of the 4 steps after the "
        "prefetch window (steps prefetch_depth + 2 on), the teachers' processes take this "
        "nice value, so the ranks get shared cores first; 0: never",
    )
    chunk_mb: int = Field(
        256, ge=1, description="memory for [positions, vocab] buffers in teacher and student"
    )


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


class PeerConfig(StudentConfig):
    """Another student of a mutual run: its own DeepSpeed group, model and size."""

    name: Name


class MutualConfig(_Strict):
    peers: list[PeerConfig] = Field(default_factory=list)
    peer_weight: float = Field(1.0, gt=0, description="weight of each peer's divergence")


class JudgeConfig(Placed):
    """One judge of the student's samples (distill.mode: rlaif): a model with a rubric, or a
    Python function `module:function` (sample, prompt) -> float run in the judge actors."""

    name: Name
    kind: Literal["score", "pairwise", "critique"] = "score"
    model: str | None = Field(None, description="a model folder, known name or hub name")
    teacher: str | None = Field(
        None,
        description="served by this teacher's own replicas: one copy of the weights gives "
        "logit targets and judgments (its replicas, CPUs and threads, not this judge's)",
    )
    function: str | None = Field(None, description="module:function (sample, prompt) -> float")
    rubric: str | None = Field(None, description="format string with {prompt} and {response}")
    rating_tokens: list[str] = Field(default_factory=lambda: [str(i) for i in range(1, 10)])
    min_mass: float = Field(0.5, ge=0, le=1, description="below it a rating is unusable")
    weight: float = Field(1.0, gt=0)
    replicas: int = Field(1, ge=1)
    timeout_s: float = Field(120.0, gt=0, description="a call longer than this is retried once")

    @model_validator(mode="after")
    def _one_source(self) -> JudgeConfig:
        given = [k for k in ("model", "teacher", "function") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"judge {self.name!r}: give exactly one of model, teacher, function")
        if self.function and self.kind != "score":
            raise ValueError(f"judge {self.name!r}: a function judge gives scores only")
        return self


class RlaifConfig(_Strict):
    algorithm: Annotated[str, registered(ALGORITHMS)] = "grpo"
    rl_weight: float = Field(1.0, ge=0, description="weight of the RL term; 0: on-policy KD")
    kd_weight: float = Field(0.0, ge=0, description="weight of logit KD on the samples")
    kl_coef: float = Field(0.05, ge=0, description="KL(student || reference) in the loss")
    kl_estimator: Annotated[str, registered(KL_ESTIMATORS)] = "k3"
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO clip of the importance ratio")
    scale_std: bool = Field(True, description="GRPO: divide advantages by the group's std")
    dpo_beta: float = Field(0.1, gt=0)
    sft_weight: float = Field(1.0, ge=0, description="CE on critique judges' rewrites")
    win_rate_every: int = Field(0, ge=0, description="steps between win-rate checks; 0: end")
    win_rate_prompts: int = Field(16, ge=1)


class TrainConfig(_Strict):
    steps: int = Field(100, ge=1)
    batch_size: int = Field(8, ge=1, description="sequences per optimizer step, all ranks")
    micro_batch_size: int = Field(4, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(10, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0: no clipping")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    eval_every: int = Field(0, ge=0, description="0: only before and after training")
    log_every: int = Field(10, ge=1)


class CheckpointConfig(_Strict):
    every: int = Field(50, ge=0, description="steps between checkpoints; 0: only at the end")
    keep: int = Field(2, ge=1)


class TrackingConfig(_Strict):
    uri: str | None = Field(
        None,
        description="default: sqlite store under run.output_dir; credentials in it are kept "
        "in memory only (written and shown as ***@), a resume takes them from "
        "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD",
    )
    experiment: str = "raydistill"

    @field_validator("uri")
    @classmethod
    def _credentials_in_memory(cls, v: str | None) -> str | None:
        """The field keeps the redacted URI (see `orchestrator/credentials.py`)."""
        if v is None:
            return v
        if credentials.lost(v):  # a resumed run: its recipe file never held the password
            raise ValueError(
                f"{v} had credentials, which are never written down; set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
            )
        return credentials.hold(v)


class ClusterConfig(_Strict):
    address: str | None = Field(None, description="Ray address; default: start a local one")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray instance")
    max_restarts: int = Field(
        5,
        ge=0,
        description="restarts of each teacher, judge and rollout actor; the calls it had in "
        "flight are retried on the restarted actor",
    )
    max_student_restores: int = Field(
        2,
        ge=0,
        description="times a run brings its student group back from the last checkpoint "
        "after a rank died; past that the run stops, resumable",
    )
    setup_timeout_s: float = Field(
        900.0, gt=0, description="actors not placed and loaded within this: a fault"
    )
    step_timeout_s: float = Field(
        600.0,
        gt=0,
        description="a train step with no answer from every rank within this (a rank frozen, "
        "or blocked in a collective with one): the group is brought back from the checkpoint",
    )
    dashboard: bool = Field(
        False, description="a local Ray's dashboard, bound to 127.0.0.1 (never all interfaces)"
    )


class ExpandConfig(_Strict):
    """Self-instruct: the teacher writes new instructions from a few seed examples."""

    seeds: int = Field(8, ge=1, description="input prompts used as examples (never returned)")
    shots: int = Field(3, ge=1, description="seed examples shown in each request")
    requests: int = Field(32, ge=1, description="requests sent; each may give one instruction")
    near_duplicate: float = Field(
        0.7, gt=0, le=1, description="word ROUGE-L at or above: a near-duplicate (Self-Instruct)"
    )
    max_new_tokens: int = Field(48, ge=1)
    temperature: float = Field(0.9, ge=0)


class CurateConfig(_Strict):
    """A judge scores each (prompt, response); the stage keeps the best."""

    judge: str | None = Field(None, description="a judge of `judges`; default: the teacher")
    threshold: float | None = Field(None, description="keep scores at or above this")
    keep_fraction: float | None = Field(None, gt=0, le=1, description="or keep the top share")


class StageConfig(_Strict):
    """One stage of a staged recipe. expand/label/curate write a Parquet dataset the next
    stage reads; train runs the recipe (with `overrides`) on the current data, starting from
    the student the previous train stage ended with."""

    name: Name
    kind: Literal["expand", "label", "curate", "train"]
    teacher: str | None = Field(None, description="the teacher that writes; default: the first")
    expand: ExpandConfig = ExpandConfig()
    curate: CurateConfig = CurateConfig()
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="train stages: dotted recipe keys, e.g. train.steps"
    )


class Recipe(_Strict):
    run: RunConfig = RunConfig()
    teachers: list[TeacherConfig] = Field(default_factory=list)
    student: StudentConfig
    data: DataConfig = DataConfig()
    distill: DistillConfig = DistillConfig()
    rollout: RolloutConfig = RolloutConfig()
    mutual: MutualConfig = MutualConfig()
    judges: list[JudgeConfig] = Field(default_factory=list)
    rlaif: RlaifConfig = RlaifConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tracking: TrackingConfig = TrackingConfig()
    cluster: ClusterConfig = ClusterConfig()
    stages: list[StageConfig] = Field(
        default_factory=list, description="run in order, e.g. expand -> label -> train"
    )

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teachers: names must be unique, got {names}")
        self._check_stages(names)
        self._check_mode()
        if self.data.heldout < self.student.world_size:
            raise ValueError(
                f"data.heldout: {self.data.heldout} gives some of the "
                f"{self.student.world_size} student ranks no held-out example"
            )
        d = self.distill
        if d.terms is not None:
            if d.model_fields_set & {"loss", "alpha"}:
                raise ValueError("distill.terms: give terms, or loss and alpha, not both")
            names = [t.loss for t in d.terms]
            if not names or len(set(names)) != len(names):
                raise ValueError(f"distill.terms: one or more distinct terms, got {names}")
        for loss in [t.loss for t in d.terms] if d.terms else [d.loss]:
            if loss in ("skew_kl", "skew_reverse_kl") and d.skew >= 1:  # always 0
                raise ValueError(f"distill.skew: 1 makes {loss} zero whatever the student does")
        per_rank, rem = divmod(self.train.batch_size, self.student.world_size)
        if rem:
            raise ValueError(
                f"train.batch_size: {self.train.batch_size} does not split evenly over "
                f"student.world_size={self.student.world_size}"
            )
        if per_rank % self.train.micro_batch_size:
            raise ValueError(
                f"train.micro_batch_size: {self.train.micro_batch_size} does not divide the "
                f"per-rank batch {per_rank}"
            )
        return self

    def _check_aggregate(self) -> None:
        d, mode = self.distill, self.distill.mode
        if d.teacher_key is not None:
            if d.aggregate != "route":
                raise ValueError("distill.teacher_key: only distill.aggregate 'route' reads it")
            if mode != "off_policy" or self.data.source != "file":
                raise ValueError(
                    "distill.teacher_key: routing by a data field needs distill.mode "
                    "'off_policy' and data.source 'file'"
                )
        sampled = self.rolls_out
        if sampled and (d.aggregate == "route" or d.confidence_by == "gold"):
            what = "route" if d.aggregate == "route" else "confidence_by: gold"
            raise ValueError(
                f"distill.aggregate: {what} needs a gold continuation; the student's own "
                f"samples have none (use confidence_by: entropy)"
            )
        if d.aggregate in ("mean", "weighted", "confidence"):  # one mixture, one T and T^2
            for i, t in enumerate(self.teachers):
                if t.temperature is not None and t.temperature != d.temperature:
                    raise ValueError(
                        f"teachers.{i}.temperature: {t.temperature} differs from "
                        f"distill.temperature={d.temperature}; distill.aggregate {d.aggregate} "
                        f"mixes the teachers at distill.temperature (remove it)"
                    )

    def _check_mode(self) -> None:
        self._check_aggregate()
        mode, peers = self.distill.mode, self.mutual.peers
        if not self.teachers and mode not in ("mutual", "rlaif"):
            raise ValueError(
                "teachers: at least one teacher is needed (or distill.mode: mutual or rlaif)"
            )
        if not self.teachers and self.data.responses == "teacher":
            raise ValueError("data.responses: 'teacher' needs a teacher in `teachers`")
        for i, t in enumerate(self.teachers):
            if mode == "offline" and t.source.kind == "live":  # every teacher: its cache
                t.source = CacheSource()
            if not self.from_cache(t):
                continue
            if self.rolls_out and t.source.fresh == "refuse":
                raise ValueError(
                    f"teachers.{i}.source: a cached teacher cannot score the student's own "
                    f"samples (distill.lambda {self.on_policy_share:g}); set source.fresh: live "
                    f"to have live replicas score them"
                )
            if t.cross_tokenizer:
                raise ValueError(f"teachers.{i}.source: cache, not with cross_tokenizer (yet)")
        if mode == "mutual":
            if not peers:
                raise ValueError("mutual.peers: distill.mode 'mutual' needs at least one peer")
            names = ["student", *(p.name for p in peers), *(t.name for t in self.teachers)]
            if len(set(names)) != len(names):
                raise ValueError(f"mutual.peers: names must be unique and not 'student': {names}")
            for i, p in enumerate(peers):
                if p.world_size != self.student.world_size:
                    raise ValueError(
                        f"mutual.peers.{i}.world_size: {p.world_size} differs from "
                        f"student.world_size={self.student.world_size}; peers train on the "
                        f"same shards"
                    )
        if self.distill.mode in ("off_policy", "offline") and self.rolls_out:
            raise ValueError(
                f"distill.lambda: {self.distill.lmbda} makes mode {mode!r} sample the student "
                f"(use distill.mode: on_policy)"
            )
        if mode == "rlaif":
            if self.on_policy_share < 1:
                raise ValueError(
                    f"distill.lambda: {self.distill.lmbda}; judges judge the student's own "
                    f"samples, every step of mode 'rlaif' is on-policy (remove it)"
                )
            self._check_rlaif()
            if not self.distill.model_fields_set & {"loss", "terms"}:
                self.distill.loss = "reverse_kl"  # KD on the student's own samples
        if self.rolls_out:
            self._check_rollout()

    def _check_rollout(self) -> None:
        r = self.rollout
        if r.weight_sync != "auto" and r.backend != "vllm":
            raise ValueError(
                f"rollout.weight_sync: {r.weight_sync!r} is how a vLLM engine loads weights; "
                f"it needs rollout.backend: vllm (hf copies them in place)"
            )
        s = self.student
        if r.weight_sync in ("ipc", "rdt") and s.zero_stage == 3 and s.world_size > 1:
            raise ValueError(
                f"rollout.weight_sync: {r.weight_sync!r} sends each rank's full copy of the "
                f"weights; under student.zero_stage 3 only rank 0 gathers one (use nccl)"
            )
        if r.sync_every > r.max_staleness + 1:
            raise ValueError(
                f"rollout.sync_every: {r.sync_every} with max_staleness={r.max_staleness} "
                f"would write samples more than {r.max_staleness} steps stale"
            )
        per_rank = self.train.batch_size // max(self.student.world_size, 1)
        if per_rank % r.samples_per_prompt:
            raise ValueError(
                f"rollout.samples_per_prompt: {r.samples_per_prompt} does not divide the "
                f"per-rank batch {per_rank} (a prompt's samples stay on one rank)"
            )

    def _check_stages(self, teachers: list[str]) -> None:
        if len({s.name for s in self.stages}) != len(self.stages):
            raise ValueError("stages: names must be unique")
        for i, s in enumerate(self.stages):
            if s.kind != "train" and not teachers:
                raise ValueError(f"stages.{i}: a {s.kind} stage needs a teacher in `teachers`")
            if s.kind != "train" and self.data.source != "file":
                raise ValueError(f"stages.{i}: a {s.kind} stage reads prompts: data.source: file")
            if s.teacher and s.teacher not in teachers:
                raise ValueError(f"stages.{i}.teacher: no teacher named {s.teacher!r}")
            if s.kind == "curate":
                c = s.curate
                if (c.threshold is None) == (c.keep_fraction is None):
                    raise ValueError(f"stages.{i}.curate: set one of threshold, keep_fraction")
                if c.judge and c.judge not in [j.name for j in self.judges]:
                    raise ValueError(f"stages.{i}.curate.judge: no judge named {c.judge!r}")
            if s.kind == "train":
                raw = self.model_dump(mode="json", by_alias=True, exclude={"stages"})
                items = [f"{k}={json.dumps(v)}" for k, v in s.overrides.items()]
                try:
                    Recipe.model_validate(apply_overrides(raw, items))
                except (ValidationError, RecipeError) as exc:
                    why = _first_error(exc) if isinstance(exc, ValidationError) else str(exc)
                    raise ValueError(f"stages.{i}.overrides: {why}") from exc
            elif s.overrides:
                raise ValueError(f"stages.{i}.overrides: only train stages take overrides")

    def _check_rlaif(self) -> None:
        if not self.judges:
            raise ValueError("judges: distill.mode 'rlaif' needs at least one judge")
        names = [t.name for t in self.teachers]
        for i, j in enumerate(self.judges):
            if j.teacher and j.teacher not in names:
                raise ValueError(f"judges.{i}.teacher: no teacher named {j.teacher!r} in {names}")
            host = next((t for t in self.teachers if t.name == j.teacher), None)
            if host is not None and (self.from_cache(host) or host.backend != "hf"):
                raise ValueError(
                    f"judges.{i}.teacher: teacher {host.name!r} is served by "
                    f"{'its cache' if self.from_cache(host) else host.backend}; a judge is "
                    f"served by live hf replicas (or give the judge its own `model`)"
                )
        k = self.rollout.samples_per_prompt
        need = ALGORITHMS[self.rlaif.algorithm].min_group
        if k < need and self.rlaif.rl_weight:
            raise ValueError(
                f"rollout.samples_per_prompt: {self.rlaif.algorithm} compares a prompt's "
                f"samples with each other, it needs at least {need} (got {k})"
            )
        if self.train.micro_batch_size % k:
            raise ValueError(
                f"train.micro_batch_size: {self.train.micro_batch_size} splits a prompt's "
                f"{k} samples over micro-batches"
            )
        if self.rlaif.kd_weight and not self.teachers:
            raise ValueError("rlaif.kd_weight: logit KD needs a teacher in `teachers`")
        if self.rollout.top_p < 1 and (self.rlaif.rl_weight or self.rlaif.kl_coef):
            raise ValueError(
                f"rollout.top_p: {self.rollout.top_p} < 1 is refused for RL (rlaif.rl_weight "
                f"or rlaif.kl_coef > 0): the ratio and the KL need the log-probs of the "
                f"distribution sampled from, which top-p truncates; use top_p: 1"
            )

    def from_cache(self, teacher: TeacherConfig) -> bool:
        """Whether a teacher's signals on the data's rows come from its signal cache (every
        teacher of an offline run is)."""
        return teacher.source.kind == "cache"

    def runs_live(self, teacher: TeacherConfig) -> bool:
        """Whether a teacher has live replicas: a live one, or a cached one that scores the
        student's own samples live (`source.fresh: live`)."""
        return not self.from_cache(teacher) or (self.rolls_out and teacher.source.fresh == "live")

    @property
    def on_policy_share(self) -> float:
        """`distill.lambda`, or the mode's default: 1 where the student writes its samples."""
        if self.distill.lmbda is not None:
            return self.distill.lmbda
        return 1.0 if self.distill.mode in ROLLOUT_MODES else 0.0

    @property
    def rolls_out(self) -> bool:
        """Whether the run starts rollout engines (the student samples some of its rows)."""
        return self.on_policy_share > 0

    @property
    def grad_accum(self) -> int:
        return self.train.batch_size // self.student.world_size // self.train.micro_batch_size


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`a.b.c=value` (value parsed as YAML); list items by index: `teachers.0.model=...`."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override {item!r}", "expected key=value")
        node: Any = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if isinstance(node, list):
                node = node[_index(part, key, len(node))]
            else:
                node = node.setdefault(part, {})
            if not isinstance(node, dict | list):
                raise RecipeError(key, f"cannot set a field inside {part!r}")
        last = parts[-1]
        if isinstance(node, list):
            node[_index(last, key, len(node))] = yaml.safe_load(value)
        else:
            node[last] = yaml.safe_load(value)
    return raw


def _index(part: str, key: str, length: int) -> int:
    if not part.isdigit() or int(part) >= length:
        raise RecipeError(key, f"{part!r} is not an index of a list of {length}")
    return int(part)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Parse, override and type-check a recipe file (no file-system or model checks yet)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(str(path), "recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(str(path), f"not valid YAML ({exc.__class__.__name__})") from exc
    if not isinstance(raw, dict):
        raise RecipeError(str(path), "a recipe is a mapping of sections")
    raw = apply_overrides(raw, overrides or [])
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(str(path), _first_error(exc)) from exc
    return _resolve_paths(recipe, path.parent)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown key"
    got = err.get("input")
    shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
    return f"{where}: {msg}{shown}" if where else f"{msg}{shown}"


def _resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    """Relative data and model paths are relative to the recipe file."""
    if recipe.data.path and not Path(recipe.data.path).is_absolute():
        candidate = base / recipe.data.path
        if candidate.exists() or not Path(recipe.data.path).exists():
            recipe.data.path = str(candidate.resolve())
    for t in recipe.teachers:  # like output_dir: relative to where the run starts
        if isinstance(t.source, CacheSource) and t.source.path:
            t.source.path = str(Path(t.source.path).expanduser().resolve())
    for model_holder in [*recipe.teachers, recipe.student, *recipe.mutual.peers]:
        spec = model_holder.model
        if spec.startswith(("./", "../")) and (base / spec).exists():
            model_holder.model = str((base / spec).resolve())
    return recipe


def to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json", by_alias=True), sort_keys=False)
