"""`student.init`: the recipe forms, resolution once per run (kept in the run directory, read
again on a resume), calibration rows from the training split only, and a whole run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import base_recipe, write_recipe
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.models import save_tiny_llama
from orchestrator import student_init
from orchestrator.cli import main
from orchestrator.data import file_dataset, synthetic_dataset
from orchestrator.recipe import Recipe, RecipeError, load_recipe
from orchestrator.rollouts import engine_spec
from orchestrator.stages import carried_student, stage_recipe
from orchestrator.students import worker_spec


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """An untrained tiny teacher (no need for the session's trained one), a 4-layer student
    (vocab 96, as the teacher's) whose block 1 is an identity, and that student with a
    char-level tokenizer (file data)."""
    import shutil

    from chat_tokenizers import build_tokenizer

    root = tmp_path_factory.mktemp("student_init")
    deep = save_tiny_llama(str(root / "deep"), seed=4, hidden=32, layers=4)
    model = AutoModelForCausalLM.from_pretrained(deep)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    model.save_pretrained(deep)
    chat = shutil.copytree(deep, root / "chat")
    build_tokenizer("smollm").save_pretrained(chat)
    teacher = save_tiny_llama(str(root / "teacher"), seed=1, hidden=48, layers=2)
    return {"teacher": teacher, "student": deep, "chat": str(chat)}


def _recipe(tmp_path, models, **student) -> Recipe:
    raw = base_recipe(tmp_path, models, student=student)
    return Recipe.model_validate(raw)


def _refused(tmp_path, models, student: dict) -> str:
    raw = base_recipe(tmp_path, models, student=student)
    with pytest.raises(RecipeError) as exc:
        load_recipe(write_recipe(tmp_path, raw))
    return str(exc.value)


def test_layers_and_init_together_are_refused_in_one_line(tmp_path, models):
    why = _refused(tmp_path, models, {"layers": [0], "init": {"every_nth": 2}})
    assert why.endswith(
        "student: give layers or init, not both (init: {layers: [...]} is the same as layers)"
    )


@pytest.mark.parametrize(
    ("init", "expected"),
    [
        ({}, "student.init: give exactly one of layers, every_nth, by_importance (got [])"),
        (
            {"layers": [0], "every_nth": 2},
            "student.init: give exactly one of layers, every_nth, by_importance "
            "(got ['layers', 'every_nth'])",
        ),
        ({"every_nth": 0}, "student.init.every_nth: Input should be greater than or equal to 1"),
        ({"by_importance": {"layers": 0}}, "student.init.by_importance.layers:"),
        (
            {"by_importance": {"layers": 1, "score": "l2"}},
            "student.init.by_importance.score: Input should be 'cosine' or 'kl_drop'",
        ),
        (
            {"by_importance": {"layers": 1, "rows": 4}},
            "student.init.by_importance.rows: unknown key",
        ),
        ({"every_nth": 2, "typo": 1}, "student.init.typo: unknown key"),
    ],
)
def test_bad_init_values_are_refused(tmp_path, models, init, expected):
    assert expected in _refused(tmp_path, models, {"init": init})


def test_student_layers_still_load_and_reach_the_ranks_unchanged(tmp_path, models):
    recipe = _recipe(tmp_path, models, model=models["teacher"], layers=[1, 0])
    assert recipe.student.init is None and recipe.student.kept_layers == [1, 0]
    assert worker_spec(recipe).layers == [1, 0]
    assert student_init.resolve_layers(recipe, tmp_path) == [1, 0]
    assert not (tmp_path / student_init.FILE).exists()  # nothing to keep


def test_every_nth_is_resolved_once_and_read_back_on_a_resume(
    tmp_path, models, monkeypatch, capsys
):
    recipe = _recipe(tmp_path, models, init={"every_nth": 2})
    with pytest.raises(RuntimeError, match="not resolved yet"):
        worker_spec(recipe)
    assert student_init.resolve_layers(recipe, tmp_path) == [0, 2, 3]
    assert worker_spec(recipe).layers == engine_spec(recipe).layers == [0, 2, 3]
    assert "student.init: every_nth keeps 3 of 4 layers [0, 2, 3]" in capsys.readouterr().out
    stored = json.loads((tmp_path / student_init.FILE).read_text())
    assert stored["student"]["layers"] == [0, 2, 3]

    def never(*_a, **_k):
        raise AssertionError("a resume chose the layers again")

    monkeypatch.setattr(student_init, "choose", never)
    again = _recipe(tmp_path, models, init={"every_nth": 2})
    assert student_init.resolve_layers(again, tmp_path, resumed=True) == [0, 2, 3]
    assert "(the run's, from student_init.json)" in capsys.readouterr().out
    (tmp_path / student_init.FILE).unlink()
    with pytest.raises(RecipeError, match="student.init: .* lacks the layers the run started"):
        student_init.resolve_layers(again, tmp_path, resumed=True)


def test_by_importance_drops_the_identity_block_and_reports_every_score(tmp_path, models, capsys):
    for score in ("cosine", "kl_drop"):
        init = {"by_importance": {"layers": 3, "calibration_rows": 16, "score": score}}
        (tmp_path / score).mkdir()
        recipe = _recipe(tmp_path / score, models, init=init)
        assert student_init.resolve_layers(recipe, tmp_path / score) == [0, 2, 3]
        out = capsys.readouterr().out
        assert "student.init: by_importance keeps 3 of 4 layers [0, 2, 3]" in out
        assert f"block scores ({score}, 16 training rows)" in out
        assert "block   1  0.000000  dropped" in out
        params = student_init.tracking_params(tmp_path / score)
        assert params["student.init.layers"] == "[0, 2, 3]"
        assert params["student.init.score.1"] == "0"
        assert [k for k in params if ".score." in k] == [
            f"student.init.score.{i}" for i in range(4)
        ]
        assert all(float(params[f"student.init.score.{i}"]) > 0 for i in (0, 2, 3))


def test_calibration_rows_are_training_rows_never_held_out(tmp_path, models):
    rows = [{"text": f"row {i:02d} says {'ab' * (i % 5)}"} for i in range(40)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = base_recipe(
        tmp_path,
        {**models, "student": models["chat"]},
        data={"source": "file", "path": str(data), "heldout": 8, "seq_len": 32},
        student={"init": {"by_importance": {"layers": 1, "calibration_rows": 32}}},
    )
    recipe = Recipe.model_validate(raw)
    batch, texts = student_init.calibration_rows(recipe, 32, "student")
    split = file_dataset(
        recipe.data, AutoTokenizer.from_pretrained(models["chat"]), 0, None, tmp_path
    )
    assert len(texts) == len(batch) == 32 and len(set(texts)) == 32
    assert not set(texts) & set(split.heldout_prompts)
    assert set(texts) == set(split.train_prompts)  # every training row: 40 - 8 held out
    with pytest.raises(RecipeError, match="calibration_rows: 33 is more than the 32 training"):
        student_init.calibration_rows(recipe, 33, "student")


def test_synthetic_calibration_rows_are_training_rows_never_held_out(tmp_path, models):
    recipe = _recipe(tmp_path, models)
    batch, _ = student_init.calibration_rows(recipe, 100, "student")
    split = synthetic_dataset(recipe.data, 96, recipe.run.seed)
    held = {r.tobytes() for r in split.heldout.input_ids}
    train = {r.tobytes() for r in split.train.input_ids}
    assert all(r.tobytes() in train and r.tobytes() not in held for r in batch.input_ids)


def test_by_importance_refuses_responses_a_teacher_writes(tmp_path, models):
    raw = base_recipe(
        tmp_path,
        models,
        data={"source": "file", "path": "rows.jsonl", "responses": "teacher"},
        student={"init": {"by_importance": {"layers": 1}}},
    )
    with pytest.raises(RecipeError, match="student.init.by_importance: its calibration rows"):
        load_recipe(write_recipe(tmp_path, raw))


def test_a_mutual_peer_is_cut_by_its_own_init(tmp_path, models):
    peer = {"name": "p", "model": models["student"], "init": {"every_nth": 3}}
    raw = base_recipe(
        tmp_path, models, distill={"mode": "mutual"}, mutual={"peers": [peer]}, teachers=[]
    )
    recipe = Recipe.model_validate(raw)
    assert student_init.resolve_layers(recipe, tmp_path) is None  # the student: all layers
    assert worker_spec(recipe, recipe.mutual.peers[0]).layers == [0, 3]
    params = student_init.tracking_params(tmp_path)
    assert params == {"mutual.peers.0.init.layers": "[0, 3]"}


def test_a_stage_after_a_train_stage_takes_the_exported_student_uncut(tmp_path, models):
    raw = base_recipe(tmp_path, models, student={"init": {"every_nth": 2}})
    raw["stages"] = [{"name": "a", "kind": "train"}, {"name": "b", "kind": "train"}]
    recipe = Recipe.model_validate(raw)
    first = stage_recipe(recipe, recipe.stages[0], None, {"model": recipe.student.model})
    assert first.student.init is not None and first.student.init.every_nth == 2
    later = stage_recipe(recipe, recipe.stages[1], None, carried_student(tmp_path / "a"))
    assert later.student.init is None and later.student.kept_layers is None


def test_a_run_keeps_the_chosen_layers_through_a_resume_and_logs_them(
    ray_session, tmp_path, models, monkeypatch
):
    init = {"by_importance": {"layers": 2, "calibration_rows": 8}}
    raw = base_recipe(
        tmp_path,
        models,
        student={"init": init},
        train={"steps": 4},
        checkpoint={"every": 2},
    )
    assert main(["run", str(write_recipe(tmp_path, raw)), "--stop-after", "2"]) == 0
    (run_dir,) = (tmp_path / "runs").glob("t-*")
    chosen = json.loads((run_dir / student_init.FILE).read_text())["student"]["layers"]
    assert len(chosen) == 2 and 1 not in chosen

    def never(*_a, **_k):
        raise AssertionError("a resume chose the layers again")

    monkeypatch.setattr(student_init, "choose", never)
    assert main(["resume", str(run_dir)]) == 0
    exported = AutoModelForCausalLM.from_pretrained(run_dir / "student")
    assert exported.config.num_hidden_layers == 2
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("raydistill").experiment_id])
    assert run.data.params["student.init.layers"] == json.dumps(chosen)
    assert run.data.params["student.init.score.1"] == "0"
    assert run.data.params["student.init.by_importance.layers"] == "2"
