"""One writer per run directory: a second `raydistill resume` of a run another process holds
is refused in one line naming the holder's pid; the lock goes with its holder, however it
ends."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import base_recipe, write_recipe

from orchestrator import run_lock
from orchestrator.recipe import RecipeError

_HOLDER = """
import sys
from pathlib import Path
from orchestrator import run_lock
with run_lock.hold(Path(sys.argv[1]), "run directory"):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin (or kills us)
"""


def hold_in_another_process(folder: Path) -> subprocess.Popen:
    """A process that holds `folder`'s lock until its stdin closes."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def raydistill(*args: str) -> subprocess.CompletedProcess:
    cli = Path(sys.executable).parent / "raydistill"
    return subprocess.run([str(cli), *args], capture_output=True, text=True, timeout=300)


def in_process(*args: str) -> subprocess.CompletedProcess:
    """`raydistill ARGS` as `main` in this process (no second interpreter to start)."""
    from orchestrator.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def refused_while_held(folder: Path, *args: str, cli: bool = True) -> tuple[str, int]:
    """`raydistill ARGS` (its own process, or `main` here) while another process holds
    `folder`'s lock: exit 2 and one line; returns (that line, the holder's pid)."""
    holder = hold_in_another_process(folder)
    try:
        done = raydistill(*args) if cli else in_process(*args)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip().splitlines()
    assert len(err) == 1, err
    return err[0], holder.pid


def test_a_second_resume_of_a_held_run_is_refused_naming_the_holder(tmp_path, tiny_models):
    run_dir = tmp_path / "runs" / "t-1"
    run_dir.mkdir(parents=True)
    write_recipe(run_dir, base_recipe(tmp_path, tiny_models))
    line, pid = refused_while_held(run_dir, "resume", str(run_dir))
    assert f"this run directory is in use by another raydistill process (pid {pid})" in line
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "recipe.yaml"]
    # the holder is gone: the lock is free again, and resume gets to its own checks
    done = in_process("resume", str(run_dir))
    assert done.returncode == 2 and "has no checkpoint to resume from" in done.stderr


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = hold_in_another_process(tmp_path)
    with pytest.raises(RecipeError, match=rf"pid {holder.pid}\)"):
        with run_lock.hold(tmp_path, "run directory"):
            pass
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=60)
    with run_lock.hold(tmp_path, "run directory"):
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
