"""The shipped recipes that compose modes, run end to end on the tiny models through
overrides (3 steps each): what users copy must run as written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from chat_tokenizers import build_tokenizer
from mlflow.tracking import MlflowClient

from orchestrator.cli import main

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _history(run_dir: Path, key: str) -> list[float]:
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    run_id = json.loads((run_dir / "state.json").read_text())["run_id"]
    rows = client.get_metric_history(run_id, key)
    return [m.value for m in sorted(rows, key=lambda m: m.step)]


def _tiny(tmp_path: Path, chat_models: dict[str, str], steps: int = 3) -> list[str]:
    return [
        f"student.model={chat_models['student']}",
        "student.layers=null",
        f"run.output_dir={tmp_path / 'runs'}",
        f"train.steps={steps}",
        "train.warmup_steps=0",
        "checkpoint.every=0",
        "data.seq_len=160",
        "data.heldout=4",
        "data.generation.max_new_tokens=8",
        "rollout.max_new_tokens=8",
    ]


def test_on_policy_multi_blends_a_cross_tokenizer_teacher_on_the_students_samples(
    ray_session, chat_models, tmp_path
):
    """recipes/on_policy_multi.yaml: the student's own samples, scored by a teacher with its
    tokenizer and one with another (BOS added, other specials), blended into one target."""
    other = tmp_path / "other_tokenizer"
    shutil.copytree(chat_models["teacher"], other)
    build_tokenizer("gemma").save_pretrained(other)
    overrides = [
        *_tiny(tmp_path, chat_models),
        f"teachers.0.model={chat_models['teacher']}",
        f"teachers.1.model={other}",
    ]
    assert main(["run", str(RECIPES / "on_policy_multi.yaml"), *overrides]) == 0
    (run_dir,) = (tmp_path / "runs").glob("on_policy_multi-*")
    assert len(_history(run_dir, "loss")) == 3
    for name in ("smollm2", "gemma"):
        kl = _history(run_dir, f"kl/{name}")
        assert len(kl) == 3 and all(v >= 0 for v in kl), (name, kl)
    assert _history(run_dir, "cover/smollm2") == [1.0] * 3
    assert 0 < min(_history(run_dir, "cover/gemma"))  # positions mapped from its pieces
    assert any((run_dir / "rollouts").iterdir())  # the steps were the student's own samples
