"""Waiting on actors without waiting forever: a death watch over a set of refs, and the probe
that finds which service actor stopped answering.

`ray.get` on the refs of several ranks blocks on the first one; if another rank died, the
survivors sit in a collective until the process-group timeout (30 minutes) and so does the
driver. `gather` waits on all the refs at once, raises as soon as any of them failed, so a
dead actor is seen within `poll_s`, and its bound caps the whole wait: every wait on an actor
has one, and the fault names the actors that did not answer.

A step that runs past its bound may be a frozen service (a teacher replica, a judge, a
rollout engine) that the ranks wait on, not a frozen rank: `restart_unresponsive` sends each
service actor a no-op and restarts the ones that do not answer, within their restart budget;
Ray then runs their calls in flight again (they are idempotent).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import ray

OUT_OF_MEMORY_HINT = "lower train.micro_batch_size or data.seq_len, or give the actors more memory"
EXIT_FAULT = 1  # a fault the run dir can be resumed from
EXIT_CAPACITY = 2  # memory or objects the cluster could not hold: the recipe must change


class RuntimeFault(RuntimeError):
    """A fault during a run (an actor died, a wait ran past its bound): the run directory
    stays resumable and the CLI prints one line. `student_lost`: a student rank died or
    froze (the group can be brought back from the last checkpoint); `timed_out`: nothing
    failed, some actor did not answer within the bound; `exit_code`: the CLI's."""

    student_lost = False
    timed_out = False
    exit_code = EXIT_FAULT


# Ray's own errors that say the cluster could not hold the run (not a bug): one line, exit 2
RAY_CAPACITY_ERRORS = (ray.exceptions.OutOfMemoryError, ray.exceptions.ObjectLostError)


def gather(
    refs: list[ray.ObjectRef],
    what: str,
    *,
    timeout_s: float,
    who: list[str] | None = None,
    poll_s: float = 1.0,
    students: bool = False,
) -> list[Any]:
    """The refs' values; a failed ref raises RuntimeFault at once, a wait past `timeout_s`
    raises one naming the actors (`who[i]` made refs[i]) that did not answer. `students`:
    the refs are the student group's, so a wait past the bound means a rank is stuck
    (frozen, or blocked in a collective with one that is) and the group is lost."""
    named, who = who is not None, who or [what] * len(refs)
    deadline = time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=poll_s)
        for ref in ready:
            try:
                ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                if students and _peer_lost(exc) and pending:  # the cause: the rank that died
                    ref, exc = _root_cause(pending, ref, exc)
                fault = RuntimeFault(f"{_where(what, who[refs.index(ref)])}: {_reason(exc)}")
                # `students`: every ref is a rank's. A lost node reports its ranks as
                # unavailable (ActorUnavailableError, no class name in the message), and a
                # surviving rank's collective may fail first (its peer's socket closed)
                fault.student_lost = (
                    _actor_itself_died(exc) and (students or "StudentWorker" in str(exc))
                ) or (students and _peer_lost(exc))
                fault.exit_code = EXIT_CAPACITY if _out_of_memory(exc) else EXIT_FAULT
                raise fault from exc
            except RAY_CAPACITY_ERRORS as exc:
                raise capacity_fault(exc, _where(what, who[refs.index(ref)])) from exc
        if time.monotonic() > deadline and pending:
            late = ", ".join(sorted({who[refs.index(r)] for r in pending}))
            fault = RuntimeFault(
                f"{what}: no answer within {timeout_s:.0f}s" + (f" from {late}" if named else "")
            )
            fault.student_lost, fault.timed_out = students, True
            raise fault
    return ray.get(list(refs))


def _root_cause(
    pending: list[ray.ObjectRef], ref: ray.ObjectRef, exc: Exception, wait_s: float = 10.0
) -> tuple[ray.ObjectRef, Exception]:
    """A rank's collective failed because its peer went away: wait briefly for the others,
    and name the rank that died where one did (else the collective's own error)."""
    ready, _ = ray.wait(pending, num_returns=len(pending), timeout=wait_s)
    for other in ready:
        try:
            ray.get(other)
        except ray.exceptions.RayActorError as died:
            if _actor_itself_died(died):
                return other, died
        except ray.exceptions.RayError:
            continue
    return ref, exc


