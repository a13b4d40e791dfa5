"""Knowledge elicitation stages: a teacher writes or curates the data the next stage reads.

- `expand`: self-instruct. The teacher is shown a few seed prompts and asked for a new
  instruction; what it writes is deduplicated (exactly, after folding case, whitespace and
  edge punctuation, and nearly) against itself and against
  every input prompt, so no seed example and nothing close to a held-out prompt comes back.
  Near means a word ROUGE-L of 0.7 or more, the filter Self-Instruct uses.
- `label`: the teacher answers each prompt (finish reasons kept).
- `curate`: a judge (one of the recipe's RLAIF judges, or the teacher with the score rubric)
  rates each (prompt, response); the stage keeps those at or above a threshold, or the top
  fraction.

Each stage writes one Parquet file atomically; its figures go to the stage's MLflow run.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.data import read_records
from orchestrator.recipe import Recipe
from orchestrator.rlaif_config import JudgeConfig
from orchestrator.stage_config import StageConfig

_EDGE = re.compile(r"^[\W_]+|[\W_]+$")
_NUMBERED = re.compile(r"^\s*(?:\d+[.)]|[-*•]|instruction\s*\d*\s*:)\s*", re.I)


def normalize(text: str) -> str:
    """What two prompts that differ only in case, whitespace or edge punctuation share."""
    return _EDGE.sub("", " ".join(text.lower().split()))


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def rouge_l(a: list[str], b: list[str]) -> float:
    """ROUGE-L F-measure of two word sequences (their longest common subsequence)."""
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    return 2 * lcs / (len(a) + len(b))


def dedupe(candidates: list[str], existing: list[str], near: float) -> list[str]:
    """The candidates, in order, without exact duplicates (after `normalize`) or near ones
    (word ROUGE-L at or above `near`, as Self-Instruct filters) of each other or of any
    `existing` text (the seeds and every held-out prompt are among them)."""
    seen = {normalize(t) for t in existing}
    kept = [(w, Counter(w)) for w in map(words, existing)]
    out: list[str] = []
    for text in candidates:
        key = normalize(text)
        if not key or key in seen:
            continue
        w, bag = words(text), Counter(words(text))
        if any(
            2 * sum((bag & other).values()) / max(len(w) + len(ow), 1) >= near  # bound first
            and rouge_l(w, ow) >= near
            for ow, other in kept
        ):
            continue
        seen.add(key)
        kept.append((w, bag))
        out.append(text.strip())
    return out


def first_instruction(response: str) -> str:
    """The first non-empty line of what the teacher wrote, without list numbering."""
    for line in response.splitlines():
        line = _NUMBERED.sub("", line).strip()
        if line:
            return line
    return ""


def prompts_of(path: str) -> list[str]:
    return [str(r.get("prompt", r.get("text", ""))) for r in read_records(path)]


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Atomically: a stage's output exists whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.parquet")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def expand(stage: StageConfig, pool: Any, data: str, out: Path, seed: int) -> dict[str, float]:
    cfg = stage.expand
    prompts = prompts_of(data)
    rng = random.Random(seed)
    seeds = rng.sample(prompts, min(cfg.seeds, len(prompts)))
    requests = []
    for _ in range(cfg.requests):
        shots = rng.sample(seeds, min(cfg.shots, len(seeds)))
        listed = "\n".join(f"{i + 1}. {s}" for i, s in enumerate(shots))
        requests.append(
            f"Here are some instructions:\n{listed}\nWrite one new instruction, different "
            "from these. Answer with the instruction only."
        )
    start = time.monotonic()
    sampling = {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature}
    written = pool.generate(requests, sampling, 16, lambda n: None)
    minutes = (time.monotonic() - start) / 60
    candidates = [first_instruction(w["response"]) for w in written]
    new = dedupe(candidates, prompts, cfg.near_duplicate)
    write_rows(out, [{"prompt": p} for p in prompts] + [{"prompt": p} for p in new])
    return {
        "written": float(len(candidates)),
        "written_per_minute": len(candidates) / max(minutes, 1e-9),
        "kept": float(len(new)),
        "kept_share": len(new) / max(len(candidates), 1),
    }


def label(stage: StageConfig, recipe: Recipe, pool: Any, data: str, out: Path) -> dict:
    prompts = prompts_of(data)
    gen = recipe.data.generation
    sampling = gen.model_dump(exclude={"batch_size"})
    start = time.monotonic()
    done = [0]

    def progress(n: int) -> None:
        done[0] += n
        print(f"stage {stage.name}: {done[0]}/{len(prompts)} labelled", flush=True)

    written = pool.generate(prompts, sampling, gen.batch_size, progress)
    rows = [{"prompt": p, **w} for p, w in zip(prompts, written, strict=True)]
    write_rows(out, rows)
    stopped = sum(w["finish_reason"] == "stop" for w in written)
    return {
        "labelled": float(len(rows)),
        "per_minute": len(rows) / max((time.monotonic() - start) / 60, 1e-9),
        "stopped_share": stopped / max(len(rows), 1),
    }


def curate_judge(stage: StageConfig, recipe: Recipe, teacher: str) -> tuple[JudgeConfig, str]:
    """The curate stage's judge config and model: a recipe judge, or the teacher's model."""
    models = {t.name: t.model for t in recipe.teachers}
    if stage.curate.judge:
        j = next(j for j in recipe.judges if j.name == stage.curate.judge)
        return j, j.model or (models[j.teacher] if j.teacher else "")
    return JudgeConfig(name=f"{stage.name}-judge", teacher=teacher), models[teacher]


def curate(stage: StageConfig, judges: Any, data: str, out: Path) -> dict[str, float]:
    records = read_records(data)
    if not all("response" in r for r in records):
        raise ValueError(f"stage {stage.name}: curate needs rows with a response (label first)")
    prompts = [str(r["prompt"]) for r in records]
    responses = [str(r["response"]) for r in records]
    values: list[float | None] = []
    for i in range(0, len(records), 16):
        call = judges.submit("score", prompts[i : i + 16], responses[i : i + 16])
        values += judges.collect(call).values
    scored = [(v, i) for i, v in enumerate(values) if v is not None]
    c = stage.curate
    if c.threshold is not None:
        keep = sorted(i for v, i in scored if v >= c.threshold)
    else:
        best = sorted(scored, key=lambda x: (-x[0], x[1]))
        keep = sorted(i for _, i in best[: max(1, round(len(records) * (c.keep_fraction or 1)))])
    write_rows(out, [{**records[i], "score": values[i]} for i in keep])
    return {
        "scored": float(len(scored)),
        "kept": float(len(keep)),
        "kept_share": len(keep) / max(len(records), 1),
    }
