"""distill.mode: rlaif — judges give feedback on the student's own samples, live.

Every step is the student's samples (`samples_per_prompt` K per prompt, weights synced as
in on_policy); the judges reward them (orchestrator/judging.py) and the ranks take one
optimizer step on one objective: KD on the teachers' targets (`rlaif.kd_weight`) + the RL
terms. The win rate against the starting student is counted on held-out prompts
(orchestrator/win_rate.py).
"""

from __future__ import annotations

from typing import Any

from actors.rollout import sampling_temperature
from actors.specs import RLSpec, WorkerSpec
from orchestrator.judge_check import JudgeCheck
from orchestrator.judges import JudgePool, judge_key
from orchestrator.judging import JudgeRewards, Texts
from orchestrator.parts import Assembly, Mode, Part, TeacherPool
from orchestrator.recipe import Recipe
from orchestrator.rlaif_config import JudgeConfig
from orchestrator.rollouts import sample_keys, sample_source
from orchestrator.students import group_key, worker_spec
from orchestrator.teacher_targets import TeacherTargets
from orchestrator.win_rate import WinRate


def rl_spec(recipe: Recipe) -> RLSpec:
    """The rlaif section as the ranks read it, with the rollouts' group size and T."""
    ours = recipe.rlaif.model_dump(exclude={"win_rate_every", "win_rate_prompts", "win_rate_by"})
    return RLSpec(
        **ours,
        group_size=recipe.rollout.samples_per_prompt,
        temperature=sampling_temperature(recipe.rollout.temperature),
    )


def judge_model(recipe: Recipe, judge: JudgeConfig) -> str | None:
    """The judge's own model, or the one of the teacher it names (None: a function)."""
    models = {t.name: t.model for t in recipe.teachers}
    return judge.model or (models[judge.teacher] if judge.teacher else None)


def student_spec(recipe: Recipe) -> WorkerSpec:
    return worker_spec(recipe, rl=rl_spec(recipe))


def warm_keys(recipe: Recipe) -> list[str]:
    own = [j for j in recipe.judges if not j.teacher]  # the others are the teachers' actors
    judges = [judge_key(j, judge_model(recipe, j), recipe.cluster) for j in own]
    return [group_key(recipe.student), *sample_keys(recipe), *judges]


def assemble(recipe: Recipe, pools: list[TeacherPool], students: Any, dataset: Any) -> Assembly:
    source = sample_source(recipe, dataset)
    judges: list[JudgePool] = []
    try:
        hosts = {p.name: p for p in pools}
        for j in recipe.judges:  # a judge naming a teacher: served by the teacher's replicas
            host = hosts[j.teacher] if j.teacher else None
            judges.append(JudgePool(j, judge_model(recipe, j), recipe.cluster, host))
        texts = Texts(recipe)
    except BaseException:
        source.shutdown(keep=False)
        for pool in judges:
            pool.shutdown()
        raise
    feedback: list[Part] = [TeacherTargets(pools)] if recipe.rlaif.kd_weight > 0 else []
    rewarding = [p for p in judges if p.cfg.role == "reward"]
    feedback.append(JudgeRewards(recipe, rewarding, texts))
    check = JudgeCheck(recipe, judges, pools)
    return Assembly(source, feedback, extra=[check, WinRate(recipe, source, judges, texts)])


MODE = Mode("rlaif", student_spec, warm_keys, assemble)
