"""StudentWorker: one DeepSpeed rank of the student inside a Ray actor.

Every rank builds the same student, joins the process group that rank 0 publishes, and
steps a DeepSpeed engine (ZeRO 0-3; gloo on CPU, NCCL on GPU). One `train_step` call is one
optimizer step: the rank's shard is split into `grad_accum` micro-batches, and each
micro-batch's loss is its token SUM scaled by world_size / (the step's loss tokens over all
ranks), so that after DeepSpeed averages over ranks the step optimises the token-weighted
mean over the whole step, whatever micro_batch_size and world_size are.
"""

from __future__ import annotations

import gc
import math
import os
import random
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
import torch

from actors import engine_state
from actors.aggregate import signal_targets
from actors.batch import TokenBatch
from actors.features import FeatureSpec, FeatureTransfer, teacher_states
from actors.model_store import local_model
from actors.models import (
    backbone,
    build_student,
    frozen_head,
    model_hash,
    output_head,
    pick_device,
    pick_dtype,
)
from actors.objective import (
    LossSpec,
    SparseTarget,
    chunk_positions,
    label_logprobs,
    objective_sums,
)
from actors.rl_objective import Micro, next_critique_rows, rl_objective, rl_plan
from actors.signal import TeacherSignal, topk_signal
from actors.specs import WorkerSpec
from actors.weights import WeightSnapshot


def per_token(sums: dict[str, float], tokens: int) -> dict[str, float]:
    """Loss terms per loss token; a teacher's KL per position it covered; `cover/<t>`: the
    fraction of tokens teacher t sent a distribution for (below 1 for routed and
    cross-tokenizer teachers); `share/<t>`: the fraction where it had the largest weight
    (ties go to the first teacher)."""
    out: dict[str, float] = {}
    for key, value in sums.items():
        if key.startswith("rl/"):
            continue
        if key.startswith("kl/"):
            out[key] = value / max(sums.get("cover/" + key[3:], 0.0), 1.0)
        elif key.startswith("top/"):
            out["share/" + key[4:]] = value / max(tokens, 1)
        else:
            out[key] = value / max(tokens, 1)
    return out


def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to `min_ratio` of the peak."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def optimizer_for(model: torch.nn.Module, spec: WorkerSpec) -> tuple[Any, Any]:
    """(optimizer, LR schedule): SGD (tests read its step as the gradient) or AdamW."""
    if spec.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    else:
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.95)
        )
    schedule = lr_lambda(spec.warmup_steps, spec.total_steps, spec.min_lr_ratio)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def import_deepspeed(cpu: bool) -> Any:
    """`import deepspeed` without two things training never uses: its autotuner imports
    MLflow when installed (~1.3 s of CPU in every rank; ranks never talk to MLflow), and
    on CPU its backend JIT-compiles a shared-memory all-reduce at every init_distributed
    (~50 s of C++ on each new machine or pod) that serves only tensor-parallel inference;
    our ranks reduce through gloo. Call it only once DS_ACCELERATOR is set (runtime env)."""
    import importlib

    hide = "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # import -> ImportError
    try:
        import deepspeed
    finally:
        if hide:
            del sys.modules["mlflow"]
    if cpu:
        # by its module name: the attribute path deepspeed.comm.torch is torch itself
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    return deepspeed


