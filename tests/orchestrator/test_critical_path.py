"""Teachers yield shared cores once the student ranks are found to be the critical path
(orchestrator/critical_path.py). The real processes' nice values are checked on a run in
test_resume_and_tracking.py; here, the rule."""

from __future__ import annotations

from types import SimpleNamespace

from orchestrator.critical_path import WATCHED_STEPS, TeacherPriority


class _Replica:
    """Answers `yield_cpu` as a teacher does: with the nice value it now has."""

    def __init__(self, ray) -> None:
        self.asked: list[int] = []
        self.yield_cpu = SimpleNamespace(remote=lambda level: self._ask(ray, level))

    def _ask(self, ray, level: int):
        self.asked.append(level)
        return ray.put(level)


class _Pool:
    def __init__(self, ray, replicas: int) -> None:
        self.replicas = [_Replica(ray) for _ in range(replicas)]

    def actors(self) -> dict[str, _Replica]:
        return {f"r{i}": r for i, r in enumerate(self.replicas)}


def _series(priority: TeacherPriority, waits: list[float]) -> list[float]:
    out = []
    for wait in waits:
        metrics = {"signal_wait_s": wait, "step_time_s": 1.0}
        priority.observe(metrics)
        out.append(metrics["teacher_nice"])
    return out


def test_ranks_that_never_wait_make_every_teacher_yield_once(ray_session):
    pools = [_Pool(ray_session, 2), _Pool(ray_session, 1)]
    priority = TeacherPriority(pools, 19, prefetch_depth=2)
    # a slow first step and the 2 the prefetch window covers do not count
    waits = [3.0, 0.5, 0.5] + [0.01] * (WATCHED_STEPS + 3)
    decided = 3 + WATCHED_STEPS
    assert _series(priority, waits) == [0.0] * (decided - 1) + [19.0] * (len(waits) - decided + 1)
    assert [r.asked for p in pools for r in p.replicas] == [[19], [19], [19]]
    assert priority.waited() == 0.01


def test_ranks_waiting_for_signals_leave_the_teachers_alone(ray_session):
    pools = [_Pool(ray_session, 1)]
    priority = TeacherPriority(pools, 19, prefetch_depth=1)
    # every other step waits (as on-policy steps can): a median would call them idle
    assert _series(priority, [0.0, 0.0, 0.3, 0.0, 0.3, 0.0, 0.0, 0.0]) == [0.0] * 8
    assert priority.waited() == 0.15 and pools[0].replicas[0].asked == []


def test_the_prefetch_window_hides_slow_teachers_and_is_not_watched(ray_session):
    """Teachers slower than the ranks: the first steps take signals written during start-up
    (no wait), then every step waits. Watching those first steps would nice them."""
    pools = [_Pool(ray_session, 1)]
    priority = TeacherPriority(pools, 19, prefetch_depth=3)
    waits = [2.0, 0.0, 0.0, 0.0] + [0.3] * (WATCHED_STEPS + 2)
    assert _series(priority, waits) == [0.0] * len(waits)
    assert priority.waited() == 0.3 and pools[0].replicas[0].asked == []


def test_nice_zero_never_asks(ray_session):
    pools = [_Pool(ray_session, 1)]
    assert _series(TeacherPriority(pools, 0, 2), [0.0] * 8) == [0.0] * 8
    assert pools[0].replicas[0].asked == []
