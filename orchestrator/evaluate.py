"""`raydistill eval`: a trained student against a teacher on a data file's held-out rows.

The rows are the ones a training run holds out (`data.split_rows`, by `heldout` and
`split_seed`, tokenized by the student's tokenizer as the run does), and a run directory
lends its recipe's data settings, so the figures are those of the run's own evaluation.
Everything is checked before a model is loaded; bad input is a RecipeError (one line,
exit 2) and leaves no JSON behind. The figures go to a JSON file (atomic) and an MLflow run.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from actors.batch import TokenBatch
from actors.evaluation import EvalSums, greedy_answers, score_rows
from actors.models import load_causal_lm, pick_device
from actors.objective import chunk_positions
from orchestrator.checkpoint import write_json
from orchestrator.data import read_records, split_rows, tokenize_records
from orchestrator.faults import RuntimeFault
from orchestrator.preflight import load_tokenizer, model_facts
from orchestrator.recipe import DataConfig, Recipe, RecipeError, TrackingConfig, load_recipe
from orchestrator.run_tracker import tracking_uri
from orchestrator.tokenizer_identity import tokenizer_difference
from orchestrator.tracking import Tracker, default_tracking_uri, redact

ROWS_PER_PASS = 8  # rows per decoder forward (the vocab projection is chunked inside)
# without a run directory: a run's defaults for its data section, and eval's own
FALLBACKS = {
    "heldout": DataConfig().heldout,
    "split_seed": DataConfig().split_seed,
    "seq_len": 256,
    "top_k": 64,
    "temperature": 1.0,
}


@dataclass
class EvalRequest:
    """The command's arguments; None: the run directory's recipe says, else FALLBACKS."""

    student: str
    teacher: str
    data: str
    out: str | None = None
    heldout: int | None = None
    split_seed: int | None = None
    top_k: int | None = None
    temperature: float | None = None
    seq_len: int | None = None
    max_new_tokens: int = 64
    tracking_uri: str | None = None


def resolve_student(arg: str) -> tuple[Path, Path | None]:
    """(the student's model folder, its run directory or None): a run directory stands for
    the student it exported (`<run>/student`)."""
    path = Path(arg).expanduser()
    if not path.is_dir():
        raise RecipeError(arg, "not a student model folder or a run directory")
    if (path / "config.json").is_file():
        return path.resolve(), None
    if (path / "student" / "config.json").is_file():
        return (path / "student").resolve(), path.resolve()
    if (path / "recipe.yaml").is_file():
        raise RecipeError(arg, "this run has no exported student yet (written at its end)")
    raise RecipeError(arg, "not a student model folder (no config.json) or a run directory")


def _settings(req: EvalRequest, recipe: Recipe | None) -> dict[str, Any]:
    """The request with every None filled: from the run's recipe (its split, sequence
    length, top-k and temperature), else FALLBACKS."""
    base = FALLBACKS
    if recipe is not None:
        d, k = recipe.data, recipe.distill
        base = {
            "heldout": d.heldout,
            "split_seed": d.split_seed,
            "seq_len": d.seq_len,
            "top_k": k.top_k,
            "temperature": k.temperature,
        }
    out = {
        key: default if getattr(req, key) is None else getattr(req, key)
        for key, default in base.items()
    }
    out["max_new_tokens"] = req.max_new_tokens
    for key, low in (("heldout", 0), ("seq_len", 2), ("top_k", 1), ("max_new_tokens", 0)):
        if out[key] < low:
            raise RecipeError(f"--{key.replace('_', '-')}", f"{out[key]} is below {low}")
    if out["temperature"] <= 0:
        raise RecipeError("--temperature", f"{out['temperature']} must be above 0")
    return out


def select_rows(
    records: list[dict[str, str]], tok: Any, seq_len: int, heldout: int, split_seed: int
) -> tuple[TokenBatch, list[str]]:
    """The held-out rows a training run on `records` (`data.read_records`) evaluates on,
    tokenized and split exactly as `data.file_dataset` does, with their prompts; `heldout`
    0: every row."""
    batch, _, kept = tokenize_records(records, tok, seq_len)
    prompts = [records[i].get("prompt") or records[i]["text"] for i in kept]
    if heldout == 0:
        return batch, prompts
    if heldout >= len(batch):
        raise RecipeError(
            "--heldout", f"{heldout} of {len(batch)} rows leaves no training rows (0: all rows)"
        )
    split = split_rows(batch, heldout, split_seed, 0, prompts=prompts)
    return split.heldout, split.heldout_prompts or []


def shared_tokenizer(student: Path, teacher: str) -> tuple[Any, str]:
    """(the student's tokenizer, the teacher's folder), once both are found and have the
    same tokenizer (`tokenizer_identity`): the KLs compare their distributions id by id."""
    s_tok = load_tokenizer(str(student))
    facts = model_facts("--teacher", teacher)
    t_tok = load_tokenizer(facts.path)
    if s_tok is None or t_tok is None:
        which = str(student) if s_tok is None else teacher
        raise RecipeError(which, "has no tokenizer; eval reads text rows")
    diff = tokenizer_difference(s_tok, t_tok)
    if diff is not None:
        raise RecipeError(
            "--teacher", f"{teacher} and the student have different tokenizers ({diff})"
        )
    return s_tok, facts.path


def _load(teacher: str, student: Path) -> tuple[Any, Any]:
    """Both models in float32 (the figures' precision), on a GPU where there is one."""
    device = pick_device(want_gpu=True)
    loaded = []
    for name, path in (("--teacher", teacher), ("STUDENT", str(student))):
        try:
            loaded.append(load_causal_lm(path, torch.float32, device).eval())
        except (OSError, ValueError) as exc:
            raise RecipeError(name, f"cannot load the model in {path} ({exc})") from exc
    return loaded[0], loaded[1]


def _progress(what: str, total: int) -> Any:
    done = [0]
    start = time.monotonic()

    def tick(n: int) -> None:
        done[0] += n
        elapsed = time.monotonic() - start
        print(f"eval: {what} {done[0]}/{total} rows ({elapsed:.0f}s)", file=sys.stderr, flush=True)

    return tick


def figures(
    teacher: Any,
    student: Any,
    tok: Any,
    rows: tuple[TokenBatch, list[str]],
    vocab: int,
    settings: dict[str, Any],
) -> dict[str, float]:
    """KL, perplexities and agreement over the rows' loss positions, and the student's
    greedy answers to their prompts."""
    batch, prompts = rows
    vocab_s = int(student.config.get_text_config().vocab_size)
    chunk = chunk_positions(max(vocab, vocab_s), 2)  # the two models' logits and their maps
    sums, tick = EvalSums(), _progress("scored", len(batch))
    for a in range(0, len(batch), ROWS_PER_PASS):
        part = batch.rows(a, a + ROWS_PER_PASS)
        sums.add(
            score_rows(
                teacher,
                student,
                part,
                vocab=vocab,
                top_k=settings["top_k"],
                temperature=settings["temperature"],
                chunk=chunk,
            )
        )
        tick(len(part))
    out = sums.figures()
    if settings["max_new_tokens"] > 0:
        tick = _progress("answered", len(prompts))
        answers = greedy_answers(student, tok, prompts, settings["max_new_tokens"], tick)
        empty = [not tok.decode(a, skip_special_tokens=True).strip() for a in answers]
        out["response_len_mean"] = sum(len(a) for a in answers) / max(len(answers), 1)
        out["empty_share"] = sum(empty) / max(len(empty), 1)
    out["rows"] = float(len(batch))
    return out


def _tracking(
    req: EvalRequest, run_dir: Path | None, recipe: Recipe | None
) -> tuple[str, str, Path, str | None]:
    """(tracking URI, experiment, artifact root, the run's MLflow run id): a run directory's
    own store, as a resume finds it; else the default local store under ./runs."""
    root = run_dir.parent if run_dir is not None else Path("runs").resolve()
    experiment = recipe.tracking.experiment if recipe else TrackingConfig().experiment
    state_path = run_dir / "state.json" if run_dir is not None else None
    state = json.loads(state_path.read_text()) if state_path and state_path.is_file() else {}
    if req.tracking_uri:
        uri = req.tracking_uri
    elif recipe is not None and recipe.tracking.uri:
        uri = tracking_uri(recipe)
    elif state.get("tracking_uri"):
        uri = state["tracking_uri"]
    else:
        root.mkdir(parents=True, exist_ok=True)
        uri = default_tracking_uri(str(root))
    return uri, experiment, root / "mlartifacts", state.get("run_id")


def log_run(
    req: EvalRequest,
    run_dir: Path | None,
    recipe: Recipe | None,
    params: dict[str, Any],
    metrics: dict[str, float],
) -> tuple[str, str]:
    """An MLflow run holding the figures; (its id, the store's URI without credentials)."""
    from mlflow.exceptions import MlflowException

    uri, experiment, artifacts, trained_by = _tracking(req, run_dir, recipe)
    name = f"eval-{(run_dir or Path(params['student'])).name}"
    try:
        tracker = Tracker(uri, experiment, artifacts, name, None)
        tracker.log_params({k: str(v) for k, v in params.items()})
        tags = {"raydistill.kind": "eval"}
        if trained_by:  # the training run's MLflow run
            tags["raydistill.evaluates"] = trained_by
        tracker.set_tags(tags)
        tracker.log_metrics(0, metrics)
        tracker.finish("FINISHED")
    except MlflowException as exc:
        raise RuntimeFault(f"the MLflow store failed: {redact(exc.message)}") from exc
    return tracker.run_id, tracker.uri


def evaluate_command(req: EvalRequest) -> int:
    """Check the input, compute the figures, log them to MLflow, then write the JSON."""
    student, run_dir = resolve_student(req.student)
    recipe = None
    if run_dir is not None and (run_dir / "recipe.yaml").is_file():
        recipe = load_recipe(run_dir / "recipe.yaml")
    s = _settings(req, recipe)
    out = Path(req.out) if req.out else (run_dir or student) / "eval.json"
    if not out.parent.is_dir():
        raise RecipeError("--out", f"folder {out.parent} not found")
    if not Path(req.data).is_file():
        raise RecipeError(req.data, "data file not found")
    records = read_records(req.data)
    tok, teacher_path = shared_tokenizer(student, req.teacher)
    rows = select_rows(records, tok, s["seq_len"], s["heldout"], s["split_seed"])
    _note_teacher_responses(recipe, run_dir, records)
    teacher, model = _load(teacher_path, student)
    vocab = min(int(teacher.config.get_text_config().vocab_size), len(tok))  # as its actor
    if int(model.config.get_text_config().vocab_size) < vocab:
        raise RecipeError(req.student, f"its vocab is smaller than the tokenizer's {vocab} ids")
    metrics = figures(teacher, model, tok, rows, vocab, s)
    data = str(Path(req.data).resolve())
    params = {"student": str(student), "teacher": req.teacher, "data": data, **s}
    run_id, uri = log_run(req, run_dir, recipe, params, metrics)
    result = {
        **params,
        "teacher_path": teacher_path,
        "run_dir": str(run_dir) if run_dir else None,
        **metrics,
        "mlflow_run_id": run_id,
        "tracking_uri": uri,
    }
    write_json(out, result)
    print(_summary(result, out))
    return 0


def _note_teacher_responses(
    recipe: Recipe | None, run_dir: Path | None, records: list[dict[str, str]]
) -> None:
    """A run that trained on teacher-written responses held out rows of those responses: a
    prompts-only file is not those rows. Said on stderr, with where the responses lie."""
    if recipe is None or run_dir is None or recipe.data.responses != "teacher":
        return
    if any("response" in r for r in records):
        return
    print(
        f"eval: note: this run trained on responses its teacher wrote; for its held-out rows "
        f"pass those (a responses-*.parquet file in {run_dir.parent / 'cache'}) as --data",
        file=sys.stderr,
        flush=True,
    )


def _summary(r: dict[str, Any], out: Path) -> str:
    lines = [
        f"held-out KL(teacher||student): dense {r['kl_dense']:.4f}, top-{r['top_k']} "
        f"{r['kl_topk']:.4f} ({int(r['rows'])} rows, {int(r['positions'])} tokens)",
        f"perplexity: student {r['ppl_student']:.2f}, teacher {r['ppl_teacher']:.2f}",
        f"top-1 agreement: {r['top1_agreement']:.3f}",
    ]
    if "response_len_mean" in r:
        lines.append(
            f"greedy answer length: {r['response_len_mean']:.1f} tokens, "
            f"{r['empty_share']:.1%} empty"
        )
    lines.append(f"written: {out}; MLflow run {r['mlflow_run_id']} ({r['tracking_uri']})")
    return "\n".join(lines)
