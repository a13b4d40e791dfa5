"""Waiting on actors with a bound, and restarting the frozen services a wait ran into."""

from __future__ import annotations

from typing import Any

import ray

from orchestrator.faults import RuntimeFault, gather


class BoundedWaits:
    """Waits of one run on the actors it started. `services`: the actors the ranks wait on
    (teacher replicas, rollout engines, judges), probed when a wait runs past its bound."""

    def __init__(self, services: list[Any], recipe: Any, tracker: Any) -> None:
        self.services, self.cluster, self.tracker = services, recipe.cluster, tracker

    def wait(
        self,
        refs: list[ray.ObjectRef],
        what: str,
        who: list[str] | None = None,
        *,
        students: bool = False,
    ) -> list[Any]:
        """The refs' values, waited for `cluster.step_timeout_s`. Past it, a frozen service
        (teacher replica, judge, rollout engine) the ranks wait on is the first suspect: the
        silent ones are restarted, their calls run again, and the wait goes on under a new
        bound (time to restart and redo the work). With every service answering, the fault
        stands (`students`: a rank is stuck, the group is brought back)."""
        c = self.cluster
        bound = c.step_timeout_s
        while True:
            try:
                return gather(refs, what, timeout_s=bound, who=who, students=students)
            except RuntimeFault as fault:
                if not fault.timed_out or not self._restart_silent_services(what, bound):
                    raise
            bound = c.setup_timeout_s + c.step_timeout_s

    def _restart_silent_services(self, what: str, waited: float) -> list[str]:
        """Probe every service actor (a no-op, `step_timeout_s` at most); restart those that
        do not answer (each within `cluster.max_restarts`); report them by name, on the
        console and as MLflow tags `restarts/<actor>`."""
        c = self.cluster
        restarted = []
        for service in self.services:
            for name in service.restart_unresponsive(c.step_timeout_s):
                count = service.restarts[name]
                print(
                    f"{what}: no answer within {waited:.0f}s; {name} did not answer a probe: "
                    f"restarted it ({count}/{c.max_restarts}), its calls run again",
                    flush=True,
                )
                self.tracker.set_tags({f"restarts/{name}": str(count)})
                restarted.append(name)
        return restarted
