"""`raydistill eval`: figures against a plain reference, the training run's split, a run
directory standing for its student, JSON and MLflow written, bad input refused (exit 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from chat_tokenizers import build_tokenizer
from conftest import base_recipe
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from orchestrator.cli import main
from orchestrator.data import read_records
from orchestrator.evaluate import EvalRequest, evaluate_command, select_rows

QUESTIONS = ["What is up", "Say hi", "Name a color", "Count to three", "Spell cat", "Why not"]


def _data(tmp_path: Path, n: int = 18) -> Path:
    path = tmp_path / "data.jsonl"
    rows = [
        {"prompt": f"{QUESTIONS[i % 6]} {i}?", "response": f"Answer {i}, said twice: {i} {i}."}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _eval(tmp_path: Path, student: str, teacher: str, **kw) -> dict:
    out = tmp_path / "eval.json"
    req = EvalRequest(
        student=student,
        teacher=teacher,
        data=str(_data(tmp_path)),
        out=str(out),
        max_new_tokens=4,
        seq_len=48,
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        **kw,
    )
    assert evaluate_command(req) == 0
    return json.loads(out.read_text())


def test_a_student_identical_to_its_teacher_is_at_zero_kl(chat_models, tmp_path):
    r = _eval(tmp_path, chat_models["teacher"], chat_models["teacher"], heldout=0)
    assert r["kl_dense"] < 1e-6
    assert abs(r["kl_topk"]) < 1e-3  # the teacher's top-k log-probs travel as float16
    assert r["top1_agreement"] == 1.0
    assert r["ppl_student"] == pytest.approx(r["ppl_teacher"], rel=1e-6)
    assert r["rows"] == 18 and r["heldout"] == 0


def _reference_kl(chat_models: dict, data: Path, heldout: int, split_seed: int) -> float:
    """Full logits of both models and F.kl_div, on the rows eval selects."""
    tok = AutoTokenizer.from_pretrained(chat_models["student"])
    batch, _ = select_rows(read_records(str(data)), tok, 48, heldout, split_seed)
    ids, attn, mask = batch.to_torch(torch.device("cpu"))
    with torch.no_grad():
        logits = [
            AutoModelForCausalLM.from_pretrained(chat_models[m])(input_ids=ids, attention_mask=attn)
            .logits[mask]
            .float()
            for m in ("teacher", "student")
        ]
    log_p, log_q = (torch.log_softmax(x, -1) for x in logits)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="sum")
    return float(kl) / int(mask.sum())


def test_kl_dense_equals_a_full_logits_reference_on_the_held_out_rows(chat_models, tmp_path):
    r = _eval(tmp_path, chat_models["student"], chat_models["teacher"], heldout=6, split_seed=3)
    assert r["rows"] == 6 and r["kl_dense"] > 0.01
    ref = _reference_kl(chat_models, tmp_path / "data.jsonl", 6, 3)
    assert r["kl_dense"] == pytest.approx(ref, abs=1e-5)
    assert 0 < r["kl_topk"] <= r["kl_dense"] + 1e-3  # k+1 outcomes: a lower bound (+ fp16)
    assert 0 <= r["top1_agreement"] < 1 and r["ppl_student"] != r["ppl_teacher"]
    assert 0 <= r["response_len_mean"] <= 4 and 0 <= r["empty_share"] <= 1
    other = _reference_kl(chat_models, tmp_path / "data.jsonl", 6, 4)
    assert other != pytest.approx(ref, abs=1e-5)  # another split seed: other rows


def _run_dir(tmp_path: Path, chat_models: dict) -> Path:
    """A finished run's folder as the driver leaves it: recipe.yaml and student/."""
    run_dir = tmp_path / "runs" / "t-1"
    shutil.copytree(chat_models["student"], run_dir / "student")
    data = {"source": "file", "path": str(_data(tmp_path)), "seq_len": 48, "heldout": 5}
    raw = base_recipe(tmp_path, chat_models, data={**data, "split_seed": 2})
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(raw))
    return run_dir


def test_a_run_directory_stands_for_its_student_and_lends_its_split(chat_models, tmp_path):
    run_dir = _run_dir(tmp_path, chat_models)
    args = ["eval", str(run_dir), "--teacher", chat_models["teacher"]]
    assert main([*args, "--data", str(tmp_path / "data.jsonl"), "--max-new-tokens", "3"]) == 0
    r = json.loads((run_dir / "eval.json").read_text())
    assert r["student"] == str((run_dir / "student").resolve())
    assert (r["heldout"], r["split_seed"], r["seq_len"], r["top_k"]) == (5, 2, 48, 16)
    assert r["rows"] == 5 and r["run_dir"] == str(run_dir.resolve())
    data = tmp_path / "data.jsonl"
    assert r["kl_dense"] == pytest.approx(_reference_kl(chat_models, data, 5, 2), abs=1e-5)
    # the MLflow run lives in the run's own store (./runs/mlflow.db beside it)
    assert r["tracking_uri"] == f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').as_posix()}"
    run = MlflowClient(tracking_uri=r["tracking_uri"]).get_run(r["mlflow_run_id"])
    for key in ("kl_dense", "kl_topk", "ppl_student", "ppl_teacher", "top1_agreement"):
        assert run.data.metrics[key] == pytest.approx(r[key])
    assert run.data.params["heldout"] == "5" and run.data.params["teacher"] == r["teacher"]
    assert run.data.params["student"] == r["student"] and run.data.params["data"] == r["data"]
    assert run.data.tags["raydistill.kind"] == "eval" and run.info.status == "FINISHED"


def _refused(tmp_path: Path, capsys, *argv: str) -> str:
    out = tmp_path / "eval.json"
    assert main(["eval", *argv, "--out", str(out)]) == 2
    assert not out.exists() and not list(tmp_path.glob("eval.json*"))
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_a_missing_data_file_is_refused_in_one_line(chat_models, tmp_path, capsys):
    missing = tmp_path / "absent.jsonl"
    args = ["--teacher", chat_models["teacher"], "--data", str(missing)]
    err = _refused(tmp_path, capsys, chat_models["student"], *args)
    assert str(missing) in err and "not found" in err


def test_a_bad_jsonl_line_and_a_missing_model_are_refused(chat_models, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Hi", "response": "Yo"}\nnot json\n')
    args = ["--teacher", chat_models["teacher"], "--data", str(bad)]
    assert "line 2" in _refused(tmp_path, capsys, chat_models["student"], *args)
    args = ["--teacher", str(tmp_path / "nowhere"), "--data", str(_data(tmp_path))]
    assert "nowhere" in _refused(tmp_path, capsys, chat_models["student"], *args)
    args = ["--teacher", chat_models["teacher"], "--data", str(_data(tmp_path))]
    assert "no-model" in _refused(tmp_path, capsys, str(tmp_path / "no-model"), *args)


def test_a_teacher_with_another_tokenizer_is_refused(chat_models, tmp_path, capsys):
    other = tmp_path / "gemma_teacher"
    shutil.copytree(chat_models["teacher"], other)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (other / name).unlink(missing_ok=True)
    build_tokenizer("gemma").save_pretrained(other)
    args = ["--teacher", str(other), "--data", str(_data(tmp_path))]
    err = _refused(tmp_path, capsys, chat_models["student"], *args)
    assert "different tokenizers" in err
