"""The parts a run's loop is composed of (orchestrator/train_loop.py), and what they pass.

A run is one loop given a sample source (fixed text, cached rows, the student's own
rollouts), feedback providers (teachers -> logit targets, judges -> rewards, peers ->
targets) and student groups. Each part implements the hooks it needs of `Part`; the loop
calls every part's hook at its place in a step, in the order the mode listed them. A mode
(`Mode`) is a named assembly of parts; the driver picks one by `distill.mode`
(orchestrator/driver.py `MODES`).

This module imports nothing of the orchestrator, so every part stands one level above it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import ray

from actors.specs import WorkerSpec


class TeacherPool(Protocol):
    """One teacher as the loop sees it: signals for shards, responses for prompts, and the
    actors behind it by name (for faults and restarts). Live replicas
    (orchestrator/teachers.py) and a cache reader (orchestrator/cached_teachers.py)."""

    replicas: list[Any]
    restarts: dict[str, int]

    @property
    def name(self) -> str: ...

    def info(self) -> dict[str, Any]: ...

    def score(
        self,
        shard_ref: ray.ObjectRef,
        rows: list[int] | None = None,
        examples: list[int] | None = None,
    ) -> ray.ObjectRef: ...

    def generate(
        self,
        prompts: list[str],
        sampling: dict[str, Any],
        chunk: int,
        on_chunk: Callable[[int], None],
    ) -> list[dict[str, str]]: ...

    def holder(self, ref: ray.ObjectRef) -> str: ...

    def actors(self) -> dict[str, Any]: ...

    def restart_unresponsive(self, timeout_s: float) -> list[str]: ...

    def served(self) -> dict[str, int]: ...

    def queue_metrics(self) -> dict[str, float]: ...

    def shutdown(self, keep: bool = False) -> None: ...


@dataclass
class InFlight:
    """A step whose shards are in the object store and whose feedback is being computed."""

    step: int
    shards: list[ray.ObjectRef]  # one per rank
    tokens: int | None  # loss tokens of the whole step, all ranks (None: the ranks count)
    signals: list[list[ray.ObjectRef]] = field(default_factory=list)  # [rank][teacher]
    meta: list[ray.ObjectRef] = field(default_factory=list)  # what wrote the shards, if any
    rows: np.ndarray | None = None  # the data (and cache) rows the shards were cut from
    routes: np.ndarray | None = None  # each row's teacher (distill.aggregate: route)
    prompts: list[np.ndarray] | None = None  # the prompts the samples answer, in order
    prompt_rows: np.ndarray | None = None  # the data rows those prompts came from
    rl: list[dict[str, Any]] | None = None  # [rank]: rewards and log-probs (judges)
    peers: list[list[list[ray.ObjectRef]]] = field(default_factory=list)  # [group][rank]

    def signals_of(self, group: int) -> list[list[ray.ObjectRef]]:
        """[rank][signal] a group trains on: the teachers', then its peers'."""
        if not self.peers:
            return self.signals
        return [[*s, *p] for s, p in zip(self.signals, self.peers[group], strict=True)]


@dataclass
class Queued:
    """A step queued on the students, with what is queued right behind it."""

    step: int
    metrics: list[list[ray.ObjectRef]]  # [group][rank]
    meta: list[ray.ObjectRef] = field(default_factory=list)
    evaluation: list[ray.ObjectRef] | None = None
    save: list[ray.ObjectRef] | None = None


@dataclass
class RunResult:
    run_dir: Path
    steps_done: int
    finished: bool
    summary: dict[str, Any] = field(default_factory=dict)


class Loop(Protocol):
    """What a part may ask of the loop that runs it."""

    recipe: Any
    run_dir: Path
    dataset: Any
    students: Any  # the first student group: the one rollouts sample from
    world: int
    next_issue: int  # the first step not issued yet

    def wait(self, refs: list[ray.ObjectRef], what: str, who: list[str] | None = None) -> list: ...

    def metas(self, item: InFlight | Queued) -> list[dict[str, Any]]: ...


class Part:
    """A piece of a run. Every hook is optional; `services` are the actors the ranks wait on
    (probed, and restarted when silent, when a step runs past its bound)."""

    services: tuple[Any, ...] = ()

    def started(self, start: int, loop: Loop) -> None:
        """The students hold the weights of step `start`."""

    def can_issue(self, step: int) -> bool:
        return True

    def issued(self, item: InFlight) -> None:
        """A step's samples are in the object store: start the feedback on them."""

    def before_train(self, item: InFlight, loop: Loop) -> None:
        """Right before the step is queued on the students: last inputs (rewards, peers)."""

    def after_train(self, step: int, end: int, loop: Loop) -> None:
        """Work to queue on the students right behind train step `step`."""

    def step_metrics(self, item: Queued, metrics: dict[str, float], loop: Loop) -> None:
        """Add this part's figures for a finished step."""

    def headline(self, metrics: dict[str, float]) -> dict[str, float]:
        """Figures for the progress line, next to loss and kl."""
        return {}

    def finish(self, summary: dict[str, Any], loop: Loop) -> None:
        """The run finished: add to its summary."""

    def shutdown(self, keep: bool) -> None:
        """Stop (or with `keep`, park) the actors this part started."""


class Source(Part):
    """Where a step's samples come from."""

    def issue(self, step: int, world: int) -> InFlight:
        raise NotImplementedError


@dataclass
class Assembly:
    """What a mode builds for one run: the source, the feedback, the student groups beyond
    the driver's first one (peers) and further parts (evaluators)."""

    source: Source
    feedback: list[Part]
    peers: list[Any] = field(default_factory=list)  # StudentGroup, named
    extra: list[Part] = field(default_factory=list)

    @property
    def parts(self) -> list[Part]:
        return [self.source, *self.feedback, *self.extra]


@dataclass(frozen=True)
class Mode:
    """A mode by name: the spec of its first student group, the warm keys of everything it
    starts beyond the teachers (orchestrator/warm.py), and its assembly:
    `assemble(recipe, teacher pools, first student group, dataset)`, which starts the
    mode's own actors (rollout engines, judges, peers)."""

    name: str
    student_spec: Callable[[Any], WorkerSpec]
    warm_keys: Callable[[Any], list[str]]
    assemble: Callable[..., Assembly]
