"""Memory at a Qwen-size vocab: peak RSS of a teacher actor (scoring) and of a student rank
(one training step) above their weights, as the number of loss positions grows, side by
side with a naive reference (full [positions, vocab] logits, as the code did before the
chunked path) measured in the same run.

Each point runs in a fresh Ray actor: the baseline is its RSS once the weights are loaded,
the peak is the kernel's high-water mark (VmHWM) over the call. The naive reference stops
at 2048 positions (one fp32 [8192, 151936] tensor alone is 5 GB). The student is measured
as the recipe's defaults run it and with `student.gradient_checkpointing`; the decoder's own
activations (positions x hidden x layers, not x vocab) are what still grows without it.
RESULT peak_growth_1k_to_8k is the larger of the teacher's and the checkpointed student's.
Run it with MALLOC_MMAP_THRESHOLD_=1048576 to see RSS follow live tensors (README: both).

Usage: python benchmarks/vocab_memory.py [--vocab 151936] [--positions 1024 2048 4096 8192]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import ray
import torch
from common import models

from actors.batch import TokenBatch
from actors.losses import per_position_divergence
from actors.signal import TeacherSignal, id_dtype, topk_signal
from actors.specs import WorkerSpec
from actors.student import StudentWorker
from actors.teacher import TeacherActor
from orchestrator.actor_env import actor_options
from orchestrator.recipe import Recipe
from orchestrator.students import worker_spec

GIB = 2**30
ROW = 512  # loss positions per row


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


class Probe:
    """Mixed into the actors: RSS now, and the peak of one call above it."""

    def rss(self) -> int:
        return rss_bytes("VmRSS")

    def peak_of(self, method: str, *args) -> tuple[int, float]:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = rss_bytes("VmRSS")
        start = time.perf_counter()
        getattr(self, method)(*args)
        return rss_bytes("VmHWM") - base, time.perf_counter() - start


class ProbedTeacher(TeacherActor, Probe):
    @torch.inference_mode()
    def naive_score(self, batch: TokenBatch) -> TeacherSignal:
        """The reference: full logits for every position, copied to the host, then top-k."""
        ids, attn, mask = batch.to_torch(self.device)
        logits = self.model(input_ids=ids, attention_mask=attn).logits[mask].cpu()
        return topk_signal(
            logits, lambda x: x, k=self.top_k, temperature=self.temperature,
            teacher=self.name, vocab_size=self.vocab_size, chunk=len(logits),
        )  # fmt: skip


class ProbedStudent(StudentWorker, Probe):
    def train_local(self, batch: TokenBatch, signal: TeacherSignal) -> None:
        ref = ray.put(signal)
        self.train_step(batch, [ref], batch.num_tokens)

    def naive_train(self, batch: TokenBatch, signal: TeacherSignal) -> None:
        """The reference: the whole [positions, vocab] logits in fp32, the divergence on them,
        and a second full pass for the KL metric, as one step did before chunking."""
        self.engine.train()
        ids, attn, mask = batch.to_torch(self.device)
        cols = torch.from_numpy(batch.loss_columns())
        logits = self.engine.module.lm(input_ids=ids, attention_mask=attn, logits_to_keep=cols)
        flat = logits.logits[mask[:, cols]].float()
        t_ids, t_lp = signal.torch_targets()
        labels = torch.roll(ids, -1, 1)[mask]
        ce = torch.nn.functional.cross_entropy(flat, labels)
        d = per_position_divergence(flat, t_ids, t_lp, kind="reverse_kl").mean()
        with torch.no_grad():
            per_position_divergence(flat.detach(), t_ids, t_lp, kind="forward_kl")
        self.engine.backward(0.5 * ce + 0.5 * d)
        self.engine.step()


def token_batch(positions: int, vocab: int, seed: int = 0) -> TokenBatch:
    rows = max(1, positions // ROW)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(rows, ROW + 1)).astype(np.int32)
    loss = np.ones_like(ids, dtype=bool)
    loss[:, -1] = False
    return TokenBatch(ids, np.ones_like(ids, dtype=np.int8), loss)


def fake_signal(batch: TokenBatch, vocab: int, k: int) -> TeacherSignal:
    """Random top-k targets: the student's memory does not depend on their values."""
    rng = np.random.default_rng(1)
    p = batch.num_tokens
    lp = np.log(rng.dirichlet(np.ones(k + 1), size=p)[:, :k]).astype(np.float16)
    ids = rng.integers(0, vocab, size=(p, k)).astype(id_dtype(vocab))
    return TeacherSignal("t", ids, lp, 1.0)


def measure_teacher(path: str, batch: TokenBatch, naive: bool, k: int) -> tuple[int, float]:
    actor = (
        ray.remote(ProbedTeacher)
        .options(**actor_options(1, 0, 2))
        .remote("t", path, top_k=k, temperature=1.0, threads=2)
    )
    try:
        return ray.get(actor.peak_of.remote("naive_score" if naive else "score", batch))
    finally:
        ray.kill(actor)


