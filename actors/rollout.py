"""RolloutEngine: a copy of the student in its own Ray actor that writes the student's samples.

The driver hands it the prompts of one step (token ids, already rendered with the chat
template) and the ref of the weight snapshot that step must be written with. An engine
whose weights are older than that snapshot loads it first, so syncing is part of the call
and a restarted engine re-syncs before it serves. Every sample records the weight version
it was written with.

Sampling (temperature, top-p, max new tokens, stop at end of turn) is batched; each row has
its own seed (from the run seed, the step and the row), so a step's samples do not depend
on how rows were batched or on what ran before: a resumed run writes the same samples.
The engine returns the step's shards as TokenBatches: prompt + response, the loss on the
response tokens only, the end-of-turn token kept as the last target when the sample ended
and nothing appended when `max_new_tokens` cut it.

Each sampled id's log-prob is recorded in the distribution it was drawn from:
log_softmax(logits / T) (`sampling_temperature`), which is what an importance ratio and a
KL estimate need (TRL's GRPO divides the logits by the sampling temperature likewise). With
top_p < 1 (refused for RL by the recipe) it is the truncated, renormalised distribution's,
as vLLM's "processed_logprobs" are.

With `rollout.weight_sync` nccl, ipc or rdt (vLLM on GPUs) the ranks push the weights into the
engine instead (`actors/vllm_transfer.py`): the snapshot ref is then rank 0's receipt, and a
push never runs while the engine samples (one lock).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import ray
import torch

from actors.batch import Sample, TokenBatch, left_pad
from actors.chat import LENGTH, STOP
from actors.model_store import local_model
from actors.models import build_student, pick_device, pick_dtype
from actors.objective import chunk_positions, label_logprobs
from actors.process import reusable
from actors.specs import EngineSpec
from actors.weights import GPU_SYNC, WeightSnapshot


def sampling_temperature(temperature: float) -> float:
    """The T of the recorded log-probs: the sampling temperature; greedy (0) draws no
    distribution, and records the policy's own at T = 1."""
    return float(temperature) if temperature > 0 else 1.0


def request_seed(seed: int, step: int, row: int) -> int:
    """The seed of one sample: the same (seed, step, row) always draws the same sample."""
    return int(np.random.SeedSequence([seed, step, row]).generate_state(1)[0])


def assemble(prompts: list[np.ndarray], samples: list[Sample], pad: int) -> TokenBatch:
    """Prompt + response rows, right-padded; the loss on the response tokens only."""
    lengths = [len(p) + len(s.response) for p, s in zip(prompts, samples, strict=True)]
    width = max(max(lengths), 2)
    ids = np.full((len(prompts), width), pad, dtype=np.int32)
    attn = np.zeros((len(prompts), width), dtype=np.int8)
    loss = np.zeros((len(prompts), width), dtype=bool)
    for i, (p, s) in enumerate(zip(prompts, samples, strict=True)):
        n = len(p) + len(s.response)
        ids[i, : len(p)] = p
        ids[i, len(p) : n] = s.response
        attn[i, :n] = 1
        loss[i, len(p) - 1 : n - 1] = True  # position t predicts token t+1
    return TokenBatch(ids, attn, loss)


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose mass reaches top_p (renormalised)."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above
    sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
    filtered = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return filtered / filtered.sum(-1, keepdim=True)


