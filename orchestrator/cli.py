"""`raydistill` command line: run, resume, submit, cache build/verify, eval, models fetch.

Problems with the user's input print one line naming what is wrong and exit with code 2.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from orchestrator import run_lock
from orchestrator.faults import RAY_CAPACITY_ERRORS, RuntimeFault, capacity_fault
from orchestrator.recipe import RecipeError

EXIT_USAGE = 2  # a runtime fault's code is its own (`RuntimeFault.exit_code`)


def _takes_recipe(command: argparse.ArgumentParser) -> None:
    command.add_argument("recipe")
    command.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raydistill", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a recipe")
    run.add_argument("recipe")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200")
    run.add_argument("--stop-after", type=int, help="checkpoint and stop after N steps")
    run.add_argument(
        "--run-dir",
        help="a fixed run directory: continue the run in it, exit 0 if it finished, "
        "else start the run there (a re-created cluster job picks up where it stopped)",
    )
    resume = sub.add_parser("resume", help="continue a stopped run from its last checkpoint")
    resume.add_argument("run_dir")
    resume.add_argument("--stop-after", type=int, help="checkpoint and stop after N steps")
    sub_job = sub.add_parser("submit", help="run a recipe as a Ray job (Jobs API)")
    sub_job.add_argument("recipe", nargs="?")
    sub_job.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200")
    sub_job.add_argument("--address", required=True, help="the Jobs API, http://HEAD:8265")
    sub_job.add_argument("--stop", metavar="JOB", help="stop this job instead")
    sub_job.add_argument("--no-follow", action="store_true", help="do not follow the logs")
    cache = sub.add_parser("cache", help="offline teacher signals")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    _takes_recipe(cache_sub.add_parser("build", help="run the cached teachers over the data"))
    check = cache_sub.add_parser("verify", help="check every shard's checksum")
    check.add_argument("path")
    judge = sub.add_parser("judge", help="judges of the student's samples")
    judge_sub = judge.add_subparsers(dest="judge_command", required=True)
    _takes_recipe(judge_sub.add_parser("check", help="can each judge tell answers apart?"))
    ev = sub.add_parser("eval", help="a student against a teacher on held-out rows")
    ev.add_argument("student", help="the student's model folder, or a run directory")
    ev.add_argument("--teacher", required=True, help="model folder, known name or hub name")
    ev.add_argument("--data", required=True, help="a .jsonl or .parquet data file")
    ev.add_argument("--out", help="the JSON file (default: eval.json in the run or student)")
    for flag, fallback in (("heldout", "16; 0: all rows"), ("split-seed", 0), ("top-k", 64)):
        ev.add_argument(f"--{flag}", type=int, help=f"default: the run's, else {fallback}")
    ev.add_argument("--seq-len", type=int, help="default: the run's, else 256")
    ev.add_argument("--temperature", type=float, help="of both KLs; default: the run's, or 1")
    ev.add_argument("--max-new-tokens", type=int, default=64, help="greedy answers; 0: none")
    ev.add_argument("--tracking-uri", help="MLflow store (default: the run's, or ./runs)")
    models = sub.add_parser("models", help="local model cache")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    fetch = models_sub.add_parser("fetch", help="download and convert a known small model")
    fetch.add_argument("name")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)  # overrides may follow an option
    if extra and (args.command not in ("run", "submit") or not all("=" in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        if args.command == "run":
            return _run(args.recipe, args.overrides, args.stop_after, args.run_dir)
        if args.command == "resume":
            return _resume(args.run_dir, args.stop_after)
        if args.command == "submit":
            from orchestrator import submit

            if args.stop:
                return submit.stop(args.stop, args.address)
            if not args.recipe:
                raise RecipeError("submit", "give a RECIPE, or --stop JOB")
            return submit.submit(args.recipe, args.overrides, args.address, not args.no_follow)
        if args.command == "cache":
            from orchestrator import offline

            if args.cache_command == "verify":
                return offline.verify_cache(args.path)
            from orchestrator.preflight import preflight
            from orchestrator.recipe import load_recipe

            return offline.build_command(preflight(load_recipe(args.recipe, args.overrides)))
        if args.command == "judge":
            from orchestrator.check_judges import check_command
            from orchestrator.preflight import preflight
            from orchestrator.recipe import load_recipe

            return check_command(preflight(load_recipe(args.recipe, args.overrides)))
        if args.command == "eval":
            from orchestrator.evaluate import EvalRequest, evaluate_command

            fields = {k: v for k, v in vars(args).items() if k not in ("command", "debug")}
            return evaluate_command(EvalRequest(**fields))
        return _fetch(args.name)
    except RecipeError as exc:
        if args.debug:
            raise
        print(f"raydistill: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (RuntimeFault, *RAY_CAPACITY_ERRORS) as exc:
        if args.debug:
            raise
        fault = exc if isinstance(exc, RuntimeFault) else capacity_fault(exc)
        print(f"raydistill: run stopped: {fault}", file=sys.stderr)
        return fault.exit_code


def _run(
    recipe_path: str, overrides: list[str], stop_after: int | None, run_dir_arg: str | None = None
) -> int:
    from orchestrator.driver import new_run_dir
    from orchestrator.preflight import preflight
    from orchestrator.recipe import load_recipe

    found = _found_run(Path(run_dir_arg)) if run_dir_arg is not None else None
    if found == "finished":  # a re-created job whose run had ended: nothing to do, no failure
        print(
            f"run directory {run_dir_arg}: this run already finished; nothing to do "
            "(a new run needs another --run-dir)",
            flush=True,
        )
        return 0
    recipe = preflight(load_recipe(recipe_path, overrides))
    if found == "unfinished":
        _same_recipe(recipe, Path(run_dir_arg))
        print(f"run directory {run_dir_arg}: continuing its run", flush=True)
        return _resume(run_dir_arg, stop_after)
    run_dir = new_run_dir(recipe, run_dir_arg)
    print(f"run directory: {run_dir}", flush=True)
    with run_lock.hold(run_dir, "run directory"):
        return _execute(recipe, run_dir, stop_after)


def _found_run(run_dir: Path) -> str | None:
    """What `run --run-dir` finds in the folder: "finished", "unfinished" (a checkpoint or a
    finished stage to continue from), or None (absent, empty, or a run that wrote nothing
    worth keeping yet: the run starts there). A folder of something else is refused."""
    from orchestrator.checkpoint import read_ledger

    if not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())):
        return None
    if not (run_dir / "recipe.yaml").is_file():
        raise RecipeError("--run-dir", f"{run_dir} is not empty and holds no run (no recipe.yaml)")
    if (run_dir / "summary.json").exists():
        return "finished"
    staged = (run_dir / "stages.json").exists() or (run_dir / "stages").is_dir()
    return "unfinished" if staged or read_ledger(run_dir) is not None else None


def _same_recipe(recipe: Any, run_dir: Path) -> None:
    """The run in `run_dir` continues only under the recipe it started with."""
    from orchestrator.identity import recipe_hash
    from orchestrator.recipe import load_recipe

    if recipe_hash(recipe) != recipe_hash(load_recipe(run_dir / "recipe.yaml")):
        raise RecipeError(
            "--run-dir",
            f"{run_dir} holds an unfinished run of another recipe: continue it with "
            f"`raydistill resume {run_dir}`, or give another --run-dir",
        )


def _resume(run_dir_arg: str, stop_after: int | None) -> int:
    """Refuses (exit 2, run dir kept) when the recipe, data file or student tokenizer changed
    since the run started, before any actor starts; teachers are checked once they are up.
    Refused (exit 2) while another process holds the run directory (see `run_lock`)."""
    run_dir = Path(run_dir_arg).resolve()
    if not (run_dir / "recipe.yaml").is_file():
        raise RecipeError(run_dir_arg, "not a run directory (no recipe.yaml)")
    with run_lock.hold(run_dir, "run directory"):  # one writer: a second resume is refused
        return _resume_held(run_dir_arg, run_dir, stop_after)


def _resume_held(run_dir_arg: str, run_dir: Path, stop_after: int | None) -> int:
    """`_resume` once this process holds the run directory's lock."""
    from orchestrator.checkpoint import read_ledger
    from orchestrator.identity import check_identity, driver_side_identity
    from orchestrator.preflight import preflight
    from orchestrator.recipe import load_recipe

    if (run_dir / "stages.json").exists() or (run_dir / "stages").is_dir():
        if (run_dir / "summary.json").exists():
            raise RecipeError(run_dir_arg, "this run already finished")
        return _execute(preflight(load_recipe(run_dir / "recipe.yaml")), run_dir, stop_after)
    ledger = read_ledger(run_dir)
    if ledger is None:
        raise RecipeError(run_dir_arg, "has no checkpoint to resume from")
    if (run_dir / "summary.json").exists():
        raise RecipeError(run_dir_arg, "this run already finished")
    recipe = preflight(load_recipe(run_dir / "recipe.yaml"))
    if ledger.get("identity"):
        check_identity(ledger["identity"], driver_side_identity(recipe))
    else:
        print(
            "resume: this run's checkpoint records no identity (an older run); not checking "
            "that its recipe, data and models are unchanged",
            flush=True,
        )
    return _execute(recipe, run_dir, stop_after)


