"""Checkpoints that cannot eat themselves: retention keeps committed tags only, the ledger
is written durably and atomically, a crash between shards and ledger loses nothing, and a
resume refuses when what the run is made of has changed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import base_recipe, write_recipe
from mlflow.tracking import MlflowClient

from actors.durable import sha256_file
from orchestrator import checkpoint
from orchestrator.checkpoint import (
    commit_checkpoint,
    fsync_tree,
    prune_uncommitted,
    read_ledger,
    tag_for,
    verify_checkpoint,
    write_json,
)
from orchestrator.identity import check_identity, driver_side_identity, run_identity
from orchestrator.recipe import Recipe, RecipeError

REPO = Path(__file__).resolve().parents[2]


def _save(run_dir: Path, step: int) -> Path:
    """What the ranks leave for one tag: a folder of shard files."""
    tag = run_dir / "checkpoints" / tag_for(step)
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"weights %d" % step)
    (tag / "zero").mkdir()
    (tag / "zero" / "optim_states.pt").write_bytes(b"optim %d" % step)
    return tag


def _tags(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())


def _hashes(run_dir: Path, step: int) -> dict[str, str]:
    """What the ranks return from their saves: each file they wrote and its sha256."""
    folder = run_dir / "checkpoints" / tag_for(step)
    return {str(p): sha256_file(p) for p in folder.rglob("*") if p.is_file()}


def _commit(run_dir: Path, step: int, keep: int, extra: dict | None = None, **kw) -> None:
    commit_checkpoint(run_dir, step, extra or {}, keep, _hashes(run_dir, step), **kw)


def test_retention_keeps_the_committed_tag_despite_a_newer_stray(tmp_path):
    _save(tmp_path, 4)
    _commit(tmp_path, 4, keep=1)
    _save(tmp_path, 8)  # a crash before step 8's ledger entry
    _save(tmp_path, 6)  # the resumed run stops early at step 6
    _commit(tmp_path, 6, keep=1)
    ledger = read_ledger(tmp_path)
    assert ledger["step"] == 6 and ledger["committed"] == [tag_for(6)]
    assert _tags(tmp_path) == [tag_for(6), tag_for(8)]  # a commit deletes older tags only
    assert prune_uncommitted(tmp_path) == [tag_for(8)]  # the stray goes on start-up/resume
    assert _tags(tmp_path) == [tag_for(6)]


def test_commit_leaves_the_next_checkpoint_alone_while_it_is_written(tmp_path):
    """checkpoint.every 1: the ranks already write step 6 while the driver commits step 5
    (keep 1). The half-written newer folder survives the commit and becomes step 6."""
    _save(tmp_path, 4)
    _commit(tmp_path, 4, keep=1)
    _save(tmp_path, 5)
    nxt = tmp_path / "checkpoints" / tag_for(6)
    nxt.mkdir()
    with open(nxt / "mp_rank_00_model_states.pt", "wb") as shard:  # held open, half written
        shard.write(b"weights ")
        shard.flush()
        _commit(tmp_path, 5, keep=1)
        assert (nxt / "mp_rank_00_model_states.pt").is_file(), "the next checkpoint was deleted"
        shard.write(b"6")
    (nxt / "zero").mkdir()
    (nxt / "zero" / "optim_states.pt").write_bytes(b"optim 6")
    assert _tags(tmp_path) == [tag_for(5), tag_for(6)]  # step 4 retired, 6 kept
    _commit(tmp_path, 6, keep=1)
    assert read_ledger(tmp_path)["committed"] == [tag_for(6)]
    assert _tags(tmp_path) == [tag_for(6)]
    assert (nxt / "mp_rank_00_model_states.pt").read_bytes() == b"weights 6"
    verify_checkpoint(tmp_path, read_ledger(tmp_path))


def test_ledger_records_every_file_hash_and_the_rows(tmp_path):
    _save(tmp_path, 4)
    rows = [["loss", 1.5, 1000, 3], ["loss", 1.25, 1001, 4]]
    _commit(tmp_path, 4, keep=2, rows=rows)
    _save(tmp_path, 8)
    _commit(tmp_path, 8, keep=2, rows=[])
    ledger = read_ledger(tmp_path)
    files = ledger["files"]
    assert set(files) == {tag_for(4), tag_for(8)}
    four = tmp_path / "checkpoints" / tag_for(4)
    assert set(files[tag_for(4)]) == {
        "mp_rank_00_model_states.pt",
        "zero/optim_states.pt",
        checkpoint.ROWS,
    }
    for name, digest in files[tag_for(4)].items():
        assert sha256_file(four / name) == digest
    assert checkpoint.checkpoint_rows(tmp_path, {**ledger, "tag": tag_for(4)}) == rows
    _save(tmp_path, 12)
    _commit(tmp_path, 12, keep=2)
    assert set(read_ledger(tmp_path)["files"]) == {tag_for(8), tag_for(12)}  # retired: gone


@pytest.mark.parametrize(
    ("damage", "named", "words"),
    [
        ("flip", "mp_rank_00_model_states.pt", "sha256 differs from the ledger"),
        ("delete", "zero/optim_states.pt", "missing; the ledger"),
        ("add", "evil.pt", "not in the ledger"),
    ],
)
def test_verify_refuses_a_checkpoint_that_changed(tmp_path, damage, named, words):
    _save(tmp_path, 4)
    _commit(tmp_path, 4, keep=1)
    ledger = read_ledger(tmp_path)
    verify_checkpoint(tmp_path, ledger)
    path = tmp_path / "checkpoints" / tag_for(4) / named
    if damage == "flip":
        data = bytearray(path.read_bytes())
        data[3] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "delete":
        path.unlink()
    else:
        path.write_bytes(b"cos\nsystem\n")
    with pytest.raises(RecipeError) as info:
        verify_checkpoint(tmp_path, ledger)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and words in message and "\n" not in message


def test_commit_refuses_a_file_no_rank_hashed(tmp_path):
    _save(tmp_path, 4)
    files = _hashes(tmp_path, 4)
    (tmp_path / "checkpoints" / tag_for(4) / "stray.pt").write_bytes(b"?")
    with pytest.raises(RuntimeError, match="no rank hashed stray.pt"):
        commit_checkpoint(tmp_path, 4, {}, 1, files)
    assert read_ledger(tmp_path) is None


def test_retention_keeps_the_newest_committed_tags(tmp_path):
    for step in (2, 4, 6):
        _save(tmp_path, step)
        _commit(tmp_path, step, keep=2, extra={"summary": {"x": step}})
    ledger = read_ledger(tmp_path)
    assert ledger["committed"] == [tag_for(4), tag_for(6)]
    assert ledger["summary"] == {"x": 6} and ledger["tag"] == tag_for(6)
    assert _tags(tmp_path) == [tag_for(4), tag_for(6)]


def test_prune_uncommitted_removes_only_what_the_ledger_does_not_name(tmp_path):
    for step in (4, 8):
        _save(tmp_path, step)
        _commit(tmp_path, step, keep=2)
    _save(tmp_path, 12)
    assert prune_uncommitted(tmp_path) == [tag_for(12)]
    assert _tags(tmp_path) == [tag_for(4), tag_for(8)]
    assert prune_uncommitted(tmp_path) == []


def test_prune_with_no_ledger_removes_every_tag(tmp_path):
    _save(tmp_path, 4)  # crashed before the first commit
    assert prune_uncommitted(tmp_path) == [tag_for(4)]
    assert _tags(tmp_path) == []


def test_prune_reads_ledgers_from_before_the_committed_list(tmp_path):
    for step in (4, 8, 12):
        _save(tmp_path, step)
    write_json(tmp_path / "checkpoints" / "latest.json", {"step": 8, "tag": tag_for(8)})
    assert prune_uncommitted(tmp_path) == [tag_for(12)]
    assert _tags(tmp_path) == [tag_for(4), tag_for(8)]


def test_commit_refuses_a_tag_that_was_not_written(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(RuntimeError, match="not written"):
        commit_checkpoint(tmp_path, 4, {}, 1, {})
    assert read_ledger(tmp_path) is None


def test_ledger_replace_is_atomic(tmp_path, monkeypatch):
    _save(tmp_path, 4)
    _commit(tmp_path, 4, keep=1)
    before = (tmp_path / "checkpoints" / "latest.json").read_text()

    def crash(src: object, dst: object) -> None:
        raise OSError("crash during replace")

    _save(tmp_path, 8)
    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with pytest.raises(OSError):
        _commit(tmp_path, 8, keep=1)
    monkeypatch.undo()
    assert (tmp_path / "checkpoints" / "latest.json").read_text() == before
    assert read_ledger(tmp_path)["step"] == 4
    assert tag_for(4) in _tags(tmp_path)  # nothing deleted before the ledger moved


def test_shards_are_fsynced_before_the_ledger_is_replaced(tmp_path, monkeypatch):
    """Every file and directory of the tag is flushed, then the ledger file, then the
    rename, then the checkpoints directory (so the rename itself is durable)."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    tag = _save(tmp_path, 4)
    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    _commit(tmp_path, 4, keep=1)
    monkeypatch.undo()
    ckpt = str((tmp_path / "checkpoints").resolve())
    i_replace = events.index(("replace", str(tmp_path / "checkpoints" / "latest.json")))
    synced_before = {path for kind, path in events[:i_replace] if kind == "fsync"}
    for path in (
        tag / "mp_rank_00_model_states.pt",
        tag / "zero" / "optim_states.pt",
        tag / "zero",
        tag,
        tmp_path / "checkpoints",
    ):
        assert str(path.resolve()) in synced_before, path
    assert str((tmp_path / "checkpoints" / "latest.json.tmp").resolve()) in synced_before
    assert ("fsync", ckpt) in events[i_replace + 1 :]


