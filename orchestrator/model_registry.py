"""The exported student as an MLflow Model and, with `run.register_as`, a registered version.

The model is MLflow's transformers flavor (a text-generation pipeline: weights, config and
tokenizer), so `mlflow models serve -m models:/NAME/N` serves it and
`mlflow.transformers.load_model` / `mlflow.pyfunc.load_model` load it. It is written with
`save_model` into a local folder and logged through the run's own client, never through
`mlflow.set_tracking_uri` (which would leak into actor processes). A student without a
tokenizer (token-id data) cannot be a text pipeline: its folder is logged as plain files.
"""

from __future__ import annotations

import importlib.metadata
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

MODEL_ARTIFACT = "model"
FOLDER_ARTIFACT = "student"  # the plain folder, when no MLflow Model can be made
TAG_PREFIX = "raydistill."
_TAG_LIMIT = 5000  # MLflow's limit on a tag value
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
# what the served model needs; torch without its local build tag (+cpu), as PyPI names it
_REQUIREMENTS = ("torch", "transformers", "tokenizers", "safetensors")


def signature() -> Any:
    """Text in, text out, with the generation settings a caller may pass as params."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema(
            [
                ParamSpec("max_new_tokens", "long", 64),
                ParamSpec("do_sample", "boolean", False),
                ParamSpec("temperature", "double", 1.0),
            ]
        ),
    )


def requirements() -> list[str]:
    """Pinned to what trained the student (MLflow's own guess asks for torchvision)."""
    out = []
    for name in _REQUIREMENTS:
        version = importlib.metadata.version(name).split("+", 1)[0]
        out.append(f"{name}=={version}")
    return out


def model_tags(run_dir: Path, identity: dict[str, Any]) -> dict[str, str]:
    """Where the student came from: the recipe (its hash and, within MLflow's tag limit, its
    text; credentials are never in it) and each teacher's weights hash."""
    tags = {f"{TAG_PREFIX}recipe_hash": str(identity.get("recipe", ""))}
    for name, digest in sorted(identity.get("teachers", {}).items()):
        tags[f"{TAG_PREFIX}teacher.{name}"] = str(digest)
    recipe = (run_dir / "recipe.yaml").read_text()
    fits = len(recipe) <= _TAG_LIMIT
    tags[f"{TAG_PREFIX}recipe"] = recipe if fits else "(longer than a tag: the run's recipe.yaml)"
    return tags


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_FILES)


def log_student(
    tracker: Any, export_dir: Path, tags: dict[str, str], register_as: str | None
) -> dict[str, Any]:
    """Log the exported student (an MLflow Model when it has a tokenizer) and register it
    under `register_as`; returns what the summary records: `model_uri` and, when
    registered, `registered_model` / `registered_version`."""
    if not has_tokenizer(export_dir):
        tracker.log_artifact(export_dir, FOLDER_ARTIFACT)
        if register_as:
            print(
                f"run.register_as: the student has no tokenizer (token-id data), so it is "
                f"not an MLflow Model and is not registered as {register_as!r}; its folder "
                f"is logged as the artifact {FOLDER_ARTIFACT!r}",
                flush=True,
            )
        return {}
    import mlflow.transformers

    tracker.set_tags(tags)
    staging = Path(tempfile.mkdtemp(prefix=".mlflow-model-", dir=export_dir.parent))
    quiet = logging.getLogger("mlflow.transformers")
    level = quiet.level
    # its notices that a local folder has no hub model card or license: nothing to act on
    quiet.setLevel(logging.ERROR)
    try:
        local = staging / MODEL_ARTIFACT
        mlflow.transformers.save_model(
            transformers_model=str(export_dir),
            path=str(local),
            task="text-generation",
            signature=signature(),
            pip_requirements=requirements(),
            metadata={k.removeprefix(TAG_PREFIX): v for k, v in tags.items()},
        )
        tracker.log_artifact(local, MODEL_ARTIFACT)
    finally:
        quiet.setLevel(level)
        shutil.rmtree(staging, ignore_errors=True)
    out: dict[str, Any] = {"model_uri": f"runs:/{tracker.run_id}/{MODEL_ARTIFACT}"}
    if register_as:
        version = tracker.register_model(register_as, MODEL_ARTIFACT, tags)
        out.update(registered_model=register_as, registered_version=version)
        print(f"student registered as models:/{register_as}/{version}", flush=True)
    return out