def _execute(recipe: Any, run_dir: Path, stop_after: int | None) -> int:
    from mlflow.exceptions import MlflowException

    from orchestrator.checkpoint import read_ledger
    from orchestrator.credentials import redact
    from orchestrator.driver import execute

    def kept() -> bool:  # anything worth resuming: a checkpoint, or a finished stage
        return read_ledger(run_dir) is not None or (run_dir / "stages").is_dir()

    try:
        if recipe.stages:
            from orchestrator.offline import build_command
            from orchestrator.stages import run_stages

            result = run_stages(recipe, run_dir, stop_after, execute, build_command)
        else:
            result = execute(recipe, run_dir, stop_after=stop_after)
    except RecipeError:
        if not kept():  # nothing worth keeping was written yet
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    except (RuntimeFault, MlflowException, *RAY_CAPACITY_ERRORS) as exc:
        if isinstance(exc, MlflowException):  # the ledger is written before MLflow's rows
            fault = RuntimeFault(f"the MLflow store failed: {redact(exc.message)}")
        else:
            fault = exc if isinstance(exc, RuntimeFault) else capacity_fault(exc)
        hint = f"continue with: raydistill resume {run_dir}"
        if not kept():
            hint = f"no checkpoint was written yet ({run_dir})"
        told = RuntimeFault(f"{fault}; {hint}")
        told.exit_code = fault.exit_code  # out of memory: exit 2, the recipe must change
        raise told from exc
    if result.finished and recipe.stages:
        for name, figures in result.summary["stages"].items():
            if "eval_after" in figures:
                before, after = figures["eval_before"]["kl"], figures["eval_after"]["kl"]
                print(f"stage {name}: held-out KL {before:.4f} -> {after:.4f}")
            else:
                print(f"stage {name}: " + ", ".join(f"{k} {v:g}" for k, v in figures.items()))
        print(f"run directory: {run_dir}")
    elif result.finished:
        print(summary_table(result.summary, run_dir))
    else:
        print(f"stopped at step {result.steps_done}; continue with: raydistill resume {run_dir}")
    return 0


