"""What the teachers' hidden states are for: `distill.features` (feature distillation from
one live teacher, a term beside the logit KD; actors/features.py holds the math) and
`distill.signal: hidden` (exact full-vocab targets rebuilt on the ranks from each teacher's
final hidden state, actors/objective.py's DenseTarget)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from actors.features import FEATURE_LOSSES, FeatureSpec, uniform_pairs
from orchestrator.config_base import Name, Strict, registered

MODES = ("off_policy", "on_policy")  # a live teacher scores every batch the ranks train on
FEATURE_MODES = (*MODES, "offline")  # ... or its cache holds the states (`cache build`)


class FeatureConfig(Strict):
    teacher: Name | None = Field(None, description="whose hidden states; default the first")
    pairs: list[tuple[int, int]] | Literal["uniform"] = Field(
        "uniform",
        description="[student layer, teacher layer] pairs, numbered as HF's hidden_states (0: "
        "embeddings, i: after i blocks, L: the final normalised output; the student's of its "
        "kept layers); uniform: every student block's output against the teacher's at the "
        "same depth fraction",
    )
    loss: Annotated[str, registered(FEATURE_LOSSES)] = Field(
        "cosine",
        description=f"one of {FEATURE_LOSSES.names()}: 1 - cos, or MSE with each channel "
        "divided by the teacher's spread of it",
    )
    weight: float = Field(1.0, gt=0, description="its weight among the loss terms")
    only: bool = Field(
        False,
        description="the feature term alone, logit KD and CE weighing 0: a `repair` stage "
        "that realigns a freshly cut student's layers before logit KD",
    )


def check(f: FeatureConfig, mode: str, teachers: dict[str, tuple[str, bool]]) -> None:
    """`teachers`: name -> (backend or 'its cache', cross_tokenizer). The states come from a
    live transformers replica of a teacher sharing the student's tokenizer (positions must
    be the student's), or from its signal cache, built with the same pairs."""
    if mode not in FEATURE_MODES:
        raise ValueError(f"distill.features: modes {FEATURE_MODES}, not {mode!r}")
    if not teachers:
        raise ValueError("distill.features: needs a teacher")
    name = f.teacher or next(iter(teachers))
    if name not in teachers:
        raise ValueError(f"distill.features.teacher: {name!r} is not among {list(teachers)}")
    served, cross = teachers[name]
    if served not in ("hf", "its cache") or cross:
        raise ValueError(
            f"distill.features.teacher: {name!r} is served by {served}"
            f"{' across tokenizers' if cross else ''}; hidden states come from live hf "
            f"replicas of a same-tokenizer teacher or from its cache"
        )
    f.teacher = name


def check_signal(mode: str, aggregate: str, teachers: dict[str, tuple[str, bool]]) -> None:
    """distill.signal: hidden. Every teacher a live hf replica sharing the student's
    tokenizer (the ranks hold its head and read its states at the student's positions);
    each teacher's own loss (sum_of_losses): a top-k blend has nothing to blend here."""
    if mode not in MODES:
        raise ValueError(f"distill.signal: 'hidden' in modes {MODES}, not {mode!r}")
    if aggregate != "sum_of_losses":
        raise ValueError(
            f"distill.signal: 'hidden' with aggregate sum_of_losses, not {aggregate!r}"
        )
    for name, (served, cross) in teachers.items():
        if served != "hf" or cross:
            raise ValueError(
                f"distill.signal: 'hidden' needs live hf replicas of same-tokenizer teachers; "
                f"{name!r} is served by {served}{' across tokenizers' if cross else ''}"
            )


def resolve(f: FeatureConfig, student_layers: int, teacher_layers: int) -> None:
    """Pairs made explicit and within range (the
    preflight, which reads both configs)."""
    if f.pairs == "uniform":
        f.pairs = list(uniform_pairs(student_layers, teacher_layers))
    for s, t in f.pairs:
        if not (0 <= s <= student_layers and 0 <= t <= teacher_layers):
            raise ValueError(
                f"[{s}, {t}] out of range: the student has hidden states "
                f"0..{student_layers}, teacher {f.teacher!r} 0..{teacher_layers}"
            )


def spec(f: FeatureConfig | None, teacher_model: str) -> FeatureSpec | None:
    """What the ranks get, after `resolve`; the projections' width is the teacher's."""
    if f is None:
        return None
    assert f.teacher is not None and f.pairs != "uniform", "distill.features not resolved"
    from transformers import AutoConfig

    from actors.model_store import resolve_model

    width = AutoConfig.from_pretrained(resolve_model(teacher_model)).get_text_config().hidden_size
    pairs = tuple((int(s), int(t)) for s, t in f.pairs)
    return FeatureSpec(pairs, f.loss, f.weight, f.teacher, int(width))
