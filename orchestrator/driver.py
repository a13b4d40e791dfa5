"""The driver: one controller that holds ObjectRefs, never teacher tensors. It checks and
starts what a run needs (Ray, MLflow, teachers, data, students), hands them to the training
loop (`orchestrator/train_loop.py`) and tears everything down, whatever happens."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import ray
from transformers import AutoTokenizer

from actors.model_store import local_model
from actors.models import vocab_size_of
from orchestrator.checkpoint import (
    prune_uncommitted,
    read_ledger,
    verify_checkpoint,
    write_json,
)
from orchestrator.data import Dataset, file_dataset, synthetic_dataset, writer_key
from orchestrator.faults import RuntimeFault, finish_tracking
from orchestrator.identity import check_identity, run_identity
from orchestrator.offline import CachedTeacherPool, cached_teachers
from orchestrator.placement import check_reachable, check_resources, record
from orchestrator.ray_env import ensure_ray
from orchestrator.recipe import Recipe, RecipeError, TeacherConfig, to_yaml
from orchestrator.students import StudentGroup
from orchestrator.teachers import TeacherPool
from orchestrator.tracking import Tracker, default_tracking_uri, flatten, prepare_store
from orchestrator.train_loop import RunResult, TrainLoop


def loop_class(mode: str) -> type[TrainLoop]:
    """Each mode is its own module; the driver only picks one."""
    if mode == "on_policy":
        from orchestrator.on_policy import OnPolicyLoop

        return OnPolicyLoop
    if mode == "mutual":
        from orchestrator.mutual import MutualLoop

        return MutualLoop
    if mode == "rlaif":
        from orchestrator.rlaif import RlaifLoop

        return RlaifLoop
    return TrainLoop


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
    except RecipeError:
        if started_ray:
            ray.shutdown()
        raise
    store = prepare_store(tracking_uri(recipe))
    pools: list[Any] = []
    tracker: Tracker | None = None
    students: StudentGroup | None = None
    loop: TrainLoop | None = None
    status = "FAILED"
    try:
        cached = {t.name: CachedTeacherPool(recipe, t) for t in cached_teachers(recipe)}
        for t in recipe.teachers:  # one by one: a failure leaves the started ones to kill
            pools.append(cached.get(t.name) or live_pool(recipe, t))
        mode = loop_class(recipe.distill.mode)
        # the ranks start (imports, engine setup) while the teachers load
        students = StudentGroup(recipe, spec=mode.student_spec(recipe))
        infos = [p.info() for p in pools]
        identity = run_identity(recipe, infos)
        if ledger is not None and ledger.get("identity"):  # older ledgers have none
            check_identity(ledger["identity"], identity)
        dataset = build_dataset(recipe, pools)
        for pool in cached.values():  # refused before anything of the run starts
            pool.check(dataset)
            pool.start()
        if store is not None:
            store.join()
        tracker = open_tracker(recipe, run_dir, parent)
        if ledger is None:
            tracker.log_params(flatten(recipe.model_dump(mode="json", by_alias=True)))
            tracker.log_artifact(run_dir / "recipe.yaml")
        tracker.log_params(
            {f"teacher.{i['name']}.{k}": str(v) for i in infos for k, v in i.items()}
        )
        end = None if stop_after is None else _step(ledger) + stop_after
        restores = 0
        while True:
            students = (students or StudentGroup(recipe, spec=mode.student_spec(recipe))).ready()
            record(run_dir, pools, students)
            tracker.log_params({"student.num_params": str(students.num_params)})
            loop = mode(recipe, run_dir, pools, students, dataset, tracker, identity)
            try:
                result = loop.run(ledger, None if end is None else end - _step(ledger))
                break
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
                tracker.discard()  # rows of the steps about to be trained again
                tracker.set_tags({"student_restores": str(restores)})
                loop.shutdown()
                students.shutdown(graceful=False)
                loop = students = None
                prune_uncommitted(run_dir)
        status = "FINISHED" if result.finished else "KILLED"  # KILLED: stopped, resumable
        return result
    finally:
        if loop is not None:
            loop.shutdown()
        if students is not None:
            students.shutdown(graceful=status != "FAILED")
        for pool in pools:
            pool.shutdown()
        if started_ray:
            ray.shutdown()
        if tracker is not None:  # last: a store that fails leaves no actor behind
            finish_tracking(tracker, status)


def live_pool(recipe: Recipe, cfg: TeacherConfig) -> TeacherPool:
    return TeacherPool(
        cfg,
        recipe.distill,
        teacher_max_len(recipe),
        student_tokenizer=recipe.student.model,
        cluster=recipe.cluster,
    )


def open_tracker(recipe: Recipe, run_dir: Path, parent: str | None = None) -> Tracker:
    """The run's MLflow run (the one it had, on a resume), opened once the run is sure to
    start: a refused run leaves no MLflow run behind."""
    state_path = run_dir / "state.json"
    state = _read_json(state_path)
    uri = tracking_uri(recipe)
    artifacts = Path(recipe.run.output_dir).resolve() / "mlartifacts"
    name = run_dir.name if parent is None else f"{run_dir.parent.parent.name}/{run_dir.name}"
    exp = recipe.tracking.experiment
    tracker = Tracker(uri, exp, artifacts, name, state.get("run_id"), parent_run_id=parent)
    write_json(state_path, {**state, "run_id": tracker.run_id, "tracking_uri": uri})
    return tracker


def tracking_uri(recipe: Recipe) -> str:
    return recipe.tracking.uri or default_tracking_uri(recipe.run.output_dir)


def _step(ledger: dict[str, Any] | None) -> int:
    return int(ledger["step"]) if ledger is not None else 0


def teacher_max_len(recipe: Recipe) -> int:
    """The longest sequence a vLLM teacher is asked to hold: a rendered prompt plus what it
    writes, or a training row plus a rollout."""
    data = recipe.data
    longest = data.seq_len + max(data.generation.max_new_tokens, recipe.rollout.max_new_tokens)
    return max(2048, longest)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def build_dataset(recipe: Recipe, pools: list[TeacherPool]) -> Dataset:
    data = recipe.data
    student_path = local_model(recipe.student.model)
    if data.source == "synthetic":
        vocab = pools[0].info()["vocab_size"] if pools else vocab_size_of(student_path)
        return synthetic_dataset(data, vocab, recipe.run.seed)
    tokenizer = AutoTokenizer.from_pretrained(student_path)
    writer = pools[0] if pools else None
    gen = data.generation
    written = [0]

    def generate(prompts: list[str]) -> list[dict[str, str]]:
        start = time.monotonic()

        def on_chunk(n: int) -> None:
            written[0] += n
            rate = written[0] / max(time.monotonic() - start, 1e-9)
            eta = (len(prompts) - written[0]) / max(rate, 1e-9)
            print(
                f"teacher {writer.name} writing responses: {written[0]}/{len(prompts)} "
                f"({rate:.1f}/s, eta {eta:.0f}s)",
                flush=True,
            )

        sampling = gen.model_dump(exclude={"batch_size"})
        return writer.generate(prompts, sampling, gen.batch_size, on_chunk)

    cache_dir = Path(recipe.run.output_dir).resolve() / "cache"
    key = None
    if data.responses == "teacher":  # responses are reused only from the same writer
        info = writer.info()
        try:  # the template the teacher renders its prompts with (read here, no actor call)
            template = AutoTokenizer.from_pretrained(local_model(writer.cfg.model)).chat_template
        except (OSError, ValueError):
            template = None
        key = writer_key(info["model_hash"], info["tokenizer_hash"], template)
    d = recipe.distill
    route = (d.teacher_key, [t.name for t in recipe.teachers]) if d.teacher_key else None
    return file_dataset(data, tokenizer, recipe.run.seed, generate, cache_dir, key, route)
