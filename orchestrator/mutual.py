"""distill.mode: mutual — students that distill from each other while they all train (deep
mutual learning), optionally from frozen teachers as well, on the data's text or, with
`distill.lambda` > 0, on the first student's own samples.

Every student is its own DeepSpeed group (orchestrator/cohort.py) and trains on the same
shards. At step t each group first scores the step's shards with its current weights (its
top-k, the same TeacherSignal contract as a teacher), queued right before its own train
step t; then each group trains on the teachers' signals plus its peers' signals. So each
student learns from the others' distributions of the same step, before that step's update.
The signals a student trains on are weighted: each teacher by its `weight`, each peer by
`mutual.peer_weight`, normalised to sum to 1.
"""

from __future__ import annotations

from typing import Any

from actors.specs import WorkerSpec
from orchestrator.parts import Assembly, InFlight, Loop, Mode, Part, TeacherPool
from orchestrator.recipe import Recipe
from orchestrator.rollouts import sample_keys, sample_source
from orchestrator.students import StudentGroup, group_key, worker_spec
from orchestrator.teacher_targets import TeacherTargets

MAIN = "student"


def student_names(recipe: Recipe) -> list[str]:
    return [MAIN, *(p.name for p in recipe.mutual.peers)]


def signal_weights(recipe: Recipe, name: str) -> list[float]:
    """Weights of the signals `name` trains on: the teachers', then its peers' in order."""
    raw = [t.weight for t in recipe.teachers]
    raw += [recipe.mutual.peer_weight for n in student_names(recipe) if n != name]
    return [w / sum(raw) for w in raw]


class Peers(Part):
    """Every group scores the step's shards (weights before this step); each group gets
    the others' scores as targets."""

    def __init__(self, groups: list[StudentGroup]) -> None:
        self.groups = groups

    def before_train(self, item: InFlight, loop: Loop) -> None:
        scores = [group.score(item.shards) for group in self.groups]  # [group][rank]
        others = range(len(self.groups))
        item.peers = [
            [[scores[h][r] for h in others if h != g] for r in range(loop.world)] for g in others
        ]


def student_spec(recipe: Recipe) -> WorkerSpec:
    return worker_spec(recipe, name=MAIN, target_weights=signal_weights(recipe, MAIN))


def warm_keys(recipe: Recipe) -> list[str]:
    groups = [recipe.student, *recipe.mutual.peers]
    return [*(group_key(g) for g in groups), *sample_keys(recipe)]


def assemble(recipe: Recipe, pools: list[TeacherPool], students: Any, dataset: Any) -> Assembly:
    peers: list[StudentGroup] = []
    try:
        for peer in recipe.mutual.peers:
            spec = worker_spec(recipe, peer, peer.name, signal_weights(recipe, peer.name))
            peers.append(StudentGroup(recipe, peer, spec))
        for group in peers:  # started together, waited for together
            group.ready()
        source = sample_source(recipe, dataset)
    except BaseException:
        for group in peers:
            group.shutdown(graceful=False)
        raise
    feedback = [TeacherTargets(pools), Peers([students, *peers])]
    return Assembly(source, feedback, peers=peers)


MODE = Mode("mutual", student_spec, warm_keys, assemble)
