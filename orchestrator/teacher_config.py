"""The `teachers` section: each teacher's model, replicas and where its signals come from
(live replicas or a signal cache: a discriminated union on `source.kind`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from orchestrator.config_base import Name, Placed, Strict


class LiveSource(Strict):
    """The teacher's replicas load its model and score what they are sent."""

    kind: Literal["live"] = "live"


class CacheSource(Strict):
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
