"""distill.mode: off_policy, offline, on_policy — the teachers' logit targets on the source's
samples. One assembly; the modes differ only in the source's settings: off_policy trains on
the data's text, offline reads every teacher from its signal cache (raydistill cache build),
on_policy has the student write its own samples on a share `distill.lambda` of the steps
(GKD; default every step) with the rollout engines (`rollout`: hf or vllm)."""

from __future__ import annotations

from typing import Any

from actors.specs import WorkerSpec
from orchestrator.parts import Assembly, Mode, TeacherPool
from orchestrator.recipe import Recipe
from orchestrator.rollouts import sample_keys, sample_source
from orchestrator.students import group_key, worker_spec
from orchestrator.teacher_targets import TeacherTargets


def student_spec(recipe: Recipe) -> WorkerSpec:
    return worker_spec(recipe)


def warm_keys(recipe: Recipe) -> list[str]:
    return [group_key(recipe.student), *sample_keys(recipe)]


def assemble(recipe: Recipe, pools: list[TeacherPool], students: Any, dataset: Any) -> Assembly:
    return Assembly(sample_source(recipe, dataset), [TeacherTargets(pools)])


MODES = [
    Mode(name, student_spec, warm_keys, assemble) for name in ("off_policy", "offline", "on_policy")
]