def measure_student(
    spec: WorkerSpec, vocab: int, batch: TokenBatch, signal, naive: bool
) -> tuple[int, float]:
    actor = ray.remote(ProbedStudent).options(**actor_options(1, 0, 2)).remote(0, 1, spec.threads)
    try:
        addr, port = ray.get(actor.rendezvous.remote())
        ray.get(actor.setup.remote(addr, port, spec))
        small = token_batch(ROW, vocab)
        ray.get(actor.train_local.remote(small, fake_signal(small, vocab, 64)))  # Adam
        method = "naive_train" if naive else "train_local"
        return ray.get(actor.peak_of.remote(method, batch, signal))
    finally:
        ray.kill(actor)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--positions", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--naive-max", type=int, default=2048)
    ap.add_argument("--top-k", type=int, default=64)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="rd-vocab-"))
    m = models(root / "models", args.vocab, teacher_hidden=64, student_hidden=64)
    recipe = Recipe.model_validate(
        {
            "teachers": [{"name": "t", "model": m["teacher"]}],
            "student": {"model": m["student"], "world_size": 1},
            "distill": {"top_k": args.top_k, "loss": "reverse_kl", "alpha": 0.5},
            "train": {"batch_size": 1, "micro_batch_size": 1},
            "data": {"heldout": 1},
        }
    )
    spec = replace(worker_spec(recipe), threads=2)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    spec_gc = replace(spec, gradient_checkpointing=True)
    rows: dict[tuple[str, str, int], tuple[int, float]] = {}

    def show(who: str, impl: str, n: int) -> None:
        peak, secs = rows[who, impl, n]
        print(f"{who:8} {impl:14} {n:6d} positions  peak {peak / GIB:6.3f} GiB  {secs:6.1f} s",
              flush=True)  # fmt: skip

    for n in args.positions:
        batch = token_batch(n, args.vocab)
        signal = fake_signal(batch, args.vocab, args.top_k)
        for naive in (False, True):
            if naive and n > args.naive_max:
                continue
            impl = "naive" if naive else "chunked"
            rows["teacher", impl, n] = measure_teacher(m["teacher"], batch, naive, args.top_k)
            rows["student", impl, n] = measure_student(spec, args.vocab, batch, signal, naive)
            show("teacher", impl, n)
            show("student", impl, n)
        ckpt = measure_student(spec_gc, args.vocab, batch, signal, False)
        rows["student", "chunked+ckpt", n] = ckpt
        show("student", "chunked+ckpt", n)
    ray.shutdown()
    lo, hi, mid = min(args.positions), max(args.positions), 4096
    mid = mid if mid in args.positions else hi
    print()
    for who in ("teacher", "student"):
        naive_n = max(n for n in args.positions if n <= args.naive_max)
        ratio = rows[who, "naive", naive_n][0] / max(rows[who, "chunked", naive_n][0], 1)
        print(f"{who}: naive / chunked peak at {naive_n} positions = {ratio:.1f}x")

    def growth(who: str, impl: str = "chunked") -> float:
        return rows[who, impl, hi][0] / rows[who, impl, lo][0]

    for who, impl in (("teacher", "chunked"), ("student", "chunked"), ("student", "chunked+ckpt")):
        extra = (rows[who, impl, hi][0] - rows[who, impl, lo][0]) / (hi - lo) / 1024
        print(f"{who} {impl}: peak x{growth(who, impl):.3f} from {lo} to {hi} positions "
              f"({extra:.1f} KiB per extra position)")  # fmt: skip
    for who in ("teacher", "student"):
        n = max(x for x in args.positions if x <= args.naive_max)
        if n > lo:
            extra = (rows[who, "naive", n][0] - rows[who, "naive", lo][0]) / (n - lo) / 1024
            print(f"{who} naive: {extra:.1f} KiB per extra position")
    print(f"RESULT teacher_peak_gib {rows['teacher', 'chunked', mid][0] / GIB:.3f}")
    print(f"RESULT student_peak_gib {rows['student', 'chunked', mid][0] / GIB:.3f}")
    if ("student", "chunked+ckpt", mid) in rows:
        print(f"RESULT student_peak_gib_ckpt {rows['student', 'chunked+ckpt', mid][0] / GIB:.3f}")
    print(f"RESULT teacher_growth_1k_to_8k {growth('teacher'):.3f}")
    print(f"RESULT student_growth_1k_to_8k_no_ckpt {growth('student'):.3f}")
    worst = max(growth("teacher"), growth("student", "chunked+ckpt"))
    print(f"RESULT peak_growth_1k_to_8k {worst:.3f}")


if __name__ == "__main__":
    main()