def test_fsync_tree_on_a_plain_folder(tmp_path):
    _save(tmp_path, 1)
    fsync_tree(tmp_path / "checkpoints")  # no error; every file readable afterwards


def test_fault_hook_kills_before_the_ledger(tmp_path):
    """The hook sits between 'shards are on disk' and 'ledger replaced'."""
    _save(tmp_path, 4)
    _commit(tmp_path, 4, keep=1)
    _save(tmp_path, 8)
    code = (
        "import sys, json; from pathlib import Path; from orchestrator.checkpoint import "
        "commit_checkpoint as c; c(Path(sys.argv[1]), 8, {}, 1, json.loads(sys.argv[2]))"
    )
    env = {**os.environ, "RAYDISTILL_FAULT": "kill_before_ledger:8"}
    files = json.dumps(_hashes(tmp_path, 8))
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path), files], env=env, cwd=REPO)
    assert proc.returncode == -9
    assert read_ledger(tmp_path)["step"] == 4
    assert _tags(tmp_path) == [tag_for(4), tag_for(8)]
    env["RAYDISTILL_FAULT"] = "kill_before_ledger:12"  # another step: no effect
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path), files], env=env, cwd=REPO)
    assert proc.returncode == 0 and read_ledger(tmp_path)["step"] == 8


