"""The shipped recipes that compose modes, run end to end on the tiny models through
overrides (3 steps each): what users copy must run as written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from chat_tokenizers import build_tokenizer
from conftest import titles_during
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


def test_mutual_on_policy_students_learn_on_the_first_ones_samples(
    ray_session, chat_models, tmp_path
):
    """recipes/mutual_on_policy.yaml: two students, the teacher and each other as targets, on
    the samples the first student writes; each has its own figures and export."""
    overrides = [
        *_tiny(tmp_path, chat_models),
        f"teachers.0.model={chat_models['teacher']}",
        f"mutual.peers.0.model={chat_models['student']}",
        "mutual.peers.0.layers=null",
        "mutual.peers.0.num_cpus=0.25",
    ]
    assert main(["run", str(RECIPES / "mutual_on_policy.yaml"), *overrides]) == 0
    (run_dir,) = (tmp_path / "runs").glob("mutual_on_policy-*")
    for key in ("kl/smollm2", "kl/peer10", "peer10/kl/smollm2", "peer10/kl/student"):
        kl = _history(run_dir, key)
        assert len(kl) == 3 and all(0 <= v < 50 for v in kl), (key, kl)
    assert _history(run_dir, "on_policy") == [1.0] * 3
    assert len(list((run_dir / "rollouts").glob("step_*.parquet"))) == 3
    assert (run_dir / "student" / "config.json").is_file()
    assert (run_dir / "peer10" / "config.json").is_file()


def test_kd_rlaif_one_teacher_actor_gives_targets_and_judgments(ray_session, chat_models, tmp_path):
    """recipes/kd_rlaif.yaml: KD and a judge's GRPO reward in one backward, the judge served
    by the teacher's own replica: no judge process starts, the teacher's replica counts the
    judgments it gave, and what that saved is reported."""
    overrides = [
        *_tiny(tmp_path, chat_models),
        f"teachers.0.model={chat_models['teacher']}",
        "judges.0.min_mass=0.0",  # the win rate's A/B questions to a random tiny judge
        "judges.0.min_agreement=0",  # which cannot judge: the check runs, logged, not refusing
        "rlaif.win_rate_prompts=2",
    ]
    path = str(RECIPES / "kd_rlaif.yaml")
    code, titles = titles_during(
        {"ray::TeacherActor", "ray::JudgeActor"}, lambda: main(["run", path, *overrides])
    )
    assert code == 0
    assert "ray::TeacherActor" in titles and "ray::JudgeActor" not in titles
    (run_dir,) = (tmp_path / "runs").glob("kd_rlaif-*")
    assert len(_history(run_dir, "kd")) == 3 and min(_history(run_dir, "kd")) > 0
    rewards = _history(run_dir, "reward/rater")
    assert len(rewards) == 3 and all(r < 0 for r in rewards)  # mean log-probabilities
    assert _history(run_dir, "dropped_samples") == [0.0] * 3
    summary = json.loads((run_dir / "summary.json").read_text())
    # 3 steps x 8 samples, and the win-rate comparisons (2 prompts, both orders: 1 call each)
    assert summary["teacher_served"]["smollm2"]["judgments"] >= 3 * 8
    assert summary["judge_shared_weights_mib"]["rater"] > 0
    check = json.loads((run_dir / "judge_check.json").read_text())["rater"]
    assert _history(run_dir, "judge_check/rater/agreement") == [check["agreement"]]
    kinds = set(check) - {"agreement"}  # a one-word answer reversed is not asked
    assert "other_prompt" in kinds <= {"reversed", "cut", "repeated", "other_prompt"}
    assert all(0 <= v <= 1 for v in check.values())
    assert _history(run_dir, "judge_check/rater/min_agreement") == [0]


def test_the_progressive_recipes_load_as_written():
    from orchestrator.recipe import load_recipe

    progressive = load_recipe(RECIPES / "progressive.yaml")
    steps = [s.overrides.get("train.steps", progressive.train.steps) for s in progressive.stages]
    assert sum(steps) == 50, "every optimizer step counts toward the quickstart's 50"
    assert progressive.stages[0].overrides["distill.features"]["only"] is True
    chain = load_recipe(RECIPES / "assistant_chain.yaml")
    trains = [s for s in chain.stages if s.kind == "train"]
    assert len(trains) * chain.train.steps == 50
    assert (trains[-1].starts_from, trains[-1].previous_teaches) == ("recipe", "smollm2")


def test_the_best_student_recipe_loads_as_written():
    """recipes/best_student.yaml, written by benchmarks/student_quality.py: by_importance
    after a label stage (it calibrates on given responses) and the feature loss."""
    from orchestrator.recipe import load_recipe

    best = load_recipe(RECIPES / "best_student.yaml")
    assert best.student.init.by_importance.layers == 6 and best.distill.features is not None
    assert [s.kind for s in best.stages] == ["label", "train"]
