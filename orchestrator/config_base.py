"""What every recipe section shares: strict models, folder-safe names, registry-checked
names, and the actor placement fields (`Placed`), plus the student they place."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from actors.registry import Registry


class Strict(BaseModel):
    """Unknown keys are errors (a typo is never silently ignored); assignments validated."""

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


class Placed(Strict):
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


class ByImportance(Strict):
    """Keep the blocks that change their input most (Minitron-style depth pruning)."""

    layers: int = Field(ge=1, description="how many decoder layers the student keeps")
    calibration_rows: int = Field(
        32, ge=1, description="rows of the training split (never held-out rows) scored on"
    )
    score: Literal["cosine", "kl_drop"] = Field(
        "cosine",
        description="cosine: 1 - cos(block input, block output) averaged over non-pad tokens; "
        "kl_drop: KL(full model || the model without that block) of the next-token "
        "distribution, averaged over non-pad tokens",
    )


class StudentInit(Strict):
    """How the student is cut from its model: exactly one of the three. Resolved once per
    run to a layer list (orchestrator/student_init.py) kept in the run directory."""

    layers: list[int] | None = Field(None, description="keep these decoder layers")
    every_nth: int | None = Field(
        None,
        ge=1,
        description="keep layers 0, n, 2n, ... below L, and always the last layer L-1 "
        "(every_nth: 1 keeps all; 3 of 12 keeps 0 3 6 9 11)",
    )
    by_importance: ByImportance | None = Field(
        None, description="keep the `layers` highest-scoring blocks, in their original order"
    )

    @model_validator(mode="before")
    @classmethod
    def _exactly_one(cls, data: Any) -> Any:
        """Checked on the input (one clean line, not the model's repr)."""
        if isinstance(data, dict):
            given = [k for k in ("layers", "every_nth", "by_importance") if data.get(k) is not None]
            if len(given) != 1:
                raise ValueError(
                    f"give exactly one of layers, every_nth, by_importance (got {given})"
                )
        return data


class StudentConfig(Placed):
    model: str = Field(description="local HF folder, known model name, or hub name")
    layers: list[int] | None = Field(
        None, description="keep only these decoder layers (the same as init: {layers: [...]})"
    )
    init: StudentInit | None = Field(
        None, description="how the student is cut from `model`: layers, every_nth or by_importance"
    )
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

    _resolved: list[int] | None = PrivateAttr(None)  # what `init` resolved to for this run

    @model_validator(mode="before")
    @classmethod
    def _layers_or_init(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("layers") is not None and data.get("init"):
            raise ValueError(
                "give layers or init, not both (init: {layers: [...]} is the same as layers)"
            )
        return data

    @property
    def kept_layers(self) -> list[int] | None:
        """The decoder layers the student keeps (None: all): what the ranks, rollout engines,
        checkpoints and export are given. `init` other than a plain list needs the model (and
        maybe data), so it is resolved once per run first (`orchestrator/student_init.py`)."""
        if self.init is None:
            return self.layers
        if self.init.layers is not None:
            return list(self.init.layers)
        if self._resolved is None:
            raise RuntimeError("student.init is not resolved yet (orchestrator/student_init.py)")
        return list(self._resolved)

    def resolve(self, layers: list[int]) -> None:
        """Set the layers `init` resolved to (not part of the recipe: its hash is unchanged)."""
        self._resolved = list(layers)