# -- identity -----------------------------------------------------------------------------


def _ident(**over: object) -> dict:
    base = {
        "recipe": "a" * 64,
        "data": "b" * 64,
        "tokenizer": "none",
        "teachers": {"big": "c" * 16, "small": "d" * 16},
        "paths": {"data": "/d/data.jsonl", "tokenizer": "/m/s", "teacher big": "/m/big"},
    }
    return {**base, **over}


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"recipe": "e" * 64}, ["recipe hash changed (aaaaaaaa.. -> eeeeeeee..)", "recipe.yaml"]),
        (
            {"data": "e" * 64},
            ["data file hash changed (bbbbbbbb.. -> eeeeeeee..)", "/d/data.jsonl"],
        ),
        ({"tokenizer": "f" * 16}, ["student tokenizer hash changed (none -> ffffffff..)", "/m/s"]),
        ({"teachers": {"big": "e" * 16, "small": "d" * 16}}, ["teacher 'big' model", "/m/big"]),
        ({"teachers": {"big": "c" * 16}}, ["teachers changed (big, small -> big)"]),
    ],
)
def test_check_identity_names_what_changed(change, words):
    check_identity(_ident(), _ident())
    with pytest.raises(RecipeError) as info:
        check_identity(_ident(), _ident(**change))
    message = str(info.value)
    assert message.startswith("resume: ") and "\n" not in message
    for word in words:
        assert word in message


def test_check_identity_compares_only_parts_both_sides_have():
    driver_side = {k: v for k, v in _ident().items() if k != "teachers"}
    check_identity(_ident(teachers={"other": "x"}), driver_side)
    check_identity({"recipe": "a" * 64}, _ident(data="e" * 64))


def _recipe(tmp_path: Path, models: dict[str, str], **sections: object) -> Recipe:
    return Recipe.model_validate(base_recipe(tmp_path, models, **sections))


