"""The recipe: one YAML file validated into typed models, plus dotted command-line overrides.

Everything that can be checked before an actor starts is checked here: unknown keys, wrong
types, impossible values, missing files, and teacher/student vocab agreement. Each problem
becomes a RecipeError naming the field, which the CLI prints as one line with exit code 2.
The sections a mode owns live beside it, with the rules between them and the rest:
`teacher_config`, `rollout_config`, `mutual_config`, `rlaif_config`, `stage_config`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from actors.aggregate import AGGREGATIONS
from actors.losses import LOSSES
from actors.objective import CE
from orchestrator import (
    credentials,
    feature_config,
    mutual_config,
    rlaif_config,
    rollout_config,
    stage_config,
)
from orchestrator.config_base import Name, Strict, StudentConfig, registered
from orchestrator.feature_config import FeatureConfig
from orchestrator.mutual_config import MutualConfig
from orchestrator.rlaif_config import JudgeConfig, RlaifConfig
from orchestrator.rollout_config import RolloutConfig
from orchestrator.stage_config import StageConfig
from orchestrator.teacher_config import CacheSource, TeacherConfig


class RecipeError(Exception):
    """A problem with the user's input: one line, naming the field or file."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")


class RunConfig(Strict):
    name: Name = "run"
    output_dir: str = "runs"
    seed: int = 0
    register_as: Name | None = Field(
        None,
        description="register the final student in MLflow's model registry under this name "
        "(staged recipes: the last train stage's)",
    )


class GenerationConfig(Strict):
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(16, ge=1)


class SyntheticConfig(Strict):
    num_sequences: int = Field(256, ge=1)
    branching: int = Field(4, ge=1, description="likely successors per token")


class DataConfig(Strict):
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


class LossTerm(Strict):
    """One term of the objective: a registered divergence to the teachers' targets, or `ce`
    (hard-label cross-entropy), with its weight."""

    loss: Annotated[str, AfterValidator(_term_name)]
    weight: float = Field(gt=0)


class DistillConfig(Strict):
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
    features: FeatureConfig | None = Field(
        None, description="feature distillation: hidden states of chosen layer pairs"
    )
    signal: Literal["topk", "hidden"] = Field(
        "topk",
        description="what a teacher ships per position: topk (top_k ids and log-probs) or "
        "hidden (its final hidden state, float16; the ranks hold a frozen copy of its output "
        "head and train on its exact distribution over the whole vocab)",
    )


class TrainConfig(Strict):
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


class CheckpointConfig(Strict):
    every: int = Field(50, ge=0, description="steps between checkpoints; 0: only at the end")
    keep: int = Field(2, ge=1)


class TrackingConfig(Strict):
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


class ClusterConfig(Strict):
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


class Recipe(Strict):
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
        self._check_student_init()
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
        mode = self.distill.mode
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
        served = {
            t.name: ("its cache" if self.from_cache(t) else t.backend, bool(t.cross_tokenizer))
            for t in self.teachers
        }
        if self.distill.features is not None:
            feature_config.check(self.distill.features, mode, served)
        if self.distill.signal == "hidden":
            feature_config.check_signal(mode, self.distill.aggregate, served)
        if mode == "mutual":
            mutual_config.check(self.mutual, self.student, [t.name for t in self.teachers])
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
            served_by = {
                t.name: "its cache" if self.from_cache(t) else t.backend for t in self.teachers
            }
            r = self.rollout
            rlaif_config.check(
                self.rlaif,
                self.judges,
                served_by,
                r.samples_per_prompt,
                r.top_p,
                self.train.micro_batch_size,
            )
            if not self.distill.model_fields_set & {"loss", "terms"}:
                self.distill.loss = "reverse_kl"  # KD on the student's own samples
        if self.rolls_out:
            rollout_config.check(self.rollout, self.student, self.train.batch_size)

    def _check_student_init(self) -> None:
        """By-importance calibration rows come from the training split, which must be known
        in the driver before any actor starts: not with responses the teacher writes."""
        written = self.data.source == "file" and self.data.responses == "teacher"
        for where, s in self.students():
            if written and s.init is not None and s.init.by_importance is not None:
                raise ValueError(
                    f"{where}.init.by_importance: its calibration rows are training rows, and "
                    f"with data.responses 'teacher' those are written only once the teachers "
                    f"run (give the responses, e.g. a staged recipe's label stage, or use "
                    f"init.layers / init.every_nth)"
                )

    def students(self) -> list[tuple[str, StudentConfig]]:
        """The models the run trains, by field: the student, and in mode mutual its peers."""
        peers = self.mutual.peers if self.distill.mode == "mutual" else []
        return [("student", self.student), *((f"mutual.peers.{i}", p) for i, p in enumerate(peers))]

    def _check_stages(self, teachers: list[str]) -> None:
        stage_config.check(self.stages, teachers, [j.name for j in self.judges], self.data.source)
        for i, s in enumerate(self.stages):
            if s.kind != "train":
                continue
            raw = self.model_dump(mode="json", by_alias=True, exclude={"stages"})
            items = [f"{k}={json.dumps(v)}" for k, v in s.overrides.items()]
            try:
                Recipe.model_validate(apply_overrides(raw, items))
            except (ValidationError, RecipeError) as exc:
                why = _first_error(exc) if isinstance(exc, ValidationError) else str(exc)
                raise ValueError(f"stages.{i}.overrides: {why}") from exc

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