class DistillStudent(torch.nn.Module):
    """The HF model and the objective as one module, so DeepSpeed sees every use of a
    parameter (under ZeRO-3 its hooks gather the head for each chunk, also in backward)."""

    def __init__(
        self,
        lm: torch.nn.Module,
        spec: LossSpec,
        chunk_bytes: int,
        logp_temperature: float = 1.0,
        features: FeatureSpec | None = None,
    ) -> None:
        super().__init__()
        self.lm = lm
        self.spec = spec
        self.chunk_bytes = chunk_bytes
        self.logp_temperature = logp_temperature  # RLAIF: the rollouts' sampling T
        self.head = output_head(lm)
        text = lm.config.get_text_config()
        self.vocab = int(text.vocab_size)
        # beside the HF model, not in it: trained with it, never exported
        self.features = FeatureTransfer(features, int(text.hidden_size)) if features else None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        targets: list[SparseTarget],
        with_logp: bool = False,
        sft_from: int | None = None,
        teacher_hidden: dict[int, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(objective sum, its detached terms, extras). RLAIF asks for extras in the same
        pass: `logp`, log_softmax(logits / T)[label] per loss position (with grad) at the
        rollouts' sampling T, the distribution the behaviour log-probs are of; with
        `sft_from` the CE sum of the loss positions from that index on (rows appended for
        supervised targets, which carry no teacher signal). `teacher_hidden` ({layer:
        [P, H]} at the loss positions) adds the feature term, its weight applied."""
        want = self.features is not None and teacher_hidden is not None
        hidden = backbone(self.lm)(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=want
        )
        features = hidden.last_hidden_state[loss_mask]
        labels = torch.roll(input_ids, shifts=-1, dims=1)[loss_mask]
        extras: dict[str, torch.Tensor] = {}
        if sft_from is not None:
            ce_only = LossSpec(kind=self.spec.kind, temperature=1.0, alpha=1.0)
            chunk = chunk_positions(self.vocab, 0, self.chunk_bytes)
            extras["sft"], _ = objective_sums(
                features[sft_from:], self.head, labels[sft_from:], [], ce_only, chunk=chunk
            )
            features, labels = features[:sft_from], labels[:sft_from]
        chunk = chunk_positions(self.vocab, len(targets), self.chunk_bytes)
        logps: list[torch.Tensor] | None = [] if with_logp else None
        loss, terms = objective_sums(
            features,
            self.head,
            labels,
            targets,
            self.spec,
            chunk=chunk,
            logp_out=logps,
            logp_temperature=self.logp_temperature,
        )
        if logps is not None:
            extras["logp"] = torch.cat(logps) if logps else features.new_zeros(0)
        if want:
            assert self.features is not None and teacher_hidden is not None
            mine = {s: hidden.hidden_states[s][loss_mask] for s, _ in self.features.spec.pairs}
            feature = self.features(mine, teacher_hidden)
            loss = loss + self.features.spec.weight * feature
            terms = {**terms, "loss": loss.detach(), "feature": feature.detach()}
        return loss, terms, extras


def micro_batches(batch: TokenBatch, signals: list[TeacherSignal], n: int):
    """(row range, rows, their signal slices) for n micro-batches, padding trimmed per
    micro-batch."""
    offsets = batch.row_offsets()
    for rows in np.array_split(np.arange(len(batch)), n):
        if rows.size == 0:
            continue
        a, b = int(rows[0]), int(rows[-1]) + 1
        part = batch.rows(a, b).trimmed()
        yield (a, b), part, [s.rows(int(offsets[a]), int(offsets[b])) for s in signals]


def step_counts(batch: TokenBatch, plan: dict[str, Any] | None, device: torch.device) -> list:
    """Counts of the whole step, summed over the ranks in one all-reduce: its loss tokens
    (for shards the driver never saw, such as the rollout engines' samples) and, for
    RLAIF, its DPO pairs and critique tokens (the normalisers of those terms)."""
    local = [batch.num_tokens, 0, 0]
    if plan is not None:
        local[1] = len(plan.get("pairs", []))
        local[2] = plan["sft"].num_tokens if plan["sft"] is not None else 0
    counts = torch.tensor(local, dtype=torch.int64, device=device)
    torch.distributed.all_reduce(counts)
    return [int(c) for c in counts.tolist()]


def step_report(sums: dict[str, float], signals: list[TeacherSignal], tokens: int) -> dict:
    """A rank's step metrics: loss terms per token, RL sums as they are, and the time each
    teacher (and replica) spent on this rank's signals."""
    metrics = per_token(sums, tokens)
    metrics.update({k: v for k, v in sums.items() if k.startswith("rl/")})  # raw sums
    for sig in signals:
        for key, value in (("teacher_busy_s", sig.busy_s), ("teacher_cpu_s", sig.cpu_s)):
            name = f"{key}/{sig.teacher}"
            metrics[name] = metrics.get(name, 0.0) + value
            if sig.replica is not None:
                name = f"{name}/r{sig.replica}"
                metrics[name] = metrics.get(name, 0.0) + value
    return metrics


@torch.no_grad()
def peer_signal(
    model: DistillStudent, batch: TokenBatch, spec: WorkerSpec, vocab: int, chunk: int
) -> TeacherSignal:
    """A student's top-k at a shard's loss positions: a teacher's signal contract."""
    start, cpu_start = time.perf_counter(), time.process_time()
    device = next(model.parameters()).device
    ids, attn, mask = batch.to_torch(device)
    hidden = backbone(model.lm)(input_ids=ids, attention_mask=attn)
    signal = topk_signal(
        hidden.last_hidden_state[mask],
        model.head,
        k=spec.top_k,
        temperature=spec.loss.temperature,
        teacher=spec.name,
        vocab_size=vocab,
        chunk=chunk,
    )
    signal.busy_s = time.perf_counter() - start
    signal.cpu_s = time.process_time() - cpu_start
    return signal


def deepspeed_config(spec: WorkerSpec, dtype: torch.dtype) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": spec.grad_accum,
        "gradient_clipping": spec.grad_clip,  # 0: off
        "zero_optimization": {"stage": spec.zero_stage},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def teacher_heads(
    spec: WorkerSpec, device: torch.device, dtype: torch.dtype, vocab: int
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """distill.signal hidden: each teacher's output head, frozen, beside the engine."""
    return {
        name: frozen_head(local_model(path), device, dtype, vocab)
        for name, path in spec.dense_teachers
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


class StudentWorker:
    """A run sets it up and shuts it down; the next may set it up again (orchestrator/warm.py)."""

    def __init__(self, rank: int, world_size: int, threads: int) -> None:
        torch.set_num_threads(threads)
        self.rank, self.world_size = rank, world_size
        self.device = pick_device(want_gpu=True)
        self.engine = self.sender = None  # sender: GPU weight_sync (actors/vllm_transfer.py)

    def node(self) -> dict[str, Any]:
        """The Ray node this rank runs on, its process and the model folder it loaded there
        (the run records where each actor landed, and which process served it)."""
        node = ray.get_runtime_context().get_node_id()
        return {"node": node, "pid": os.getpid(), "model": self.model_path}

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0's address and a free port for the process group."""
        return ray.util.get_node_ip_address(), free_port()

    def setup(self, master_addr: str, master_port: int, spec: WorkerSpec) -> dict[str, Any]:
        deepspeed = import_deepspeed(cpu=self.device.type == "cpu")
        self.spec = spec
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

        seed = spec.seed
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        dtype = pick_dtype(spec.dtype, self.device)
        self.grad_accum = spec.grad_accum
        self.zero3 = spec.zero_stage == 3
        ds_config = deepspeed_config(spec, dtype)
        self.model_path = local_model(spec.model)  # this node's copy of a known name
        lm = build_student(
            self.model_path,
            spec.layers,
            init_context=deepspeed.zero.Init(config_dict_or_path=ds_config) if self.zero3 else None,
            gather=(lambda p: deepspeed.zero.GatheredParameters([p], modifier_rank=0))
            if self.zero3
            else None,
            is_writer=self.rank == 0 or not self.zero3,
        )
        if spec.gradient_checkpointing:
            lm.gradient_checkpointing_enable({"use_reentrant": False})
        self.vocab_size = int(lm.config.get_text_config().vocab_size)
        self._chunk = chunk_positions(self.vocab_size, 0, spec.chunk_bytes)  # no grads
        self.num_params = sum(int(getattr(p, "ds_numel", p.numel())) for p in lm.parameters())
        self.loss_spec = spec.loss
        self.rl = spec.rl
        self.rl_temperature = self.rl.temperature if self.rl else 1.0
        model = DistillStudent(
            lm, self.loss_spec, spec.chunk_bytes, self.rl_temperature, spec.features
        )
        self.heads = teacher_heads(spec, self.device, dtype, self.vocab_size)
        self.reference = None
        if self.rl:  # RLAIF: a frozen copy of the starting student, full on every rank
            ref = build_student(self.model_path, spec.layers)
            self.reference = ref.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        optimizer, scheduler = optimizer_for(model, spec)
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        return {"rank": self.rank, "num_params": self.num_params, "vocab_size": self.vocab_size}

    # -- training -------------------------------------------------------------------------

    def _forward(self, part: TokenBatch, signals: list[TeacherSignal], train: bool = True):
        ids, attn, mask = part.to_torch(self.device)
        targets, top = signal_targets(
            signals, self.spec, ids, mask, self.vocab_size, train, self.heads
        )
        hidden = teacher_states(signals, self.spec.features, self.device)
        loss, terms, _ = self.engine(ids, attn, mask, targets, teacher_hidden=hidden)
        return loss, {**terms, **top}

    def train_step(
        self,
        batch: TokenBatch,
        signal_refs: list[ray.ObjectRef],
        step_tokens: int | None,
        rl: dict[str, Any] | None = None,
    ) -> dict[str, float]:
        """One optimizer step over this rank's shard. `step_tokens` is the loss-token count
        of the whole step (all ranks; None: counted here with one all-reduce): the
        objective is sum over the step / step_tokens. `rl` (RLAIF): this rank's rewards
        per row, the samples' behaviour log-probs and critique rows (see `_rl_terms`)."""
        wait_start = time.perf_counter()
        signals = [s.covering(batch) for s in ray.get(signal_refs)]
        start, cpu_start = time.perf_counter(), time.process_time()
        plan = rl_plan(batch, rl, self.rl, self.grad_accum) if rl is not None else None
        if step_tokens is None or plan is not None:
            step_tokens, pairs, sft_tokens = step_counts(batch, plan, self.device)
            if plan is not None:
                plan["step_pairs"], plan["step_sft_tokens"] = pairs, sft_tokens
        self.engine.train()
        scale = self.world_size / max(int(step_tokens), 1)  # DeepSpeed averages over ranks
        sums: dict[str, float] = {}
        for rows, part, part_signals in micro_batches(batch, signals, self.grad_accum):
            if plan is None:
                loss, terms = self._forward(part, part_signals)
                total = loss * scale
            else:
                total, terms = self._rl_terms(plan, rows, part, part_signals, scale)
            self.engine.backward(total, scale_wrt_gas=False)
            self.engine.step()
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        tokens = batch.num_tokens
        metrics = step_report(sums, signals, tokens)
        grad_norm = self.engine.get_global_grad_norm()
        metrics.update(
            tokens=float(tokens),
            student_busy_s=time.perf_counter() - start,
            student_cpu_s=time.process_time() - cpu_start,
            signal_wait_s=start - wait_start,
            signal_bytes=float(sum(s.nbytes for s in signals)),
            batch_bytes=float(batch.nbytes),
            lr=float(self.engine.get_lr()[0]),
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
        )
        return metrics

    # -- RLAIF ----------------------------------------------------------------------------

    def _rl_terms(self, plan, rows, part, signals, scale):
        """The micro-batch's share of the one RLAIF objective (actors/rl_objective.py):
        the engine's pass over its samples and critique rows, then the terms."""
        a, b = rows
        sft_rows = next_critique_rows(plan)
        full = TokenBatch.concat(part, sft_rows) if sft_rows is not None else part
        ids, attn, mask = full.to_torch(self.device)
        main = len(part)  # the critique rows after it carry no teacher signal
        targets = (
            signal_targets(
                signals, self.spec, ids[:main], mask[:main], self.vocab_size, heads=self.heads
            )[0]
            if signals
            else []
        )
        sft_from = part.num_tokens if sft_rows is not None else None
        loss, terms, extras = self.engine(ids, attn, mask, targets, True, sft_from)
        offs = plan["offsets"]
        micro = Micro(
            rows=rows,
            logp=extras["logp"],
            old_logp=plan["old_logp"][int(offs[a]) : int(offs[b])].to(self.device),
            # the frozen starting student's, at the sampling T (the policy's)
            ref_logp=label_logprobs(self.reference, part, self._chunk, self.rl_temperature),
            seq=torch.repeat_interleave(
                torch.arange(b - a, device=self.device),
                torch.from_numpy(part.loss_mask.sum(1)).to(self.device),
            ),
            scale=scale,
            world_size=self.world_size,
        )
        sft = (extras["sft"], sft_rows.num_tokens) if sft_rows is not None else None
        return rl_objective(plan, self.rl, micro, (loss, terms), sft, part.num_tokens)

    def reference_hash(self) -> str | None:
        """The frozen reference's weights hash (it must never change)."""
        return model_hash(self.reference) if self.reference is not None else None

    @torch.no_grad()
    def evaluate(self, batch: TokenBatch, signal_refs: list[ray.ObjectRef]) -> dict[str, float]:
        """Token sums of CE and KL to each teacher, in micro-batches, for the driver to pool."""
        signals = [s.covering(batch) for s in ray.get(signal_refs)]
        self.engine.eval()
        n = max(1, math.ceil(len(batch) / self.spec.micro_batch_size))
        out: dict[str, float] = {"tokens": float(batch.num_tokens)}
        for _, part, part_signals in micro_batches(batch, signals, n):
            _, terms = self._forward(part, part_signals, train=False)
            for key, value in terms.items():
                if key == "ce" or key.startswith(("kl/", "cover/")):
                    out[key] = out.get(key, 0.0) + float(value)
        return out

    # -- what the student shows others ---------------------------------------------------

    def weights_snapshot(self) -> WeightSnapshot | None:
        """The current weights for the rollout engines, from rank 0 (under ZeRO-3 every
        rank takes part in gathering them). Queued behind a train step, it holds exactly
        that step's weights; its version is the optimizer steps taken."""
        start = time.perf_counter()
        state = engine_state.full_state(self.engine, self.zero3, self.rank)
        if state is None:
            return None
        return WeightSnapshot.of(state, int(self.engine.global_steps), time.perf_counter() - start)

    def push_weights(self, mode: str, engines: list[Any]) -> WeightSnapshot | None:
        """GPU `rollout.weight_sync` (nccl, ipc, rdt): the current weights straight into the
        rollout engines through vLLM's weight transfer (`actors/vllm_transfer.py`). Queued
        behind a train step like `weights_snapshot`, on every rank; rank 0 returns a receipt
        (no tensors). ipc and rdt send each rank's own full copy, nccl rank 0's."""
        from actors.vllm_transfer import WeightSender, sends_on

        start = time.perf_counter()
        version = int(self.engine.global_steps)
        state = engine_state.full_state(self.engine, self.zero3, self.rank, every_rank=True)
        gather_s = time.perf_counter() - start
        sent = 0
        if state is not None and sends_on(mode, self.rank):
            if self.sender is None:
                self.sender = WeightSender(mode, engines, self.rank, state, self.device)
            sent = self.sender.send(state, version)
        if self.rank != 0:
            return None
        return WeightSnapshot(version, {}, gather_s=gather_s, pushed_bytes=sent)

    def token_logprobs(self, batch: TokenBatch) -> np.ndarray:
        """log p(next token) at the loss positions (checks a sync against an engine);
        under ZeRO-3 every rank must be called (the forward gathers parameters)."""
        self.engine.eval()
        return label_logprobs(self.engine.module.lm, batch, self._chunk).cpu().numpy()

    def score(self, batch: TokenBatch) -> TeacherSignal:
        """This student's own top-k at the shard's loss positions, for its peers (mutual
        distillation), from the weights before this step's update. Under ZeRO-3 every rank
        of the group must be called."""
        self.engine.eval()
        return peer_signal(self.engine.module, batch, self.spec, self.vocab_size, self._chunk)

    # -- state ----------------------------------------------------------------------------

    def save_checkpoint(self, directory: str, tag: str) -> dict[str, str]:
        """{path: sha256} of the files this rank wrote (see engine_state.save_checkpoint)."""
        return engine_state.save_checkpoint(self.engine, directory, tag, self.rank)

    def load_checkpoint(self, directory: str, tag: str) -> None:
        engine_state.load_checkpoint(self.engine, directory, tag, self.rank)

    def export(self, path: str, tokenizer_from: str | None = None) -> None:
        engine_state.export(self.engine, self.zero3, self.rank, path, tokenizer_from)

    def shutdown(self) -> None:
        if torch.distributed.is_initialized():  # DeepSpeed's: it forgets its groups too
            import_deepspeed(cpu=self.device.type == "cpu").comm.destroy_process_group()
        self.engine = self.reference = self.sender = None
        gc.collect()
