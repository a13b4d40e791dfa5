"""TeacherActor: one teacher replica inside a Ray actor, transformers or vLLM backend.

It turns token shards into TeacherSignals (exact temperature-scaled top-k from the full
logits, which never leave the actor) and writes responses for knowledge elicitation. Both
backends return the same layout; the vLLM one scores through prompt log-probs (see
`actors/vllm_backend.py`) and carries no hidden states.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer

from actors.batch import TokenBatch, left_pad
from actors.chat import adds_bos, render_prompt_ids, split_finish, stop_token_ids
from actors.judge import JudgeActor
from actors.model_store import local_model
from actors.models import (
    backbone,
    load_causal_lm,
    model_hash,
    output_head,
    pick_device,
    pick_dtype,
    tokenizer_hash,
)
from actors.objective import DEFAULT_CHUNK_BYTES, chunk_positions
from actors.process import reusable, yield_cpu
from actors.signal import HiddenStates, TeacherSignal, id_dtype, topk_signal
from actors.xtok import TokenAligner, aligned_signal


class TeacherActor:
    def __init__(
        self,
        name: str,
        model: str,
        *,
        top_k: int,
        temperature: float,
        dtype: str = "auto",
        threads: int = 1,
        hidden_layers: tuple[int, ...] = (),
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        backend: str = "hf",
        max_model_len: int = 2048,
        replica: int = 0,
        student_tokenizer: str | None = None,
        judges: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """`student_tokenizer`: set for a teacher whose tokenizer differs from the student's
        (cross-tokenizer, see `actors/xtok.py`); its signals come in the student's vocab.
        `judges`: the judges this replica also serves with its own weights, by name
        (JudgeActor arguments), made here so a restarted replica serves them again."""
        torch.set_num_threads(threads)
        model = self.model_path = local_model(model)  # a known name: this node's copy
        student_tokenizer = student_tokenizer and local_model(student_tokenizer)
        self.name = name
        self.replica = replica
        self.served = {"calls": 0, "rows": 0, "judgments": 0}  # shards scored that had rows in them
        self.top_k = top_k
        self.temperature = temperature
        self.hidden_layers = tuple(hidden_layers)
        self.device = pick_device(want_gpu=True)
        torch_dtype = pick_dtype(dtype, self.device)
        where = "cpu" if backend == "vllm" else self.device  # vLLM: the GPU
        self.model = load_causal_lm(model, torch_dtype, torch.device(where)).eval()
        self.vocab_size = int(self.model.config.vocab_size)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model)
        except (OSError, ValueError):
            self.tokenizer = None  # token-only teachers (tests, synthetic data)
        if self.tokenizer is not None:  # embedding rows past the tokenizer are padding
            self.vocab_size = min(self.vocab_size, len(self.tokenizer))
        self.chunk = chunk_positions(self.vocab_size, 0, chunk_bytes)  # no gradients here
        self.aligner = None
        self.signal_vocab = self.vocab_size  # the vocab the signal's ids are in
        if student_tokenizer is not None:
            self._align_to(student_tokenizer, backend, max_model_len)
        self._info = {
            "name": name,
            "vocab_size": self.vocab_size,
            "num_params": sum(p.numel() for p in self.model.parameters()),
            "model_hash": model_hash(self.model),
            "tokenizer_hash": tokenizer_hash(self.tokenizer),
            "device": str(self.device),
            "backend": backend,
            "cross_tokenizer": student_tokenizer is not None,
        }
        self.judges = self._serve_judges(judges or {}, backend)
        self.vllm = None
        if backend == "vllm":
            self._serve_with_vllm(torch_dtype, max_model_len)

    def _serve_judges(
        self, judges: dict[str, dict[str, Any]], backend: str
    ) -> dict[str, JudgeActor]:
        """The judges this replica serves with its own model and tokenizer, by name."""
        weights = self.model.parameters()
        self._info["param_bytes"] = sum(p.numel() * p.element_size() for p in weights)
        if judges and backend != "hf":
            raise ValueError(f"teacher {self.name}: judges are served by the hf backend only")
        return {j: JudgeActor(j, None, host=self, **kw) for j, kw in judges.items()}

    def _align_to(self, student_tokenizer: str, backend: str, max_model_len: int) -> None:
        """Cross-tokenizer: score in the teacher's tokens, send in the student's."""
        if self.tokenizer is None or backend != "hf" or self.hidden_layers:
            raise ValueError(
                f"teacher {self.name}: cross-tokenizer scoring needs its tokenizer, the hf "
                f"backend and no hidden states"
            )
        student_tok = AutoTokenizer.from_pretrained(student_tokenizer)
        limit = getattr(self.model.config, "max_position_embeddings", None) or max_model_len
        self.aligner = TokenAligner(student_tok, self.tokenizer, min(max_model_len, limit))
        self.signal_vocab = len(student_tok)

    def _serve_with_vllm(self, dtype: torch.dtype, max_model_len: int) -> None:
        """Hand the weights to a vLLM engine (hashed and counted already)."""
        if self.hidden_layers:
            raise ValueError(f"teacher {self.name}: the vllm backend sends no hidden states")
        from actors.vllm_backend import VLLMEngine

        self.generation_config = self.model.generation_config  # the model goes below
        limit = getattr(self.model.config, "max_position_embeddings", None) or max_model_len
        del self.model  # vLLM holds the weights from now on
        self.vllm = VLLMEngine(
            self.model_path, dtype=dtype, max_model_len=min(max_model_len, limit), top_k=self.top_k
        )
        self.vllm.set_temperature(self.temperature)

    def node(self) -> dict[str, Any]:
        """The Ray node this replica runs on, its process and the model folder it loaded there
        (the run records where each actor landed, and which process served it)."""
        import ray

        node = ray.get_runtime_context().get_node_id()
        return {"node": node, "pid": os.getpid(), "model": self.model_path}

    def info(self) -> dict[str, Any]:
        return {**self._info, "served": dict(self.served), "replica": self.replica}

    def park(self) -> bool:
        """Kept for another run of the same driver: its per-run counts start again. False
        when Ray restarted this replica (the driver then kills it: its budget is spent)."""
        self.served = {"calls": 0, "rows": 0, "judgments": 0}
        for judge in self.judges.values():
            judge.last_busy_s, judge.failures = 0.0, 0
        return reusable()

    def yield_cpu(self, level: int) -> int:
        return yield_cpu(level)

    def judge(self, name: str, method: str, *args: Any) -> list[Any]:
        """A judgment by judge `name`, which this replica serves (JudgeActor's methods)."""
        self.served["judgments"] += len(args[0])
        return getattr(self.judges[name], method)(*args)

    def score(self, batch: TokenBatch, rows: list[int] | None = None) -> TeacherSignal:
        """Top-k log-probs (and chosen hidden states) at the loss positions of the shard, or
        of only its `rows` (examples routed to this teacher: nothing else is computed)."""
        if rows is not None:
            signal = self._score(batch.take(rows)) if rows else self._empty()
            signal.routed_rows = np.asarray(rows, dtype=np.int64)
        else:
            signal = self._score(batch)
        signal.replica = self.replica
        return signal

    def _empty(self) -> TeacherSignal:
        shape = (0, self.top_k)
        return TeacherSignal(
            teacher=self.name,
            ids=np.zeros(shape, dtype=id_dtype(self.signal_vocab)),
            logprobs=np.zeros(shape, dtype=np.float16),
            temperature=self.temperature,
        )

    @torch.inference_mode()
    def _score(self, batch: TokenBatch) -> TeacherSignal:
        """The decoder runs once; the vocab projection, log-softmax and top-k run over chunks
        of loss positions on the teacher's device, so no [positions, vocab] tensor exists."""
        self.served["calls"] += 1
        self.served["rows"] += len(batch)
        start, cpu_start = time.perf_counter(), time.process_time()
        if self.aligner is not None:
            signal = aligned_signal(
                self.aligner,
                self.model,
                batch,
                top_k=self.top_k,
                temperature=self.temperature,
                teacher=self.name,
                vocab_size=self.vocab_size,
                signal_vocab=self.signal_vocab,
                chunk=self.chunk,
            )
            signal.busy_s = time.perf_counter() - start
            signal.cpu_s = time.process_time() - cpu_start
            return signal
        if self.vllm is not None:
            top_ids, top_lp = self.vllm.topk(batch, self.top_k)
            signal = TeacherSignal(
                teacher=self.name,
                ids=top_ids.astype(id_dtype(self.vocab_size)),
                logprobs=top_lp.astype(np.float16),
                temperature=self.temperature,
            )
            signal.busy_s = time.perf_counter() - start
            signal.cpu_s = time.process_time() - cpu_start
            return signal
        ids, attn, mask = batch.to_torch(self.device)
        out = backbone(self.model)(
            input_ids=ids, attention_mask=attn, output_hidden_states=bool(self.hidden_layers)
        )
        signal = topk_signal(
            out.last_hidden_state[mask],
            output_head(self.model),
            k=self.top_k,
            temperature=self.temperature,
            teacher=self.name,
            vocab_size=self.vocab_size,
            chunk=self.chunk,
        )
        states = {i: out.hidden_states[i][mask].float().cpu() for i in self.hidden_layers}
        signal.hidden = HiddenStates({i: h.numpy().astype(np.float16) for i, h in states.items()})
        signal.busy_s = time.perf_counter() - start
        signal.cpu_s = time.process_time() - cpu_start
        return signal

    def generate(self, prompts: list[str], sampling: dict[str, Any]) -> list[dict[str, str]]:
        """Responses written by the teacher, each with why it ended: "stop" (an end-of-turn
        or EOS id was generated) or "length" (max_new_tokens was hit), so the data stream
        teaches the end of a turn only where the teacher really ended one."""
        if self.tokenizer is None:
            raise ValueError(f"teacher {self.name} has no tokenizer, it cannot write text")
        if not prompts:
            return []
        tok = self.tokenizer
        config = self.generation_config if self.vllm is not None else self.model.generation_config
        stops = stop_token_ids(config.eos_token_id, tok)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (stops or [0])[0]
        add = adds_bos(tok)
        rows = [render_prompt_ids(tok, p, add) for p in prompts]
        if self.vllm is not None:
            written = self._generate_vllm(rows, sampling, stops)
        else:
            written = _generate_hf(self.model, rows, sampling, stops, pad, self.device)
        results = []
        for row in written:
            kept, reason = split_finish(row, stops)
            text = tok.decode(kept, skip_special_tokens=True).strip()
            results.append({"response": text, "finish_reason": reason})
        return results

    def _generate_vllm(
        self, rows: list[list[int]], sampling: dict[str, Any], stops: list[int]
    ) -> list[list[int]]:
        """The same as the transformers path, with vLLM sampling at T = 1 scale (the
        scoring temperature is taken off while writing) and one seed per prompt."""
        assert self.vllm is not None
        scoring_t = self.vllm.temperature
        self.vllm.set_temperature(1.0)
        try:
            seed = int(sampling.get("seed", 0))
            samples = self.vllm.sample(
                [np.asarray(r) for r in rows],
                [seed * 100003 + i for i in range(len(rows))],
                {
                    "temperature": float(sampling.get("temperature", 0.0)),
                    "top_p": float(sampling.get("top_p", 1.0)),
                    "max_new_tokens": int(sampling.get("max_new_tokens", 64)),
                },
                stops,
            )
        finally:
            self.vllm.set_temperature(scoring_t)
        return [list(sample.response) for sample in samples]


@torch.inference_mode()
def _generate_hf(
    model: Any,
    rows: list[list[int]],
    sampling: dict[str, Any],
    stops: list[int],
    pad: int,
    device: torch.device,
) -> list[list[int]]:
    """The new ids of each prompt row, written by transformers' generate (seeded)."""
    ids, attn = left_pad(rows, pad, device)
    torch.manual_seed(int(sampling.get("seed", 0)))
    temperature = float(sampling.get("temperature", 0.0))
    out = model.generate(
        input_ids=ids,
        attention_mask=attn,
        max_new_tokens=int(sampling.get("max_new_tokens", 64)),
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=float(sampling.get("top_p", 1.0)) if temperature > 0 else None,
        top_k=None,
        pad_token_id=pad,
        eos_token_id=stops or None,
    )
    return out[:, ids.shape[1] :].tolist()