def test_driver_side_identity_hashes_recipe_data_and_tokenizer(tmp_path, tiny_models):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "one"}\n')
    recipe = _recipe(tmp_path, tiny_models, data={"source": "file", "path": str(data)})
    first = driver_side_identity(recipe)
    assert first["tokenizer"] == "none"  # tiny models have no tokenizer
    assert first["paths"]["data"] == str(data)
    assert driver_side_identity(recipe) == first
    data.write_text('{"text": "two"}\n')
    second = driver_side_identity(recipe)
    assert second["data"] != first["data"] and second["recipe"] == first["recipe"]
    with pytest.raises(RecipeError, match="data file hash changed"):
        check_identity(first, second)

    synthetic = driver_side_identity(_recipe(tmp_path, tiny_models))
    assert synthetic["data"] == "synthetic"
    hotter = _recipe(tmp_path, tiny_models, distill={"temperature": 2.0})
    assert driver_side_identity(hotter)["recipe"] != synthetic["recipe"]
    moved = _recipe(tmp_path, tiny_models, cluster={"address": "127.0.0.1:6380"})
    assert driver_side_identity(moved)["recipe"] == synthetic["recipe"]  # where, not what

    full = run_identity(hotter, [{"name": "tiny", "model_hash": "0123456789abcdef"}])
    assert full["teachers"] == {"tiny": "0123456789abcdef"}
    assert full["paths"]["teacher tiny"] == tiny_models["teacher"]


# -- the real crash -----------------------------------------------------------------------


def _wait_for_free_cpus(ray, want: float, timeout: float = 60.0) -> None:
    """The killed driver's actors are reclaimed by Ray (their owner died) shortly after;
    the ones this process parked after its own runs (orchestrator/warm.py) are let go."""
    from orchestrator import warm

    warm.release()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) >= want:
            return
        time.sleep(1)