def _fetch(name: str) -> int:
    from actors.model_store import KNOWN_MODELS, fetch_model

    if name not in KNOWN_MODELS:
        raise RecipeError(name, f"unknown model; known: {', '.join(sorted(KNOWN_MODELS))}")
    print(fetch_model(name))
    return 0


def summary_table(s: dict[str, Any], run_dir: Path) -> str:
    from orchestrator.tracking import redact

    before, after = s["eval_before"], s["eval_after"]
    teachers = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in s["teacher_params"].items())
    rows = [
        ("teacher params", teachers or "none"),
        ("student params", f"{s['student_params'] / 1e6:.1f}M"),
    ]
    if "kl" in before:  # no teacher (mutual), no KL to one
        rows.append(("held-out KL(teacher||student)", f"{before['kl']:.4f} -> {after['kl']:.4f}"))
    rows += [
        ("held-out perplexity", f"{before['ppl']:.2f} -> {after['ppl']:.2f}"),
        ("train tokens/s", f"{s['tokens_per_s']:.0f}"),
        ("MLflow", f"{redact(s['tracking_uri'])} (run {s['mlflow_run_id']})"),
        ("student", s["student_dir"]),
        ("run directory", str(run_dir)),
    ]
    width = max(len(k) for k, _ in rows)
    lines = ["", "summary", "-" * (width + 40)]
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