def capacity_fault(exc: Exception, where: str | None = None) -> RuntimeFault:
    """Ray's OutOfMemoryError / ObjectLostError as one line (exit 2), wherever it is
    raised (a wait on an actor, `ray.put`, a task's argument)."""
    if isinstance(exc, ray.exceptions.OutOfMemoryError):
        why = f"out of memory (Ray's memory monitor killed a worker); {OUT_OF_MEMORY_HINT}"
    else:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        why = (
            f"an object was lost ({type(exc).__name__}: {first}); its node died or the object "
            "store could not keep it: give the cluster more object store memory"
        )
    fault = RuntimeFault(f"{where}: {why}" if where else why)
    fault.exit_code = EXIT_CAPACITY
    return fault


def probe(actors: dict[str, Any], timeout_s: float) -> list[str]:
    """The names of the actors that did not answer a no-op call within `timeout_s` (frozen,
    dead, or busy past the bound); all are probed at once."""
    refs = {name: actor.__ray_ready__.remote() for name, actor in actors.items()}
    if not refs:
        return []
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    answered = set(ready)
    silent = []
    for name, ref in refs.items():
        try:
            if ref not in answered:
                raise TimeoutError
            ray.get(ref)
        except (TimeoutError, ray.exceptions.RayError):
            silent.append(name)
    return silent


def restart_unresponsive(
    actors: dict[str, Any], restarts: dict[str, int], max_restarts: int, timeout_s: float
) -> list[str]:
    """Probe `actors` (by name) and restart those that did not answer: Ray restarts the
    process and runs its calls in flight again (`max_task_retries`). `restarts` counts each
    one's restarts; past `max_restarts` the run stops with one line naming the actor."""
    silent = probe(actors, timeout_s)
    for name in silent:
        if restarts.get(name, 0) >= max_restarts:
            raise RuntimeFault(
                f"{name} did not answer within {timeout_s:.0f}s and was already restarted "
                f"{max_restarts} times (cluster.max_restarts)"
            )
        restarts[name] = restarts.get(name, 0) + 1
        ray.kill(actors[name], no_restart=False)
    return silent


def _where(what: str, who: str) -> str:
    return what if who == what else f"{what}: {who}"


def _actor_itself_died(exc: Exception) -> bool:
    """The actor that ran the call died (not: the call raised because an actor it waited
    on died, which Ray reports as a RayTaskError of the caller)."""
    return isinstance(exc, ray.exceptions.RayActorError) and not isinstance(
        exc, ray.exceptions.RayTaskError
    )


def _peer_lost(exc: Exception) -> bool:
    """A rank's call failed inside a collective because a peer rank is gone: gloo's TCP pair
    to it closed or reset, or NCCL's DistBackendError. Seen before Ray reports that peer dead
    (a lost node is noticed by missed health checks, seconds later)."""
    if not isinstance(exc, ray.exceptions.RayTaskError):
        return False
    from torch.distributed import DistBackendError

    cause = exc.cause
    return isinstance(cause, DistBackendError) or "gloo/transport" in str(cause)


def _out_of_memory(exc: Exception) -> bool:
    """Torch's allocator, Python's MemoryError, or Ray's memory monitor killing a worker."""
    if isinstance(exc, ray.exceptions.OutOfMemoryError):
        return True
    cause = getattr(exc, "cause", None)
    if isinstance(cause, MemoryError):
        return True
    text = str(cause if cause is not None else exc).lower()
    return "can't allocate memory" in text or "out of memory" in text


def _reason(exc: Exception) -> str:
    if _out_of_memory(exc):
        where = getattr(exc, "function_name", None) or "a worker"
        return f"out of memory in {where}; {OUT_OF_MEMORY_HINT}"
    if isinstance(exc, ray.exceptions.ActorDiedError | ray.exceptions.RayActorError):
        return "an actor died (" + str(exc).strip().splitlines()[0][:160] + ")"
    cause = getattr(exc, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1][:160]}"
    return str(exc).strip().splitlines()[-1][:160]


def finish_tracking(tracker: Any, status: str) -> None:
    """Mark the MLflow run `status`. When the run failed (FAILED: its error is on its way
    out), a tracking store that fails too is one line on stderr and never replaces that
    error; otherwise the store's error is the run's."""
    try:
        tracker.finish(status)
    except Exception as exc:
        if status != "FAILED":
            raise
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        print(
            f"raydistill: MLflow could not mark the run FAILED ({type(exc).__name__}: {first})",
            file=sys.stderr,
            flush=True,
        )
