"""What one train step's per-rank metrics add up to for the run (MLflow and the console)."""

from __future__ import annotations

import math

import numpy as np
import psutil

from orchestrator.parts import TeacherPool


def step_metrics(
    per_rank: list[dict[str, float]],
    pools: list[TeacherPool],
    wall: float,
    depth: int,
) -> dict[str, float]:
    """Token-weighted loss terms; busy times per stage. A teacher's busy time is spread
    over its replicas and the slowest teacher is the critical path; `*_cpu_s` is CPU
    time (on a machine with fewer cores than actors, wall busy time includes waiting)."""
    tokens = sum(m["tokens"] for m in per_rank)
    out: dict[str, float] = {}
    for key in per_rank[0]:
        if key in {"loss", "ce", "kd", "feature"} or key.startswith(("kl/", "share/", "cover/")):
            out[key] = sum(m[key] * m["tokens"] for m in per_rank) / max(tokens, 1)
    kls = [v for k, v in out.items() if k.startswith("kl/")]
    out["kl"] = float(np.mean(kls)) if kls else 0.0
    cpu_total = sum(m["student_cpu_s"] for m in per_rank)
    for pool in pools:
        for kind in ("teacher_busy_s", "teacher_cpu_s"):
            total = sum(m.get(f"{kind}/{pool.name}", 0.0) for m in per_rank)
            out[f"{kind}/{pool.name}"] = total / len(pool.replicas)
            if kind == "teacher_cpu_s":
                cpu_total += total
        for i in range(len(pool.replicas)):
            key = f"teacher_busy_s/{pool.name}/r{i}"
            out[key] = sum(m.get(key, 0.0) for m in per_rank)
        out.update(pool.queue_metrics())
    out.update(
        tokens=tokens,
        tokens_per_s=tokens / max(wall, 1e-9),
        step_time_s=wall,
        student_busy_s=max(m["student_busy_s"] for m in per_rank),
        student_cpu_s=max(m["student_cpu_s"] for m in per_rank),
        teacher_busy_s=max((out[f"teacher_busy_s/{p.name}"] for p in pools), default=0),
        teacher_cpu_s=max((out[f"teacher_cpu_s/{p.name}"] for p in pools), default=0),
        actors_cpu_s=cpu_total,
        signal_wait_s=max(m["signal_wait_s"] for m in per_rank),
        bytes_moved=sum(m["signal_bytes"] + m["batch_bytes"] for m in per_rank),
        signal_bytes_per_token=sum(m["signal_bytes"] for m in per_rank) / max(tokens, 1),
        inflight_depth=float(depth),
        driver_rss_mb=psutil.Process().memory_info().rss / 2**20,
        lr=per_rank[0]["lr"],
        grad_norm=per_rank[0]["grad_norm"],
    )
    out.update(_rl_metrics(per_rank))
    return out


def _rl_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """The RL objective's figures (`rl/*`, judged runs): sums over the ranks, then per
    response token or per DPO pair where they are means."""
    out = {k: float(sum(m[k] for m in per_rank)) for k in per_rank[0] if k.startswith("rl/")}
    tokens = max(out.get("rl/tokens", 0.0), 1.0)
    pairs = max(out.get("rl/pairs", 0.0), 1.0)
    for key in ("rl/kl_ref", "rl/clip_frac", "rl/ratio_mean"):
        if key in out:
            out[key] /= tokens
    for key in ("rl/margin", "rl/accuracy"):
        if key in out:
            out[key] /= pairs
    return out


def pool_eval(parts: list[dict[str, float]]) -> dict[str, float]:
    """Held-out KL(teacher||student) per teacher and perplexity on the gold tokens."""
    tokens = sum(p["tokens"] for p in parts)
    out: dict[str, float] = {}
    for key in parts[0]:
        if key == "ce":
            out[key] = sum(p[key] for p in parts) / max(tokens, 1)
        elif key.startswith("kl/"):  # per position the teacher covered
            cover = sum(p.get("cover/" + key[3:], 0.0) for p in parts)
            out[key] = sum(p.get(key, 0.0) for p in parts) / max(cover, 1)
    out["ppl"] = math.exp(min(out["ce"], 50.0))
    kls = [v for k, v in out.items() if k.startswith("kl/")]
    if kls:
        out["kl"] = float(np.mean(kls))
    return out