class HFSampler:
    """Batched sampling with a transformers model and a KV cache, one generator per row."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model, self.device = model, device

    @torch.inference_mode()
    def sample(
        self,
        prompts: list[np.ndarray],
        seeds: list[int],
        sampling: dict[str, Any],
        stop_ids: list[int],
        pad: int,
    ) -> list[Sample]:
        temperature = float(sampling["temperature"])
        top_p, max_new = float(sampling["top_p"]), int(sampling["max_new_tokens"])
        log_t = sampling_temperature(temperature)
        n = len(prompts)
        ids, attn = left_pad(prompts, pad, self.device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        gens = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
        stops = torch.tensor(stop_ids or [-1], device=self.device)
        out = self.model(
            input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1
        )
        done = torch.zeros(n, dtype=torch.bool, device=self.device)
        tokens, logps = [], []
        for _ in range(max_new):
            logits = out.logits[:, -1].float()
            logp = torch.log_softmax(logits / log_t, -1)  # the sampled distribution's
            if temperature == 0:
                tok = logits.argmax(-1)
            else:
                probs = _top_p_filter(torch.softmax(logits / temperature, -1), top_p)
                if top_p < 1.0:
                    logp = probs.log()  # -inf outside the nucleus: never drawn
                tok = torch.stack(
                    [torch.multinomial(probs[i], 1, generator=gens[i])[0] for i in range(n)]
                )
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            tokens.append(tok)
            logps.append(logp.gather(-1, tok[:, None])[:, 0])
            done = done | torch.isin(tok, stops)
            if bool(done.all()):
                break
            attn = torch.cat([attn, torch.ones((n, 1), dtype=attn.dtype, device=attn.device)], 1)
            pos = pos[:, -1:] + 1
            out = self.model(
                input_ids=tok[:, None],
                attention_mask=attn,
                position_ids=pos,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
        new = torch.stack(tokens, 1).cpu().tolist()
        lps = torch.stack(logps, 1).cpu().tolist()
        stop_set = set(stop_ids)
        samples = []
        for row, lp in zip(new, lps, strict=True):
            end = next((j + 1 for j, t in enumerate(row) if t in stop_set), None)
            reason = STOP if end is not None else LENGTH
            end = end if end is not None else len(row)
            samples.append(Sample(row[:end], lp[:end], reason))
        return samples

    def load_weights(self, snapshot: WeightSnapshot) -> None:
        state = self.model.state_dict()
        with torch.no_grad():
            for name, tensor in snapshot.tensors():
                state[name].copy_(tensor)

    def token_logprobs(self, batch: TokenBatch) -> np.ndarray:
        """log p(next token) at the batch's loss positions, row-major."""
        vocab = int(self.model.config.vocab_size)
        return label_logprobs(self.model, batch, chunk_positions(vocab, 0)).cpu().numpy()


