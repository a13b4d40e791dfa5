"""What a run is made of: the hashes a resume must find unchanged.

A resume continues exactly the steps and data the run would have had only if the recipe,
the data file, the student's tokenizer and every teacher's weights are the ones it started
with. Each checkpoint's ledger records them; a resume recomputes them and refuses, with one
line naming what changed, when any differs. The driver-side parts need no actor, so they
are checked before anything starts; the teachers' model hashes once their actors are up.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import yaml

from orchestrator.recipe import Recipe, RecipeError

# where a run executes does not change what it computes: a run may move to another cluster
_NOT_IDENTITY = {"cluster"}


def recipe_hash(recipe: Recipe) -> str:
    """sha256 of the validated recipe (what the run dir's recipe.yaml holds), minus `cluster`."""
    dump = recipe.model_dump(mode="json", exclude=_NOT_IDENTITY)
    return hashlib.sha256(yaml.safe_dump(dump, sort_keys=False).encode()).hexdigest()


def file_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def student_tokenizer_hash(model: str) -> str:
    """The student tokenizer's vocabulary hash; "none" for a model without a tokenizer
    (tiny test models: the data is then token ids, and nothing can drift)."""
    from transformers import AutoTokenizer

    from actors.model_store import local_model
    from actors.models import tokenizer_hash

    try:
        tokenizer = AutoTokenizer.from_pretrained(local_model(model))
    except (OSError, ValueError):
        return "none"
    return tokenizer_hash(tokenizer)


def driver_side_identity(recipe: Recipe) -> dict[str, Any]:
    """The parts that need no actor: recipe, data file, student tokenizer."""
    data = recipe.data
    is_file = data.source == "file" and data.path
    return {
        "recipe": recipe_hash(recipe),
        "data": file_hash(data.path) if is_file else "synthetic",
        "tokenizer": student_tokenizer_hash(recipe.student.model),
        "paths": {"data": data.path, "tokenizer": recipe.student.model},
    }


def run_identity(recipe: Recipe, teacher_infos: list[dict[str, Any]]) -> dict[str, Any]:
    """The whole identity, once the teachers' `info()` (with `model_hash`) is known."""
    ident = driver_side_identity(recipe)
    ident["teachers"] = {i["name"]: i["model_hash"] for i in teacher_infos}
    ident["paths"].update({f"teacher {t.name}": t.model for t in recipe.teachers})
    return ident


def check_identity(recorded: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise a RecipeError naming the first part that changed. Parts missing on either side
    are not compared (the driver-side identity has no teachers yet; older ledgers less)."""
    paths = current.get("paths", {})
    labels = {"recipe": "recipe", "data": "data file", "tokenizer": "student tokenizer"}
    for key, label in labels.items():
        old, new = recorded.get(key), current.get(key)
        if old is not None and new is not None and old != new:
            where = "the run's recipe.yaml was edited" if key == "recipe" else paths.get(key)
            raise RecipeError(
                "resume", f"{label} hash changed ({_short(old)} -> {_short(new)}): {where}"
            )
    old_t, new_t = recorded.get("teachers"), current.get("teachers")
    if old_t is None or new_t is None:
        return
    if set(old_t) != set(new_t):
        before, after = ", ".join(sorted(old_t)), ", ".join(sorted(new_t))
        raise RecipeError("resume", f"teachers changed ({before} -> {after})")
    for name, old in old_t.items():
        if new_t[name] != old:
            where = paths.get(f"teacher {name}", name)
            raise RecipeError(
                "resume",
                f"teacher {name!r} model hash changed ({_short(old)} -> {_short(new_t[name])}): "
                f"{where}",
            )


def _short(digest: str) -> str:
    return f"{digest[:8]}.." if len(digest) > 10 else digest
