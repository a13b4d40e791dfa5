"""TeacherActor: one teacher replica (transformers backend) inside a Ray actor.

It turns token shards into TeacherSignals (exact temperature-scaled top-k from the full
logits, which never leave the actor) and writes responses for knowledge elicitation.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer

from actors.batch import TokenBatch
from actors.models import load_causal_lm, model_hash, pick_device, pick_dtype, tokenizer_hash
from actors.signal import TeacherSignal, topk_signal


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
    ) -> None:
        torch.set_num_threads(threads)
        self.name = name
        self.top_k = top_k
        self.temperature = temperature
        self.hidden_layers = tuple(hidden_layers)
        self.device = pick_device(want_gpu=True)
        self.model = load_causal_lm(model, pick_dtype(dtype, self.device), self.device).eval()
        self.vocab_size = int(self.model.config.vocab_size)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model)
        except (OSError, ValueError):
            self.tokenizer = None  # token-only teachers (tests, synthetic data)
        self._info = {
            "name": name,
            "vocab_size": self.vocab_size,
            "num_params": sum(p.numel() for p in self.model.parameters()),
            "model_hash": model_hash(self.model),
            "tokenizer_hash": tokenizer_hash(self.tokenizer),
            "device": str(self.device),
        }

    def info(self) -> dict[str, Any]:
        return dict(self._info)

    @torch.inference_mode()
    def score(self, batch: TokenBatch) -> TeacherSignal:
        """Top-k log-probs (and chosen hidden states) at the shard's loss positions."""
        start = time.perf_counter()
        ids, attn, mask = batch.to_torch(self.device)
        cols = torch.from_numpy(batch.loss_columns()).to(self.device)
        out = self.model(
            input_ids=ids,
            attention_mask=attn,
            logits_to_keep=cols,
            output_hidden_states=bool(self.hidden_layers),
        )
        logits = out.logits[mask[:, cols]][:, : self.vocab_size]  # [P, V], loss positions only
        signal = topk_signal(
            logits.cpu(),
            k=self.top_k,
            temperature=self.temperature,
            teacher=self.name,
            vocab_size=self.vocab_size,
        )
        for layer in self.hidden_layers:
            hidden = out.hidden_states[layer][mask]
            signal.hidden[layer] = hidden.float().cpu().numpy().astype(np.float16)
        signal.busy_s = time.perf_counter() - start
        return signal

    @torch.inference_mode()
    def generate(self, prompts: list[str], sampling: dict[str, Any]) -> list[str]:
        """Responses written by the teacher (chat template when the tokenizer has one)."""
        if self.tokenizer is None:
            raise ValueError(f"teacher {self.name} has no tokenizer, it cannot write text")
        tok = self.tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            if tok.chat_template
            else p
            for p in prompts
        ]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        torch.manual_seed(int(sampling.get("seed", 0)))
        temperature = float(sampling.get("temperature", 0.0))
        out = self.model.generate(
            **enc,
            max_new_tokens=int(sampling.get("max_new_tokens", 64)),
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_p=float(sampling.get("top_p", 1.0)) if temperature > 0 else None,
            top_k=None,
            pad_token_id=tok.pad_token_id,
        )
        new = out[:, enc["input_ids"].shape[1] :]
        return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