class RolloutEngine:
    """One rollout replica."""

    def __init__(self, spec: EngineSpec) -> None:
        torch.set_num_threads(spec.threads)
        model = local_model(spec.model)  # this node's copy of a known name
        self.version = -1  # no snapshot loaded yet: the first call loads one
        self.stop_ids = list(spec.stop_ids)
        self.pad = spec.pad
        self.weight_sync = spec.weight_sync
        self.lock = threading.Lock()  # sampling, or a pushed round of weights: never both
        self.receiver: Any = None  # vLLM's control plane, for the ranks' pushes
        self.round_s = 0.0  # the last pushed round, start to finish
        self.receipt = -1  # the last pushed version whose sync this engine reported
        device = pick_device(want_gpu=True)
        dtype = pick_dtype(spec.dtype, device)
        self.sampler: HFSampler | Any
        if spec.backend == "vllm":
            from actors.vllm_backend import VLLMEngine, student_folder

            self.sampler = VLLMEngine(
                student_folder(model, spec.layers),
                dtype=dtype,
                max_model_len=spec.max_model_len,
                seed=spec.seed,
                weight_sync=self.weight_sync,
                gpu_share=spec.num_gpus,
            )
        else:
            built = build_student(model, spec.layers)
            self.sampler = HFSampler(built.to(device=device, dtype=dtype).eval(), device)

    def _sync(self, version: int, snapshot_ref: list[ray.ObjectRef]) -> dict[str, float]:
        """Load the snapshot of `version` unless this engine already holds it (then nothing
        is fetched). Sync time = the ranks' gather + fetching and loading here."""
        if self.weight_sync in GPU_SYNC and snapshot_ref:
            return self._receipt(version, snapshot_ref)
        if version == self.version or not snapshot_ref:
            return {}
        ray.wait(snapshot_ref, fetch_local=False)  # waiting for the train step is not sync
        start = time.perf_counter()
        wanted: WeightSnapshot = ray.get(snapshot_ref[0])
        if wanted.version != version:
            raise ValueError(f"snapshot holds version {wanted.version}, expected {version}")
        with self.lock:
            how = self.sampler.load_weights(wanted)
            self.version = wanted.version
        return {
            "sync_in_place": float(how != "reload"),  # HF: a copy into the model, always
            "sync_load_s": time.perf_counter() - start,
            "sync_gather_s": wanted.gather_s,
            "sync_bytes": float(wanted.nbytes),
        }

    def _receipt(self, version: int, receipt_ref: list[ray.ObjectRef]) -> dict[str, float]:
        """GPU weight_sync: the ranks push each version (`actors/vllm_transfer.py`). Wait,
        without the lock, for the push of `version` to have returned, then report it once
        (its load time is the round's, start to finish, on this engine)."""
        if version == self.receipt:
            return {}
        receipt: WeightSnapshot = ray.get(receipt_ref[0])
        if self.version < version:
            raise RuntimeError(
                f"this engine holds weights of version {self.version}, the ranks pushed "
                f"{receipt.version}: rollout.weight_sync {self.weight_sync} pushes do not reach "
                f"an engine that restarted after them"
            )
        self.receipt = version
        return {
            "sync_in_place": 0.0,  # vLLM's layerwise reload of the received tensors
            "sync_load_s": self.round_s,
            "sync_gather_s": receipt.gather_s,
            "sync_bytes": float(receipt.nbytes),
        }

    def generate(
        self,
        shards: list[list[np.ndarray]],
        seeds: list[list[int]],
        sampling: dict[str, Any],
        version: int,
        snapshot_ref: list[ray.ObjectRef],
    ) -> tuple[Any, ...]:
        """Samples for each shard's prompts with the weights of `version` (loaded from the
        snapshot ref first if this engine holds another), as one TokenBatch per shard, then
        a meta dict (weight version, timings, and the sampled ids for the record)."""
        sync = self._sync(version, snapshot_ref)
        start, cpu = time.perf_counter(), time.process_time()
        flat = [p for shard in shards for p in shard]
        flat_seeds = [s for shard in seeds for s in shard]
        with self.lock:  # the weights and their version stay put while sampling
            written_with = self.version
            samples = self.sampler.sample(flat, flat_seeds, sampling, self.stop_ids, self.pad)
        batches, at = [], 0
        for shard in shards:
            batches.append(assemble(shard, samples[at : at + len(shard)], self.pad))
            at += len(shard)
        meta = {
            "version": written_with,
            "busy_s": time.perf_counter() - start,
            "cpu_s": time.process_time() - cpu,
            "new_tokens": sum(len(s.response) for s in samples),
            "responses": [s.response for s in samples],
            "logprobs": [s.logprobs for s in samples],
            "finish_reasons": [s.finish_reason for s in samples],
            **sync,
        }
        return (*batches, meta)

    def token_logprobs(
        self, batch: TokenBatch, version: int = -1, snapshot_ref: list | None = None
    ) -> np.ndarray:
        """The engine's log-probs of fixed text (to check a sync against the ranks)."""
        self._sync(version, snapshot_ref or [])
        with self.lock:
            return self.sampler.token_logprobs(batch)

    def get_version(self) -> int:
        return self.version

    def park(self) -> bool:
        """Kept for another run of the same driver: it holds no version of it (its first
        call loads one) and no counts of this one. False when Ray restarted it."""
        self.version, self.receipt, self.round_s = -1, -1, 0.0
        return reusable()

    def weight_transfer(self, call: str, arg: Any = None) -> None:
        """One call of vLLM's weight-transfer control plane, made by the ranks' push
        (`actors/vllm_transfer.py`) in this actor's `transfer` concurrency group."""
        if self.receiver is None:
            from actors.vllm_transfer import Receiver

            self.receiver = Receiver(self.sampler.llm, self.lock, self._loaded)
        self.receiver(call, arg)

    def _loaded(self, version: int, seconds: float) -> None:
        self.version, self.round_s = version, seconds
