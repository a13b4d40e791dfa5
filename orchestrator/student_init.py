"""`student.init`, resolved once per run in the driver, before any rank or rollout engine
starts, to a plain list of kept layers (`StudentConfig.kept_layers`): the ranks, rollout
engines, checkpoints and export see it exactly as they see `student.layers`.

The list, with every block's score for `by_importance`, is written to the run directory's
student_init.json; a resume (or a restore) reads it and never scores again, so a run keeps
the layers it started with. The recipe itself is unchanged (its hash, which a resume
checks, covers `init` as the user wrote it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from actors.batch import TokenBatch
from actors.block_importance import keep_top, score_model
from actors.model_store import local_model
from actors.models import every_nth_layers, pick_device, pick_dtype, vocab_size_of
from orchestrator.checkpoint import write_json
from orchestrator.config_base import StudentConfig
from orchestrator.data import Dataset, file_dataset, synthetic_dataset
from orchestrator.recipe import Recipe, RecipeError

FILE = "student_init.json"


@dataclass
class Chosen:
    """What one student's `init` resolved to."""

    init: dict  # the recipe's init, as written
    num_layers: int  # the source model's
    layers: list[int]
    scores: list[float] | None = None  # by_importance: one per block of the source model


def num_layers_of(model: str) -> int:
    config = AutoConfig.from_pretrained(local_model(model))
    return int(config.get_text_config().num_hidden_layers)


def _split(recipe: Recipe) -> Dataset:
    """The run's rows split as `build_dataset` splits them (held-out rows by
    data.split_seed), built here without any actor: synthetic rows over the first teacher's
    vocab (as its actor reports it: config, capped by its tokenizer), or the file's rows
    with their given responses (by_importance refuses responses a teacher writes)."""
    data, student = recipe.data, local_model(recipe.student.model)
    if data.source == "file":
        tokenizer = AutoTokenizer.from_pretrained(student)
        cache = Path(recipe.run.output_dir).resolve() / "cache"
        return file_dataset(data, tokenizer, recipe.run.seed, None, cache)
    source = local_model(recipe.teachers[0].model) if recipe.teachers else student
    vocab = vocab_size_of(source)
    if recipe.teachers:
        try:
            vocab = min(vocab, len(AutoTokenizer.from_pretrained(source)))
        except (OSError, ValueError):
            pass  # token-only teacher
    return synthetic_dataset(data, vocab, recipe.run.seed)


def calibration_rows(recipe: Recipe, rows: int, where: str) -> tuple[TokenBatch, list[str]]:
    """The first `rows` rows of the training split (already in a seeded random order; the
    held-out rows are never among them), with each row's prompt or text ("" for synthetic
    rows)."""
    split = _split(recipe)
    if rows > len(split.train):
        raise RecipeError(
            f"{where}.init.by_importance.calibration_rows",
            f"{rows} is more than the {len(split.train)} training rows",
        )
    texts = (split.train_prompts or [""] * len(split.train))[:rows]
    return split.train.take(list(range(rows))), texts


def choose(recipe: Recipe, where: str, s: StudentConfig) -> Chosen:
    """Resolve one student's init: the layer list (and, by_importance, the block scores)."""
    assert s.init is not None
    init, total = s.init, num_layers_of(s.model)
    written = init.model_dump(mode="json")
    if init.layers is not None:
        return Chosen(written, total, list(init.layers))
    if init.every_nth is not None:
        return Chosen(written, total, every_nth_layers(total, init.every_nth))
    by = init.by_importance
    assert by is not None
    if by.layers > total:  # preflight says so first; here for callers without it
        raise RecipeError(
            f"{where}.init.by_importance.layers", f"{by.layers} is more than the {total} layers"
        )
    batch, _ = calibration_rows(recipe, by.calibration_rows, where)
    ids = torch.as_tensor(batch.input_ids, dtype=torch.long)
    attn = torch.as_tensor(batch.attention_mask, dtype=torch.long)
    device = pick_device(want_gpu=s.num_gpus > 0)
    try:
        scores = score_model(
            local_model(s.model), ids, attn, by.score, device, pick_dtype(s.dtype, device)
        )
    except ValueError as exc:
        raise RecipeError(f"{where}.init.by_importance", str(exc)) from exc
    return Chosen(written, total, keep_top(scores, by.layers), scores)


def report(where: str, c: Chosen, stored: bool) -> str:
    """What the console shows: the kept layers, and each block's score."""
    kind = next(k for k, v in c.init.items() if v is not None)
    how = " (the run's, from student_init.json)" if stored else ""
    lines = [f"{where}.init: {kind} keeps {len(c.layers)} of {c.num_layers} layers {c.layers}{how}"]
    if c.scores is not None:
        by = c.init["by_importance"]
        lines.append(f"  block scores ({by['score']}, {by['calibration_rows']} training rows):")
        for i, score in enumerate(c.scores):
            lines.append(f"  block {i:3d}  {score:.6f}  {'kept' if i in c.layers else 'dropped'}")
    return "\n".join(lines)


def _read(run_dir: Path | None) -> dict[str, Chosen]:
    path = None if run_dir is None else run_dir / FILE
    if path is None or not path.is_file():
        return {}
    return {where: Chosen(**c) for where, c in json.loads(path.read_text()).items()}


def resolve_layers(
    recipe: Recipe, run_dir: Path | None = None, resumed: bool = False
) -> list[int] | None:
    """Resolve the init of the student (and of mutual peers) once: from the run directory's
    student_init.json where it holds it, else chosen now and written there. A resumed run
    (`resumed`: it has a checkpoint) never chooses again. Returns the student's kept layers
    (None: all of them)."""
    stored, chosen = _read(run_dir), {}
    for where, s in recipe.students():
        if s.init is None:
            continue
        c = stored.get(where)
        if c is not None and c.init != s.init.model_dump(mode="json"):
            c = None
        if c is None and resumed:
            raise RecipeError(
                f"{where}.init",
                f"{run_dir} has a checkpoint but its {FILE} lacks the layers the run started "
                f"with; they are never chosen again on a resume",
            )
        from_file = c is not None
        if c is None:
            c = choose(recipe, where, s)
        print(report(where, c, from_file), flush=True)
        s.resolve(c.layers)
        chosen[where] = c
    if run_dir is not None and chosen and chosen != stored:
        write_json(run_dir / FILE, {where: asdict(c) for where, c in chosen.items()})
    return recipe.student.kept_layers


def tracking_params(run_dir: Path) -> dict[str, str]:
    """MLflow params of the resolved layers: `student.init.layers` and, by_importance, one
    `student.init.score.<block>` per block of the source model (mutual peers likewise)."""
    out = {}
    for where, c in _read(run_dir).items():
        out[f"{where}.init.layers"] = json.dumps(c.layers)
        for i, score in enumerate(c.scores or []):
            out[f"{where}.init.score.{i}"] = f"{score:.6g}"
    return out
