"""Offline distillation on the real Ray, teacher actor and DeepSpeed ranks: `cache build`
writes the teacher's top-k once; a run from the cache starts no teacher and ends with the
weights of the live run; every provenance mismatch and every damaged shard is one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import base_recipe, titles_during, write_recipe
from safetensors.torch import load_file

from actors.models import save_tiny_llama
from actors.signal_cache import CacheReader
from orchestrator.cli import main

RUN_TITLES = {"ray::TeacherActor", "ray::CachedTeacher"}  # gone before a sampled run


def _raw(tmp_path: Path, models: dict[str, str], name: str, **teacher) -> dict:
    raw = base_recipe(
        tmp_path,
        models,
        train={"steps": 8, "batch_size": 8, "micro_batch_size": 4, "log_every": 4},
        checkpoint={"every": 4},
    )
    raw["run"]["name"] = name
    raw["teachers"][0].update(teacher)
    return raw


def _run_dir(tmp_path: Path, name: str) -> Path:
    (run_dir,) = (tmp_path / "runs").glob(f"{name}-*")
    return run_dir


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "student" / "model.safetensors")


@pytest.fixture(scope="module")
def built(ray_session, tiny_models, tmp_path_factory):
    """A cache built once by `raydistill cache build`, and the live run it must reproduce."""
    tmp_path = tmp_path_factory.mktemp("offline")
    live = _raw(tmp_path, tiny_models, "live")
    assert main(["run", str(write_recipe(tmp_path, live, "live.yaml"))]) == 0
    offline = _raw(tmp_path, tiny_models, "offline")
    offline["distill"]["mode"] = "offline"
    path = write_recipe(tmp_path, offline, "offline.yaml")
    assert main(["cache", "build", str(path)]) == 0
    return {
        "tmp": tmp_path,
        "raw": offline,
        "path": path,
        "cache": tmp_path / "runs" / "signal_cache" / "tiny",
    }


def test_cache_holds_the_live_teachers_signals_bit_for_bit(built, tiny_models):
    from actors.teacher import TeacherActor
    from orchestrator.data import synthetic_dataset
    from orchestrator.recipe import DataConfig

    reader = CacheReader(built["cache"])
    data = synthetic_dataset(DataConfig(**built["raw"]["data"]), 96, seed=0)
    teacher = TeacherActor("tiny", tiny_models["teacher"], top_k=16, temperature=1.0)
    rows = [70, 3, 41]
    live = teacher.score(data.train.take(rows).trimmed())
    ids, logprobs = reader.read(rows)
    assert ids.dtype == np.uint16 and logprobs.dtype == np.float16
    assert np.array_equal(ids, live.ids) and np.array_equal(logprobs, live.logprobs)
    assert reader.num_rows == len(data.train) + len(data.heldout)


def test_offline_run_starts_no_teacher_and_equals_the_live_run(built, capsys):
    capsys.readouterr()
    code, titles = titles_during(RUN_TITLES, lambda: main(["run", str(built["path"])]))
    assert code == 0
    assert "ray::CachedTeacher" in titles and "ray::TeacherActor" not in titles
    tmp = built["tmp"]
    offline, live = _weights(_run_dir(tmp, "offline")), _weights(_run_dir(tmp, "live"))
    assert offline.keys() == live.keys() and all(torch.equal(offline[k], live[k]) for k in live)
    summary = json.loads((_run_dir(tmp, "offline") / "summary.json").read_text())
    assert summary["teacher_served"]["tiny"]["calls"] > 0  # every shard came from the cache


def _refused(tmp_path: Path, raw: dict, capsys) -> str:
    capsys.readouterr()
    assert main(["run", str(write_recipe(tmp_path, raw, "bad.yaml"))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_each_provenance_mismatch_is_refused_in_one_line(built, tiny_models, tmp_path, capsys):
    raw = json.loads(json.dumps(built["raw"]))
    raw["teachers"][0]["cache"] = str(built["cache"])  # the form before `source` still loads
    raw["run"]["output_dir"] = str(tmp_path / "runs")
    other = save_tiny_llama(str(tmp_path / "other"), seed=7, hidden=48, layers=2)
    with_tok = tmp_path / "with_tokenizer"
    shutil.copytree(tiny_models["teacher"], with_tok)
    from chat_tokenizers import build_tokenizer

    build_tokenizer("smollm").save_pretrained(with_tok)
    cases = {
        "model_hash": ("teachers", {"model": other}),
        "tokenizer_hash": ("teachers", {"model": str(with_tok)}),
        "top_k": ("distill", {"top_k": 32}),
        "temperature": ("teachers", {"temperature": 2.0}),
        "data_hash": ("data", {"seq_len": 24}),
    }
    for field, (section, change) in cases.items():
        bad = json.loads(json.dumps(raw))
        target = bad["teachers"][0] if section == "teachers" else bad[section]
        target.update(change)
        line = _refused(tmp_path, bad, capsys)
        assert line.startswith(f"raydistill: error: teachers[0].source: {field}: the cache has ")
        assert ", the recipe wants " in line
    assert not list((tmp_path / "runs").glob("offline-*"))
    ok = json.loads(json.dumps(raw))
    ok["distill"]["top_k"] = 8  # a cache of k=16 serves k=8 (truncated on read)
    ok["train"]["steps"] = 2
    assert main(["run", str(write_recipe(tmp_path, ok, "k8.yaml"))]) == 0


def _data_page_offset(path: Path) -> int:
    """A byte inside the first column chunk's data (well before the footer)."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    col = meta.row_group(0).column(1)
    return int(col.data_page_offset) + int(col.total_compressed_size) // 2


