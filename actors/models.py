"""Loading, shrinking and fingerprinting causal LMs, shared by teachers and students."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
)


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


def cut_config(config: PretrainedConfig, layers: list[int] | None) -> PretrainedConfig:
    """The config of a student that keeps only `layers` of the model (DistilBERT-style)."""
    config = config.__class__.from_dict(config.to_dict())
    if layers:
        config.num_hidden_layers = len(layers)
        if getattr(config, "layer_types", None):
            config.layer_types = [config.layer_types[i] for i in layers]
    if hasattr(config, "use_cache"):
        config.use_cache = False
    return config


def every_nth_layers(num_layers: int, n: int) -> list[int]:
    """Layers 0, n, 2n, ... below `num_layers`, and always the last one: the first and last
    blocks matter most (embedding side, output side), the middle is the most redundant."""
    if num_layers < 1 or n < 1:
        raise ValueError(f"every {n}th of {num_layers} layers")
    kept = list(range(0, num_layers, n))
    return kept if kept[-1] == num_layers - 1 else [*kept, num_layers - 1]


def _source_key(name: str, layers: list[int] | None) -> str:
    """Student parameter name -> the name it has in the source checkpoint."""
    if not layers:
        return name
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if parts[i] == "layers" and parts[i + 1].isdigit():
            parts[i + 1] = str(layers[int(parts[i + 1])])
            break
    return ".".join(parts)


def _weight_files(path: str) -> list[Path]:
    folder = Path(path)
    if not folder.is_dir():  # a hub name: fetch the files (only where a hub is reachable)
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors"]))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no .safetensors weights to build the student from")
    return files


def build_student(
    path: str,
    layers: list[int] | None,
    *,
    init_context: AbstractContextManager | None = None,
    gather: Callable[[torch.nn.Parameter], AbstractContextManager] | None = None,
    is_writer: bool = True,
) -> PreTrainedModel:
    """The student built from its config and filled tensor by tensor from the checkpoint.

    No full copy of the model is ever made: under ZeRO-3 `init_context` is
    `deepspeed.zero.Init` (each rank holds only its partition) and `gather` gathers one
    parameter at a time so that rank 0 (`is_writer`) can copy the checkpoint's tensor in.
    Only the kept decoder layers are read from disk.
    """
    from safetensors import safe_open

    config = cut_config(AutoConfig.from_pretrained(path), layers)
    with init_context or nullcontext():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with ExitStack() as stack:
        where = {}  # tensor name -> the open file holding it
        for f in _weight_files(path):
            handle = stack.enter_context(safe_open(str(f), framework="pt"))
            where.update({k: handle for k in handle.keys()})
        for name, param in model.named_parameters():  # tied weights appear once
            key = _source_key(name, layers)
            if key not in where:
                raise ValueError(f"{path}: checkpoint has no tensor {key!r} for {name!r}")
            with gather(param) if gather else nullcontext():
                if is_writer:
                    with torch.no_grad():
                        param.data.copy_(where[key].get_tensor(key).to(param.dtype))
    return model


def backbone(model: PreTrainedModel) -> torch.nn.Module:
    """The decoder stack: hidden states after the final norm, no vocab projection."""
    return model.get_decoder()


def output_head(model: PreTrainedModel) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden [N, H] -> logits [N, V], exactly as the model's own forward computes them, so
    the vocab projection can run over chunks of positions (never [all positions, V])."""
    head = model.get_output_embeddings()
    finish = _logit_transform(model.config)
    return lambda hidden: finish(head(hidden))


def _logit_transform(config: PretrainedConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """What a model does to its head's output: scaling and soft-capping, where it says."""
    cfg = getattr(config, "get_text_config", lambda: config)()
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)  # Cohere multiplies
    divide = getattr(cfg, "logits_scaling", None)  # Granite divides

    def apply(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if divide is not None:
            logits = logits / divide
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return apply


def frozen_head(
    path: str, device: torch.device, dtype: torch.dtype, vocab: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A model's output head alone (its lm_head, or the tied input embeddings), frozen, cut
    to the first `vocab` rows (rows past a shared tokenizer are padding): what a rank needs
    to turn a teacher's final normalised hidden state into its exact logits."""
    from safetensors import safe_open

    config = AutoConfig.from_pretrained(path)
    text = config.get_text_config()
    tied = getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False))
    where = {}  # tensor name -> its file
    for f in _weight_files(path):
        with safe_open(str(f), framework="pt") as handle:
            where.update({k: f for k in handle.keys()})
    names = ["lm_head.weight"] if not tied and "lm_head.weight" in where else []
    names += sorted(k for k in where if k.endswith("embed_tokens.weight"))
    if not names:
        raise ValueError(f"{path}: no lm_head or embed_tokens weight for the teacher's head")
    with safe_open(str(where[names[0]]), framework="pt") as handle:
        weight = handle.get_tensor(names[0])
    if weight.shape[0] < vocab:
        raise ValueError(f"{path}: head of {weight.shape[0]} rows, the student's vocab {vocab}")
    weight = weight[:vocab].to(device=device, dtype=dtype).requires_grad_(False)
    finish = _logit_transform(config)
    return lambda hidden: finish(F.linear(hidden.to(weight.dtype), weight))


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
