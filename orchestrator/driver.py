"""The driver: one controller that holds ObjectRefs, never teacher tensors. It checks and
starts what a run needs (Ray, MLflow, teachers, data, students), hands them to the training
loop (`orchestrator/train_loop.py`) and tears everything down, whatever happens."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import ray

from orchestrator import logit_kd, mutual, rlaif, student_init, warm
from orchestrator.cached_teachers import (
    CachedTeacherPool,
    CacheThenLive,
    cached_teachers,
    teacher_warm_keys,
)
from orchestrator.checkpoint import (
    prune_uncommitted,
    read_ledger,
    verify_checkpoint,
)
from orchestrator.data import Dataset, build_dataset
from orchestrator.faults import RuntimeFault, finish_tracking
from orchestrator.identity import check_identity, run_identity
from orchestrator.parts import Mode, RunResult
from orchestrator.placement import check_reachable, check_resources, record
from orchestrator.ray_env import ensure_ray
from orchestrator.recipe import Recipe, RecipeError, to_yaml
from orchestrator.run_tracker import open_tracker, tracking_uri
from orchestrator.students import StudentGroup
from orchestrator.teachers import live_pool
from orchestrator.tracking import Tracker, flatten, prepare_store
from orchestrator.train_loop import TrainLoop

# every mode by name: a short assembly of parts in its own module
MODES = {m.name: m for m in (*logit_kd.MODES, mutual.MODE, rlaif.MODE)}


def new_run_dir(recipe: Recipe, at: str | Path | None = None) -> Path:
    """Created only after the recipe passed every check, so bad input leaves nothing.
    `at`: a fixed folder (`raydistill run --run-dir`) instead of a time-stamped one."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    run_dir = Path(recipe.run.output_dir).resolve() / f"{recipe.run.name}-{stamp}"
    if at is not None:
        run_dir = Path(at).resolve()
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=at is not None)
    (run_dir / "recipe.yaml").write_text(to_yaml(recipe))
    return run_dir


@dataclass
class _Parts:
    """What a run has started, torn down whatever happens."""

    pools: list[Any] = field(default_factory=list)
    students: StudentGroup | None = None
    loop: TrainLoop | None = None
    tracker: Tracker | None = None

    def shutdown(self, status: str, keep: bool) -> None:
        """`keep`: park the teachers and students for the next run in this Ray
        (orchestrator/warm.py), unless the run failed."""
        keep = keep and status != "FAILED"
        if self.loop is not None:
            self.loop.shutdown(keep)
        if self.students is not None:
            self.students.shutdown(graceful=status != "FAILED", keep=keep)
        for pool in self.pools:
            pool.shutdown(keep=keep)


def execute(
    recipe: Recipe, run_dir: Path, *, stop_after: int | None = None, parent: str | None = None
) -> RunResult:
    """Run (or continue, if the run dir has a checkpoint) the job described by `recipe`;
    `parent`: the MLflow run of the staged run this is a stage of."""
    started_ray = ensure_ray(recipe.cluster)
    try:
        check_resources(recipe)
        check_reachable(run_dir)
        prune_uncommitted(run_dir)  # folders a crash left before their ledger entry
        ledger = read_ledger(run_dir)
        if ledger is not None:  # before any actor starts, and before DeepSpeed unpickles
            verify_checkpoint(run_dir, ledger)
        # the layers the student keeps, once: chosen now, or the ones the run started with
        student_init.resolve_layers(recipe, run_dir, resumed=ledger is not None)
    except RecipeError:
        if started_ray:
            ray.shutdown()
        raise
    store = prepare_store(tracking_uri(recipe))
    parts = _Parts()
    status = "FAILED"
    try:
        mode, dataset, identity = _start(recipe, run_dir, parts, ledger, parent, store)
        end = None if stop_after is None else _step(ledger) + stop_after
        result = _train(recipe, run_dir, parts, mode, dataset, identity, ledger, end)
        status = "FINISHED" if result.finished else "KILLED"  # KILLED: stopped, resumable
        return result
    finally:
        parts.shutdown(status, keep=not started_ray)
        if started_ray:
            ray.shutdown()
        if parts.tracker is not None:  # last: a store that fails leaves no actor behind
            finish_tracking(parts.tracker, status)


