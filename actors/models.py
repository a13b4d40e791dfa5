"""Loading, shrinking and fingerprinting causal LMs, shared by teachers and students."""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PreTrainedModel


def pick_device(want_gpu: bool) -> torch.device:
    return torch.device("cuda") if want_gpu and torch.cuda.is_available() else torch.device("cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` means bf16 where the device supports it, else float32 (CPU training stays fp32)."""
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_causal_lm(path: str, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device)


def keep_layers(model: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """A student initialised from a teacher: the same embeddings, norm and head, and only the
    chosen decoder layers (DistilBERT-style), so it starts close to the teacher."""
    student = copy.deepcopy(model)
    decoder = student.get_decoder()
    decoder.layers = torch.nn.ModuleList([decoder.layers[i] for i in layers])
    for new_idx, layer in enumerate(decoder.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_idx
    student.config.num_hidden_layers = len(layers)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in layers]
    return student


def tiny_llama_config(vocab_size: int = 96, hidden: int = 32, layers: int = 2) -> LlamaConfig:
    """A Llama config small enough for tests and CPU benchmarks."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )


def save_tiny_llama(path: str, seed: int, **config_kwargs: int) -> str:
    """Build a randomly initialised tiny Llama from a config in code and save it as HF."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(**config_kwargs))
    model.save_pretrained(path)
    return path


def vocab_size_of(path: str) -> int:
    return int(AutoConfig.from_pretrained(path).vocab_size)


def model_hash(model: torch.nn.Module) -> str:
    """Content hash of the weights and config: a cache or a resume can tell two models apart."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        h.update(json.dumps(config.to_diff_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def tokenizer_hash(tokenizer: Any) -> str:
    """Hash of the vocabulary; None-safe for token-only data with no tokenizer."""
    if tokenizer is None:
        return "none"
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
