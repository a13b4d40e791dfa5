"""StudentWorker: one DeepSpeed rank of the student inside a Ray actor.

Every rank builds the same student, joins the process group that rank 0 publishes, and
steps a DeepSpeed engine (ZeRO 0-3; gloo on CPU, NCCL on GPU). One `train_step` call is one
optimizer step: the rank's shard is split into `grad_accum` micro-batches.
"""

from __future__ import annotations

import math
import os
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from actors.batch import TokenBatch
from actors.losses import hard_ce, per_position_divergence
from actors.models import keep_layers, load_causal_lm, pick_device, pick_dtype
from actors.signal import TeacherSignal


def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to `min_ratio` of the peak."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class StudentWorker:
    def __init__(self, rank: int, world_size: int, spec: dict[str, Any]) -> None:
        torch.set_num_threads(int(spec.get("threads", 1)))
        self.rank, self.world_size, self.spec = rank, world_size, spec
        self.device = pick_device(want_gpu=True)
        self.engine = None

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0's address and a free port for the process group."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, master_addr: str, master_port: int) -> dict[str, Any]:
        import deepspeed  # imported here: DS_ACCELERATOR must be set first (runtime env)

        spec = self.spec
        local_rank = 0 if self.device.type == "cpu" else int(os.environ.get("LOCAL_RANK", 0))
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(local_rank),
        )
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)

        seed = int(spec["seed"])
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        dtype = pick_dtype(spec.get("dtype", "auto"), self.device)
        model = load_causal_lm(spec["model"], torch.float32, torch.device("cpu"))
        if spec.get("layers"):
            model = keep_layers(model, list(spec["layers"]))
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
        self.vocab_size = int(model.config.vocab_size)
        self.num_params = sum(p.numel() for p in model.parameters())
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=float(spec["lr"]),
            weight_decay=float(spec["weight_decay"]),
            betas=(0.9, 0.95),
        )
        schedule = lr_lambda(
            int(spec["warmup_steps"]), int(spec["total_steps"]), float(spec["min_lr_ratio"])
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        self.grad_accum = int(spec["grad_accum"])
        ds_config = {
            "train_micro_batch_size_per_gpu": int(spec["micro_batch_size"]),
            "gradient_accumulation_steps": self.grad_accum,
            "gradient_clipping": float(spec["grad_clip"]),
            "zero_optimization": {"stage": int(spec["zero_stage"])},
            "bf16": {"enabled": dtype == torch.bfloat16},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        }
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        return {"rank": self.rank, "num_params": self.num_params, "vocab_size": self.vocab_size}

    # -- training -------------------------------------------------------------------------

    def _objective(
        self, batch: TokenBatch, signals: list[TeacherSignal]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """alpha * CE(gold) + (1 - alpha) * sum_t w_t * D(teacher_t || student)."""
        spec = self.spec
        ids, attn, mask = batch.to_torch(self.device)
        cols = torch.from_numpy(batch.loss_columns()).to(self.device)
        logits = self.engine(input_ids=ids, attention_mask=attn, logits_to_keep=cols).logits
        flat = logits[mask[:, cols]][:, : self.vocab_size].float()  # [P, V], loss positions
        n = flat.shape[0]
        labels = torch.roll(ids, shifts=-1, dims=1)[mask]
        alpha, temp = float(spec["alpha"]), float(spec["temperature"])
        terms = {"ce": hard_ce(flat, labels, torch.ones_like(labels, dtype=torch.bool))}
        kd = flat.new_zeros(())
        train_kd = alpha < 1.0 and torch.is_grad_enabled()
        for weight, sig in zip(spec["teacher_weights"], signals, strict=True):
            t_ids, t_lp = (x.to(self.device) for x in sig.torch_targets())
            with torch.set_grad_enabled(train_kd):
                d = per_position_divergence(
                    flat, t_ids, t_lp, kind=spec["loss"], temperature=temp,
                    beta=float(spec["beta"]), skew=float(spec["skew"]),
                )  # fmt: skip
                kd = kd + weight * d.sum() / max(n, 1) * temp**2
            kl = d.detach()
            if spec["loss"] != "forward_kl":
                with torch.no_grad():
                    kl = per_position_divergence(
                        flat.detach(), t_ids, t_lp, kind="forward_kl", temperature=temp
                    )
            terms[f"kl/{sig.teacher}"] = kl.sum() / max(n, 1)
        total = alpha * terms["ce"] + (1 - alpha) * kd if train_kd else alpha * terms["ce"]
        terms["kd"] = kd.detach()
        terms["loss"] = total.detach()
        return total, terms, n

    def train_step(self, batch: TokenBatch, signal_refs: list[ray.ObjectRef]) -> dict[str, float]:
        """One optimizer step over this rank's shard; returns metrics (small floats only)."""
        wait_start = time.perf_counter()
        signals: list[TeacherSignal] = ray.get(signal_refs)
        start = time.perf_counter()
        self.engine.train()
        micro = np.array_split(np.arange(len(batch)), self.grad_accum)
        offsets = batch.row_offsets()
        sums: dict[str, float] = {}
        tokens = 0
        for rows in micro:
            a, b = int(rows[0]), int(rows[-1]) + 1
            part = batch.rows(a, b).trimmed()
            part_signals = [s.rows(int(offsets[a]), int(offsets[b])) for s in signals]
            loss, terms, n = self._objective(part, part_signals)
            self.engine.backward(loss)
            self.engine.step()
            tokens += n
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + float(value) * n
        busy = time.perf_counter() - start
        metrics = {k: v / max(tokens, 1) for k, v in sums.items()}
        grad_norm = self.engine.get_global_grad_norm()
        metrics.update(
            tokens=float(tokens),
            student_busy_s=busy,
            signal_wait_s=start - wait_start,
            teacher_busy_s=sum(s.busy_s for s in signals),
            signal_bytes=float(sum(s.nbytes for s in signals)),
            batch_bytes=float(batch.nbytes),
            lr=float(self.engine.get_lr()[0]),
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
        )
        return metrics

    @torch.no_grad()
    def evaluate(self, batch: TokenBatch, signal_refs: list[ray.ObjectRef]) -> dict[str, float]:
        """Token-weighted sums of CE and KL to each teacher, for the driver to pool."""
        signals: list[TeacherSignal] = ray.get(signal_refs)
        self.engine.eval()
        _, terms, n = self._objective(batch, signals)
        out = {k: float(v) * n for k, v in terms.items() if k == "ce" or k.startswith("kl/")}
        out["tokens"] = float(n)
        return out

    # -- state ----------------------------------------------------------------------------

    def save_checkpoint(self, directory: str, tag: str, client_state: dict[str, Any]) -> None:
        """DeepSpeed state (weights, optimizer, scheduler) plus this rank's RNG state."""
        self.engine.save_checkpoint(directory, tag=tag, client_state=client_state)
        rng = {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        }
        torch.save(rng, Path(directory) / tag / f"rng_rank{self.rank}.pt")

    def load_checkpoint(self, directory: str, tag: str) -> dict[str, Any]:
        _, client_state = self.engine.load_checkpoint(directory, tag=tag)
        rng = torch.load(Path(directory) / tag / f"rng_rank{self.rank}.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        return client_state or {}

    def export(self, path: str, tokenizer_from: str | None = None) -> None:
        """Write the student as a plain HF folder (rank 0), gathering ZeRO-3 shards first."""
        import deepspeed

        model = self.engine.module
        params = list(model.parameters())
        if int(self.spec["zero_stage"]) == 3:
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                state = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
        else:
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if self.rank != 0:
            return
        model.save_pretrained(path, state_dict=state)
        if tokenizer_from:
            from transformers import AutoTokenizer

            try:
                AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(path)
            except (OSError, ValueError):
                pass  # token-only student (tests): nothing to save

    def shutdown(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
