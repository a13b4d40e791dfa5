"""The `stages` section: expand, label, curate and train stages run in order, and the
rules each kind keeps (a train stage's overrides are checked by the recipe itself)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from orchestrator.config_base import Name, Strict


class ExpandConfig(Strict):
    """Self-instruct: the teacher writes new instructions from a few seed examples."""

    seeds: int = Field(8, ge=1, description="input prompts used as examples (never returned)")
    shots: int = Field(3, ge=1, description="seed examples shown in each request")
    requests: int = Field(32, ge=1, description="requests sent; each may give one instruction")
    near_duplicate: float = Field(
        0.7, gt=0, le=1, description="word ROUGE-L at or above: a near-duplicate (Self-Instruct)"
    )
    max_new_tokens: int = Field(48, ge=1)
    temperature: float = Field(0.9, ge=0)


class CurateConfig(Strict):
    """A judge scores each (prompt, response); the stage keeps the best."""

    judge: str | None = Field(None, description="a judge of `judges`; default: the teacher")
    threshold: float | None = Field(None, description="keep scores at or above this")
    keep_fraction: float | None = Field(None, gt=0, le=1, description="or keep the top share")


class StageConfig(Strict):
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
    starts_from: Literal["previous", "recipe"] = Field(
        "previous",
        description="train stages: the student the previous train stage ended with, or the "
        "recipe's own (its model and cut, with this stage's overrides)",
    )
    previous_teaches: Name | None = Field(
        None,
        description="train stages: the previous train stage's student replaces this teacher "
        "(by name): a teacher -> assistant -> student chain",
    )


def check(stages: list[StageConfig], teachers: list[str], judges: list[str], data: str) -> None:
    """What each stage kind needs from the rest of the recipe (`data`: data.source)."""
    if len({s.name for s in stages}) != len(stages):
        raise ValueError("stages: names must be unique")
    for i, s in enumerate(stages):
        if s.kind != "train" and not teachers:
            raise ValueError(f"stages.{i}: a {s.kind} stage needs a teacher in `teachers`")
        if s.kind != "train" and data != "file":
            raise ValueError(f"stages.{i}: a {s.kind} stage reads prompts: data.source: file")
        if s.teacher and s.teacher not in teachers:
            raise ValueError(f"stages.{i}.teacher: no teacher named {s.teacher!r}")
        if s.previous_teaches and s.previous_teaches not in teachers:
            raise ValueError(
                f"stages.{i}.previous_teaches: no teacher named {s.previous_teaches!r}"
            )
        earlier = [x for x in stages[:i] if x.kind == "train"]
        if s.kind != "train" and (s.starts_from != "previous" or s.previous_teaches):
            raise ValueError(f"stages.{i}: starts_from and previous_teaches are for train stages")
        if s.previous_teaches and not earlier:
            raise ValueError(f"stages.{i}.previous_teaches: no train stage before it")
        if s.kind == "curate":
            c = s.curate
            if (c.threshold is None) == (c.keep_fraction is None):
                raise ValueError(f"stages.{i}.curate: set one of threshold, keep_fraction")
            if c.judge and c.judge not in judges:
                raise ValueError(f"stages.{i}.curate.judge: no judge named {c.judge!r}")
        if s.kind != "train" and s.overrides:
            raise ValueError(f"stages.{i}.overrides: only train stages take overrides")