def test_a_damaged_shard_is_named_by_verify_and_stops_training(built, tmp_path, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(built["cache"], cache)
    assert main(["cache", "verify", str(cache)]) == 0
    shard = sorted(cache.glob("shard-*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[_data_page_offset(shard)] ^= 0xFF
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["cache", "verify", str(cache)]) == 1
    assert f"bad shard: {shard}" in capsys.readouterr().out
    raw = json.loads(json.dumps(built["raw"]))
    raw["teachers"][0]["cache"] = str(cache)
    raw["run"]["output_dir"] = str(tmp_path / "runs")
    capsys.readouterr()
    assert main(["run", str(write_recipe(tmp_path, raw, "c.yaml"))]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("raydistill: run stopped: ") and shard.name in err[-1]
    raw["run"]["output_dir"] = str(tmp_path / "runs2")  # a fresh run directory
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated
    capsys.readouterr()
    assert main(["cache", "verify", str(cache)]) == 1
    assert f"bad shard: {shard}" in capsys.readouterr().out
    assert main(["run", str(write_recipe(tmp_path, raw, "c.yaml"))]) == 1
    assert shard.name in capsys.readouterr().err.strip().splitlines()[-1]


def test_one_cached_and_one_live_teacher_in_one_run(built, tiny_models, tmp_path):
    raw = json.loads(json.dumps(built["raw"]))
    raw["distill"]["mode"] = "off_policy"
    raw["run"]["output_dir"] = str(tmp_path / "runs")
    raw["teachers"][0]["source"] = {"kind": "cache", "path": str(built["cache"])}
    raw["teachers"].append({"name": "live", "model": tiny_models["teacher"], "num_cpus": 0.25})
    raw["distill"]["aggregate"] = "weighted"
    code, titles = titles_during(
        RUN_TITLES, lambda: main(["run", str(write_recipe(tmp_path, raw))])
    )
    assert code == 0 and {"ray::CachedTeacher", "ray::TeacherActor"} <= titles
    run_dir = next((tmp_path / "runs").glob("offline-*"))
    summary = json.loads((run_dir / "summary.json").read_text())
    served = summary["teacher_served"]
    assert served["tiny"]["calls"] > 0 and served["live"]["calls"] > 0


def _small_cache(root: Path) -> Path:
    """A complete two-row cache written by the real CacheWriter (no teacher needed)."""
    from actors.signal_cache import CacheWriter

    prov = {
        "teacher": "tiny",
        "model_hash": "m",
        "tokenizer_hash": "t",
        "top_k": 2,
        "temperature": 1.0,
        "dtype": "auto",
        "data_hash": "d",
    }
    with CacheWriter(root, prov, num_rows=2, rows_per_shard=2) as w:
        for r in range(2):
            w.add(r, np.array([[1, 2]], dtype=np.uint16), np.array([[-0.1, -2.0]], np.float16))
    return root


@pytest.mark.parametrize("name", ["../outside.parquet", "/tmp/abs.parquet", "..", "a/b.parquet"])
def test_a_manifest_naming_a_file_outside_its_folder_is_refused(tmp_path, capsys, name):
    """The manifest names the files a reader opens and a resumed build deletes: a name with a
    path in it (even one whose file is intact, elsewhere) is refused in one line."""
    from actors.signal_cache import CacheCorrupt, CacheReader

    root = _small_cache(tmp_path / "cache")
    manifest = json.loads((root / "manifest.json").read_text())
    shard = root / manifest["shards"][0]["file"]
    if name.startswith("../"):  # the very shard, moved out: its sha256 still matches
        shutil.move(shard, root / name)
    manifest["shards"][0]["file"] = name
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert main(["cache", "verify", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"manifest.json: shard 0: file {name!r} is not a plain file name" in err[0]
    with pytest.raises(CacheCorrupt, match="not a plain file name"):
        CacheReader(root)


def test_a_second_cache_build_of_a_held_cache_is_refused_naming_the_holder(tmp_path, tiny_models):
    """`cache build` holds each cache folder (a second build would delete the first one's
    unfinished shards as strays); it is refused before Ray or a model starts."""
    from test_run_lock import refused_while_held

    raw = _raw(tmp_path, tiny_models, "offline")
    raw["distill"]["mode"] = "offline"
    cache = tmp_path / "runs" / "signal_cache" / "tiny"
    cache.mkdir(parents=True)
    recipe = str(write_recipe(tmp_path, raw))
    line, pid = refused_while_held(cache, "cache", "build", recipe, cli=False)
    assert f"{cache}: this signal cache is in use by another raydistill process " in line
    assert f"(pid {pid})" in line
    assert [p.name for p in cache.iterdir()] == [".lock"]


def test_live_and_cached_pools_are_both_teacher_pools():
    """The loop talks to a TeacherPool: both implementations have each of its methods, with
    the same parameters."""
    import inspect

    from orchestrator.cached_teachers import CachedTeacherPool
    from orchestrator.parts import TeacherPool
    from orchestrator.teachers import LiveTeacherPool

    wanted = [n for n in vars(TeacherPool) if not n.startswith("_")]
    assert {"score", "generate", "actors", "restart_unresponsive", "shutdown"} <= set(wanted)
    for cls in (LiveTeacherPool, CachedTeacherPool):
        for name in wanted:
            proto, impl = getattr(TeacherPool, name), getattr(cls, name, None)
            assert impl is not None, f"{cls.__name__} has no {name}"
            if callable(proto):
                want = list(inspect.signature(proto).parameters)
                assert list(inspect.signature(impl).parameters) == want, (cls, name)


def test_a_cached_teacher_serves_the_off_policy_steps_of_an_on_policy_run(built, tmp_path, capsys):
    """distill.lambda 0.5: the data's steps read the teacher's cache, the student's own
    samples are scored by its live replica (`source.fresh: live`); without that setting the
    recipe is refused in one line, before anything starts."""
    from orchestrator.sources import is_on_policy_step

    raw = json.loads(json.dumps(built["raw"]))
    raw["run"]["output_dir"] = str(tmp_path / "runs")
    raw["distill"].update(mode="on_policy", **{"lambda": 0.5})
    raw["teachers"][0]["source"] = {"kind": "cache", "path": str(built["cache"])}
    line = _refused(tmp_path, raw, capsys)
    assert "bad.yaml: teachers.0.source: a cached teacher cannot score the student" in line
    raw["teachers"][0]["source"]["fresh"] = "live"
    code, titles = titles_during(
        RUN_TITLES, lambda: main(["run", str(write_recipe(tmp_path, raw))])
    )
    assert code == 0 and {"ray::CachedTeacher", "ray::TeacherActor"} <= titles
    summary = json.loads((_run_dir(tmp_path, "offline") / "summary.json").read_text())
    served = summary["teacher_served"]["tiny"]
    steps = raw["train"]["steps"]
    on_policy = sum(is_on_policy_step(raw["run"]["seed"], s, 0.5) for s in range(steps))
    assert 0 < on_policy < steps  # both kinds of step happened
    world = raw["student"]["world_size"]
    # the cache: the off-policy steps' shards and the held-out shards (scored once)
    assert served["cache_calls"] == (steps - on_policy + 1) * world
    assert served["calls"] - served["cache_calls"] == on_policy * world  # live: the samples


def test_a_feature_cache_serves_the_feature_loss_as_the_live_teacher_does(
    built, tiny_models, tmp_path, capsys
):
    """`cache build` of a `distill.features` recipe stores the paired layers' states beside
    the top-k; the offline run reads them and ends with the weights of the live feature run.
    A cache without those states is refused by the run and by a build, each in one line."""
    live = _raw(tmp_path, tiny_models, "flive")
    live["distill"]["features"] = {"loss": "cosine"}
    assert main(["run", str(write_recipe(tmp_path, live, "flive.yaml"))]) == 0
    offline = json.loads(json.dumps(live))
    offline["run"]["name"] = "foffline"
    offline["distill"]["mode"] = "offline"
    path = write_recipe(tmp_path, offline, "foffline.yaml")
    assert main(["cache", "build", str(path)]) == 0
    reader = CacheReader(tmp_path / "runs" / "signal_cache" / "tiny")
    assert reader.hidden_layers == {2: 48}  # the teacher's last of 2 blocks, 48 wide
    capsys.readouterr()
    code, titles = titles_during(RUN_TITLES, lambda: main(["run", str(path)]))
    assert code == 0 and "ray::TeacherActor" not in titles
    a, b = _weights(_run_dir(tmp_path, "foffline")), _weights(_run_dir(tmp_path, "flive"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)

    stale = json.loads(json.dumps(offline))  # the cache built without the states
    stale["teachers"][0]["source"] = {"kind": "cache", "path": str(built["cache"])}
    line = _refused(tmp_path, stale, capsys)
    assert line.startswith("raydistill: error: distill.features: teacher tiny's cache ")
    assert "holds the hidden states of layers [], not [2]" in line
    capsys.readouterr()
    assert main(["cache", "build", str(write_recipe(tmp_path, stale, "stale.yaml"))]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "teachers[0].source.path: " in line and "this recipe ships [2]" in line
