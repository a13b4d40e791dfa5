"""Teachers are compared with the student by their tokenizers, not their vocab sizes: a
padding-only size difference is accepted (and padding ids never reach the signal), the same
size with other pieces, or another tokenizer, is refused in one line naming both models,
unless the teacher chose a cross-tokenizer method."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from chat_tokenizers import VOCAB_SIZE, build_tokenizer
from conftest import base_recipe, write_recipe

from actors.batch import TokenBatch
from actors.models import save_tiny_llama
from actors.teacher import TeacherActor
from orchestrator.cli import main
from orchestrator.preflight import preflight
from orchestrator.recipe import load_recipe
from orchestrator.tokenizer_identity import tokenizer_difference


def _model(root: Path, name: str, tokenizer_kind: str, vocab: int = VOCAB_SIZE, swap=False) -> str:
    path = root / name
    save_tiny_llama(str(path), seed=4, vocab_size=vocab)
    build_tokenizer(tokenizer_kind).save_pretrained(path)
    if swap:  # the same size, two pieces trading ids
        spec = json.loads((path / "tokenizer.json").read_text())
        v = spec["model"]["vocab"]
        v["a"], v["b"] = v["b"], v["a"]
        (path / "tokenizer.json").write_text(json.dumps(spec))
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_models) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tok_models")
    student = root / "student"
    shutil.copytree(tiny_models["student"], student)
    build_tokenizer("smollm").save_pretrained(student)
    return {
        "student": str(student),
        "padded": _model(root, "padded", "smollm", vocab=VOCAB_SIZE + 32),
        "swapped": _model(root, "swapped", "smollm", swap=True),
        "bos": _model(root, "bos", "bos_chatml"),
    }


def test_difference_is_found_by_pieces_specials_and_encodings():
    smol = build_tokenizer("smollm")
    assert tokenizer_difference(smol, build_tokenizer("smollm")) is None
    assert "id 77 is" in tokenizer_difference(smol, build_tokenizer("merging"))  # "\\nZ"
    assert "eos_token" in tokenizer_difference(smol, build_tokenizer("gemma"))
    # same pieces and specials, but it adds a BOS: only the encodings tell
    assert "differently" in tokenizer_difference(smol, build_tokenizer("bos_chatml"))


def _recipe(tmp_path: Path, models: dict[str, str], teacher: str, **teacher_fields) -> Path:
    raw = base_recipe(tmp_path, {**models, "teacher": models[teacher]})
    raw["teachers"][0].update(model=models[teacher], **teacher_fields)
    return write_recipe(tmp_path, raw)


def _run(tmp_path: Path, models: dict[str, str], teacher: str, **teacher_fields) -> int:
    return main(["run", str(_recipe(tmp_path, models, teacher, **teacher_fields))])


def _accepted(tmp_path: Path, models: dict[str, str], teacher: str, **teacher_fields) -> bool:
    """The checks `raydistill run` makes before any actor starts pass."""
    recipe = preflight(load_recipe(_recipe(tmp_path, models, teacher, **teacher_fields)))
    return recipe.teachers[0].model == models[teacher]


def test_padding_only_difference_is_accepted(tmp_path, models):
    assert _accepted(tmp_path, models, "padded")


def test_same_size_with_other_pieces_is_refused_naming_both(tmp_path, models, capsys):
    assert _run(tmp_path, models, "swapped") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "teachers[0].model: teacher 'tiny'" in err[0]
    assert models["swapped"] in err[0] and models["student"] in err[0]
    assert "cross_tokenizer" in err[0]
    assert not (tmp_path / "runs").exists()


def test_another_tokenizer_needs_a_cross_tokenizer_method(tmp_path, models, capsys):
    assert _run(tmp_path, models, "bos") == 2
    assert "different tokenizers" in capsys.readouterr().err
    assert _accepted(tmp_path, models, "bos", cross_tokenizer="span_map")


def test_padding_ids_never_reach_the_signal(models):
    teacher = TeacherActor("padded", models["padded"], top_k=VOCAB_SIZE, temperature=1.0)
    assert teacher.vocab_size == VOCAB_SIZE  # the model has 32 rows more
    ids = np.random.default_rng(0).integers(8, 90, size=(2, 12)).astype(np.int32)
    mask = np.ones_like(ids, dtype=bool)
    signal = teacher.score(TokenBatch(ids, np.ones_like(ids, dtype=np.int8), mask))
    assert signal.ids.max() < VOCAB_SIZE
    # k = the tokenizer's size: the whole distribution is on real ids
    np.testing.assert_allclose(np.exp(signal.logprobs.astype(np.float64)).sum(1), 1.0, atol=2e-2)