def _start(
    recipe: Recipe,
    run_dir: Path,
    parts: _Parts,
    ledger: dict[str, Any] | None,
    parent: str | None,
    store: Any,
) -> tuple[Mode, Dataset, dict[str, Any]]:
    """Teachers, students, data and the MLflow run; (mode, dataset, identity)."""
    mode = MODES[recipe.distill.mode]
    if warm.parked():  # kept: what this run will take
        warm.release(keep={*teacher_warm_keys(recipe), *mode.warm_keys(recipe)})
    cached = {t.name: CachedTeacherPool(recipe, t) for t in cached_teachers(recipe)}
    for t in recipe.teachers:  # one by one: a failure leaves the started ones to kill
        pool = cached.get(t.name)
        if pool is None:
            pool = live_pool(recipe, t)
        elif recipe.runs_live(t):  # a cached one that scores the student's samples live
            pool = CacheThenLive(pool, live_pool(recipe, t))
        parts.pools.append(pool)
    # the ranks start (imports, engine setup) while the teachers load
    parts.students = StudentGroup(recipe, spec=mode.student_spec(recipe))
    infos = [p.info() for p in parts.pools]
    identity = run_identity(recipe, infos)
    if ledger is not None and ledger.get("identity"):  # older ledgers have none
        check_identity(ledger["identity"], identity)
    dataset = build_dataset(recipe, parts.pools)
    for pool in cached.values():  # refused before anything of the run starts
        pool.check(dataset)
        pool.start()
    if store is not None:
        store.join()
    tracker = parts.tracker = open_tracker(recipe, run_dir, parent)
    if ledger is None:  # init's own `layers` (null unless given): the resolved ones
        params = flatten(recipe.model_dump(mode="json", by_alias=True))
        tracker.log_params({**params, **student_init.tracking_params(run_dir)})
        tracker.log_artifact(run_dir / "recipe.yaml")
        if (run_dir / student_init.FILE).is_file():
            tracker.log_artifact(run_dir / student_init.FILE)
    tracker.log_params({f"teacher.{i['name']}.{k}": str(v) for i in infos for k, v in i.items()})
    return mode, dataset, identity


def _train(
    recipe: Recipe,
    run_dir: Path,
    parts: _Parts,
    mode: Mode,
    dataset: Dataset,
    identity: dict[str, Any],
    ledger: dict[str, Any] | None,
    end: int | None,
) -> RunResult:
    """The loop until it finishes or stops at step `end`; a lost student group is brought
    back from the last checkpoint (cluster.max_student_restores times)."""
    assert parts.tracker is not None
    restores = 0
    while True:
        if parts.students is None:
            parts.students = StudentGroup(recipe, spec=mode.student_spec(recipe))
        parts.students.ready()
        record(run_dir, parts.pools, parts.students)
        parts.tracker.log_params({"student.num_params": str(parts.students.num_params)})
        assembly = mode.assemble(recipe, parts.pools, parts.students, dataset)
        parts.loop = TrainLoop(
            recipe, run_dir, parts.pools, parts.students, dataset, parts.tracker, identity, assembly
        )
        warm.release()  # all taken: what is left (a twin of a taken one) holds resources
        try:
            return parts.loop.run(ledger, None if end is None else end - _step(ledger))
        except RuntimeFault as exc:
            ledger = read_ledger(run_dir)
            if not exc.student_lost or ledger is None:
                raise
            verify_checkpoint(run_dir, ledger)
            if restores >= recipe.cluster.max_student_restores:
                raise RuntimeFault(f"{exc} (after {restores} restores)") from exc
            restores += 1
            print(
                f"{exc}; bringing the student group back from the checkpoint at step "
                f"{ledger['step']} ({restores}/{recipe.cluster.max_student_restores})",
                flush=True,
            )
            parts.tracker.discard()  # rows of the steps about to be trained again
            parts.tracker.set_tags({"student_restores": str(restores)})
            parts.loop.shutdown()
            parts.students.shutdown(graceful=False)
            parts.loop = parts.students = None
            prune_uncommitted(run_dir)


def _step(ledger: dict[str, Any] | None) -> int:
    return int(ledger["step"]) if ledger is not None else 0
