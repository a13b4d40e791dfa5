"""A staged recipe on the real Ray, teacher, judge and DeepSpeed ranks: expand -> label ->
curate -> KD -> offline KD, in order, in one run directory, each stage a nested MLflow run;
the student carries over; a stop inside a train stage resumes inside it without running the
earlier stages again; the final stage's student is registered as an MLflow Model, loaded
back by `models:/NAME/1` and asked to generate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
from conftest import base_recipe, write_recipe
from mlflow.tracking import MlflowClient

from orchestrator.cli import main
from orchestrator.elicit import normalize

STAGES = ["expand", "label", "curate", "kd", "kd_offline"]


def _prompts(tmp_path: Path) -> Path:
    topics = ["cats", "rain", "bread", "trains", "music", "stars", "tea", "maps"]
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"Tell me about {t} number {i}."} for i, t in enumerate(topics * 3)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_stages_run_in_order_carry_the_student_and_resume_inside_a_stage(
    ray_session, chat_models, tmp_path, capsys, monkeypatch
):
    data = _prompts(tmp_path)
    raw = base_recipe(
        tmp_path,
        chat_models,
        data={
            "source": "file",
            "path": str(data),
            "seq_len": 48,
            "heldout": 4,
            "generation": {"max_new_tokens": 12, "batch_size": 16},
        },
        train={"steps": 3, "batch_size": 4, "micro_batch_size": 2, "log_every": 1},
        checkpoint={"every": 2},
    )
    raw["judges"] = [{"name": "len", "function": "toy_judges:response_length"}]
    raw["run"]["register_as"] = "staged-student"
    raw["stages"] = [
        {"name": "expand", "kind": "expand", "expand": {"seeds": 4, "requests": 8}},
        {"name": "label", "kind": "label"},
        {"name": "curate", "kind": "curate", "curate": {"judge": "len", "keep_fraction": 0.75}},
        {"name": "kd", "kind": "train"},
        {"name": "kd_offline", "kind": "train", "overrides": {"distill.mode": "offline"}},
    ]
    path = write_recipe(tmp_path, raw)
    assert main(["run", str(path), "--stop-after", "2"]) == 0  # stops inside `kd`
    assert "continue with: raydistill resume" in capsys.readouterr().out
    (run_dir,) = (tmp_path / "runs").glob("t-*")
    stages = run_dir / "stages"
    written = {s: (stages / s / "data.parquet").stat().st_mtime_ns for s in STAGES[:3]}
    assert main(["resume", str(run_dir)]) == 0
    assert {s: (stages / s / "data.parquet").stat().st_mtime_ns for s in STAGES[:3]} == written
    done = json.loads((run_dir / "stages.json").read_text())["done"]
    assert list(done) == STAGES

    original = [json.loads(line)["prompt"] for line in data.read_text().splitlines()]
    expanded = pq.read_table(stages / "expand" / "data.parquet").column("prompt").to_pylist()
    assert expanded[: len(original)] == original  # the input, then what is new
    new = expanded[len(original) :]
    assert not {normalize(p) for p in new} & {normalize(p) for p in original}
    assert len({normalize(p) for p in new}) == len(new)
    labelled = pq.read_table(stages / "label" / "data.parquet").to_pylist()
    assert [r["prompt"] for r in labelled] == expanded
    assert {r["finish_reason"] for r in labelled} <= {"stop", "length"}
    curated = pq.read_table(stages / "curate" / "data.parquet").to_pylist()
    assert len(curated) == round(0.75 * len(labelled))
    cut = min(len(r["response"]) for r in curated)
    assert sum(len(r["response"]) > cut for r in labelled) < len(curated)  # the longest kept

    kd = json.loads((stages / "kd" / "checkpoints" / "latest.json").read_text())
    assert kd["step"] == 3
    offline = (stages / "kd_offline" / "recipe.yaml").read_text()
    assert f"model: {stages / 'kd' / 'student'}" in offline  # the student carried over
    assert (stages / "kd_offline" / "signal_cache" / "tiny" / "manifest.json").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())["stages"]
    after_kd = summary["kd"]["eval_after"]["kl"]
    assert math.isclose(summary["kd_offline"]["eval_before"]["kl"], after_kd, rel_tol=1e-3)

    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    parent = json.loads((run_dir / "state.json").read_text())["run_id"]
    children = client.search_runs(
        [client.get_run(parent).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent}'",
    )
    assert sorted(r.info.run_name.split("/")[-1] for r in children) == sorted(STAGES)
    assert client.get_run(parent).info.status == "FINISHED"
    _check_registered(client, uri, children, stages, monkeypatch)


def _check_registered(client, uri: str, children, stages: Path, monkeypatch) -> None:
    """One version, from the last train stage, tagged with where it came from; loaded back by
    name it is that stage's exported student and writes text."""
    import mlflow.pyfunc
    import mlflow.transformers
    import torch
    from safetensors.torch import load_file

    last = next(r for r in children if r.info.run_name.split("/")[-1] == "kd_offline")
    (version,) = client.search_model_versions("name = 'staged-student'")
    assert (str(version.version), version.run_id) == ("1", last.info.run_id)
    assert set(version.tags) >= {"raydistill.teacher.tiny", "raydistill.recipe_hash"}
    assert "kd_offline" in version.tags["raydistill.recipe"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    pipe = mlflow.transformers.load_model("models:/staged-student/1")
    exported = load_file(str(stages / "kd_offline" / "student" / "model.safetensors"))
    loaded = pipe.model.state_dict()
    for name, tensor in exported.items():
        assert torch.equal(loaded[name].to(tensor.dtype), tensor), name
    model = mlflow.pyfunc.load_model("models:/staged-student/1")
    assert model.metadata.signature.params is not None  # max_new_tokens etc. may be passed
    (text,) = model.predict(["Tell me about tea."], params={"max_new_tokens": 6})
    assert isinstance(text, str) and text.startswith("Tell me about tea.")


def test_a_repair_stage_then_an_assistant_chain(ray_session, chat_models, tmp_path):
    """repair (the feature loss alone) -> kd, then the kd student as the assistant teaching
    a fresh cut of the recipe's student: the staged levers of progressive distillation."""
    import yaml

    raw = base_recipe(
        tmp_path,
        chat_models,
        data={
            "source": "file",
            "path": str(_prompts(tmp_path)),
            "seq_len": 48,
            "heldout": 4,
            "generation": {"max_new_tokens": 12, "batch_size": 16},
        },
        train={"steps": 3, "batch_size": 4, "micro_batch_size": 2, "log_every": 1},
    )
    raw["stages"] = [
        {"name": "label", "kind": "label"},
        {
            "name": "repair",
            "kind": "train",
            "overrides": {"distill.features": {"loss": "cosine", "only": True}},
        },
        {"name": "kd", "kind": "train"},
        {"name": "student", "kind": "train", "starts_from": "recipe", "previous_teaches": "tiny"},
    ]
    assert main(["run", str(write_recipe(tmp_path, raw))]) == 0
    (run_dir,) = (tmp_path / "runs").glob("t-*")
    stages = run_dir / "stages"

    def history(stage: str, key: str) -> list[float]:
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
        run_id = json.loads((stages / stage / "state.json").read_text())["run_id"]
        return [m.value for m in client.get_metric_history(run_id, key)]

    repair, loss = history("repair", "feature"), history("repair", "loss")
    assert len(repair) == 3 and loss == repair, "the feature term alone is the loss"
    assert history("kd", "feature") == [] and all(v > 0 for v in history("kd", "kd"))
    kd_recipe = yaml.safe_load((stages / "kd" / "recipe.yaml").read_text())
    assert kd_recipe["student"]["model"] == str(stages / "repair" / "student")
    chain = yaml.safe_load((stages / "student" / "recipe.yaml").read_text())
    assert chain["teachers"][0]["model"] == str(stages / "kd" / "student")  # the assistant
    assert chain["student"]["model"] == chat_models["student"]  # a fresh cut, not carried
    summary = json.loads((run_dir / "summary.json").read_text())["stages"]
    before = summary["student"]["eval_before"]["kl"]
    assert before != summary["kd"]["eval_after"]["kl"]  # another student, another teacher


def test_chain_fields_are_checked(tiny_models, tmp_path):
    import pytest

    from orchestrator.recipe import RecipeError, load_recipe

    cases = [
        ([{"name": "s", "kind": "train", "previous_teaches": "tiny"}], "no train stage before"),
        (
            [
                {"name": "a", "kind": "train"},
                {"name": "b", "kind": "train", "previous_teaches": "x"},
            ],
            "previous_teaches: no teacher named 'x'",
        ),
        ([{"name": "l", "kind": "label", "starts_from": "recipe"}], "are for train stages"),
    ]
    for stages, message in cases:
        raw = base_recipe(tmp_path, tiny_models, stages=stages)
        raw["data"] = {"source": "file", "path": str(_prompts(tmp_path)), "seq_len": 32}
        with pytest.raises(RecipeError, match=message):
            load_recipe(write_recipe(tmp_path, raw))