def _cli(run_dir_or_recipe: Path, fault: str, *args: str) -> subprocess.CompletedProcess:
    """`raydistill ARGS` in its own process, SIGKILLed at the fault point `fault`."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RAYDISTILL_FAULT": fault}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args, str(run_dir_or_recipe)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _loss_steps(tmp_path: Path, run_dir: Path) -> list[int]:
    """Every row of `loss` in MLflow, duplicates included."""
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run_id = json.loads((run_dir / "state.json").read_text())["run_id"]
    return sorted(m.step for m in client.get_metric_history(run_id, "loss"))


@pytest.mark.slow
def test_kill_before_ledger_then_resume(ray_session, tiny_models, tmp_path, capsys):
    """A driver SIGKILLed between step 8's shards and its ledger entry: the ledger still
    says 4, and resuming (twice, the first stopping at 6 below the stray step 8) ends with
    step 12 committed alone. The second resume is SIGKILLed right after step 12's ledger,
    before MLflow has steps 9..12: the next resume logs them from the checkpoint. MLflow
    holds every step exactly once. A copy with one byte of a shard changed is refused
    before any of it is loaded."""
    from orchestrator.cli import main

    gcs = ray_session.get_runtime_context().gcs_address
    raw = base_recipe(
        tmp_path,
        tiny_models,
        student={"zero_stage": 2, "world_size": 2},
        train={"steps": 12},
        checkpoint={"every": 4, "keep": 1},
        cluster={"address": gcs},
    )
    path = write_recipe(tmp_path, raw)
    proc = _cli(path, "kill_before_ledger:8", "run")
    assert proc.returncode == -9, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("t-")]
    ledger = read_ledger(run_dir)
    assert ledger["step"] == 4 and ledger["committed"] == [tag_for(4)]
    assert _tags(run_dir) == [tag_for(4), tag_for(8)]  # step 8 on disk, uncommitted
    ident = ledger["identity"]
    assert ident["data"] == "synthetic" and ident["tokenizer"] == "none"
    assert set(ident["teachers"]) == {"tiny"}
    assert _loss_steps(tmp_path, run_dir) == [1, 2, 3, 4]  # 5..8 wait for their ledger

    # a copy whose recipe was edited is refused before any actor starts, and kept
    tampered = tmp_path / "tampered" / run_dir.name
    shutil.copytree(run_dir, tampered)
    recipe_file = tampered / "recipe.yaml"
    text = recipe_file.read_text()
    assert "  temperature: 1.0\n" in text
    recipe_file.write_text(text.replace("  temperature: 1.0\n", "  temperature: 2.0\n"))
    capsys.readouterr()
    assert main(["resume", str(tampered)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "resume: recipe hash changed" in err, err
    assert (tampered / "checkpoints" / "latest.json").exists()

    # a copy with one byte of a committed shard changed: one line naming it, nothing loaded
    corrupt = tmp_path / "corrupt" / run_dir.name
    shutil.copytree(run_dir, corrupt)
    (corrupt / "state.json").unlink()  # its own MLflow run
    shard = corrupt / "checkpoints" / tag_for(4) / "mp_rank_00_model_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    _wait_for_free_cpus(ray_session, 2.0)
    assert main(["resume", str(corrupt)]) == 2
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == [
        f"raydistill: error: {shard}: sha256 differs from the ledger of checkpoint "
        f"{tag_for(4)}; not loading it"
    ], err
    assert "resumed from checkpoint" not in out
    assert shard.read_bytes() == bytes(data)  # kept as it was, for a look

    # the case: a resume that commits below the stray folder, with keep 1
    _wait_for_free_cpus(ray_session, 2.0)
    assert main(["resume", str(run_dir), "--stop-after", "2"]) == 0
    assert "resumed from checkpoint at step 4" in capsys.readouterr().out
    assert read_ledger(run_dir)["step"] == 6
    assert _tags(run_dir) == [tag_for(6)]  # stray step 8 pruned on resume, step 4 retired

    _wait_for_free_cpus(ray_session, 2.0)
    proc = _cli(run_dir, "kill_after_ledger:12", "resume")
    assert proc.returncode == -9, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert read_ledger(run_dir)["step"] == 12
    assert _loss_steps(tmp_path, run_dir) == list(range(1, 9))  # 9..12: the crash window

    _wait_for_free_cpus(ray_session, 2.0)
    assert main(["resume", str(run_dir)]) == 0
    assert "resumed from checkpoint at step 12" in capsys.readouterr().out
    ledger = read_ledger(run_dir)
    assert ledger["step"] == 12 and ledger["committed"] == [tag_for(12)]
    assert _tags(run_dir) == [tag_for(12)]
    assert (run_dir / "summary.json").is_file()
    assert _loss_steps(tmp_path, run_dir) == list(range(1, 13))  # each step once
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run_id = json.loads((run_dir / "state.json").read_text())["run_id"]
    eval_steps = sorted(m.step for m in client.get_metric_history(run_id, "eval/kl"))
    assert eval_steps == [0, 12]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_every_step_checkpointed_ends_with_complete_checkpoints(ray_session, tiny_models, tmp_path):
    """`checkpoint.every: 1`, as the quickstart's student (one rank, ZeRO 0): the ranks write
    step t+1 while the driver commits step t. The run ends 0 and its ledger names complete
    checkpoints only: every file of each kept tag is hashed in it and matches."""
    from orchestrator.cli import main

    raw = base_recipe(
        tmp_path,
        tiny_models,
        student={"zero_stage": 0, "world_size": 1},
        train={"steps": 6},
        checkpoint={"every": 1, "keep": 2},
    )
    assert main(["run", str(write_recipe(tmp_path, raw))]) == 0
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("t-")]
    ledger = read_ledger(run_dir)
    assert ledger["step"] == 6 and ledger["committed"] == [tag_for(5), tag_for(6)]
    assert _tags(run_dir) == [tag_for(5), tag_for(6)]
    assert set(ledger["files"]) == {tag_for(5), tag_for(6)}
    for tag in ledger["committed"]:
        assert "mp_rank_00_model_states.pt" in ledger["files"][tag]
        assert "rng_rank0.safetensors" in ledger["files"][tag]
        verify_checkpoint(run_dir, {**ledger, "tag": tag})  # every file, nothing more
    assert _loss_steps(tmp_path, run_dir) == list(range(1, 7))


def test_fsync_tree_skips_a_file_renamed_while_it_walks(tmp_path, monkeypatch):
    """Ranks sync the shared tag folder while another rank renames its temp files."""
    import actors.durable as durable

    (tmp_path / "kept.pt").write_bytes(b"x")
    real_walk = durable.os.walk

    def walk(root, topdown=True):
        for dirpath, dirs, files in real_walk(root, topdown=topdown):
            yield dirpath, dirs, [*files, ".tmp_gone"]

    monkeypatch.setattr(durable.os, "walk", walk)
    durable.fsync_tree(tmp_path)  # no FileNotFoundError
