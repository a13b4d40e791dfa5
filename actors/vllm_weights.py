"""Loading the student's new weights into a running vLLM engine on CPU, in place.

vLLM's own `reload_weights` rebuilds every layer: each is put back on the meta device,
allocated again, loaded, processed (on CPU: its GEMM weights packed for oneDNN), and copied
back: several copies of the model per sync, most of the sync. Here each checkpoint tensor
is copied straight into memory the engine already holds, then each linear layer's packed
weight is rebuilt from it (the packing is the only work the CPU kernels need redone):

- plain parameters (norms, embeddings): `copy_` into the parameter;
- linear layers, whose unpacked weight vLLM frees after packing: a full-size buffer per
  layer beside the (empty) parameter, allocated at the first sync and reused by every later
  one; fused layers (qkv_proj, gate_up_proj) take each checkpoint part (q/k/v, gate/up)
  into its rows, at the offsets of the layer's `output_sizes`;
- then the layer's GEMM is dispatched again from the buffer, and the parameter is left
  empty as vLLM left it, so `reload_weights` still works afterwards.

Only for architectures whose checkpoint names map onto vLLM's modules one to one, apart
from the fused parts (`IN_PLACE_ARCHITECTURES`), and only when a snapshot fills every
parameter and every row of every buffer. Anything else (another architecture, a GPU, a
missing part) returns False, and the caller uses `reload_weights`.
"""

from __future__ import annotations

from typing import Any

import torch

IN_PLACE_ARCHITECTURES = ("LlamaForCausalLM",)
Slot = tuple[str, tuple[int, int] | None, torch.Tensor]  # (parameter name, rows, source)


def load_in_place(worker: Any, items: list[tuple[str, torch.Tensor]]) -> bool:
    """Run on the engine's worker (collective_rpc). True if the weights were loaded here,
    False if nothing was changed and `reload_weights` must do it."""
    from vllm.platforms import current_platform

    model = worker.model_runner.get_model()
    if not current_platform.is_cpu() or type(model).__name__ not in IN_PLACE_ARCHITECTURES:
        return False
    plan = _plan(model, items)
    if plan is None:
        return False
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    packed = _packed_layers(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, rows, tensor in plan:
            owner = name.rpartition(".")[0]
            if owner in packed and name.endswith(".weight"):
                target = _buffer(packed[owner])
            else:
                target = params[name].data
            lo, hi = rows if rows is not None else (0, tensor.shape[0] if tensor.dim() else 0)
            (target[lo:hi] if tensor.dim() else target).copy_(tensor)
        for layer in packed.values():  # pack again from the unpacked weight
            kept = layer.weight
            freed = tuple(kept.shape) != _full_shape(layer)
            if freed:  # vLLM's own reload expects the freed (empty) weight: it stays so
                layer.weight = torch.nn.Parameter(layer._raydistill_unpacked, False)
            dispatch_cpu_unquantized_gemm(layer, remove_weight=freed)
    return True


def _packed_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The modules whose GEMM runs from a packed copy of their weight (`cpu_linear`)."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "cpu_linear")}


def _full_shape(layer: torch.nn.Module) -> tuple[int, int]:
    """The unpacked weight's shape (linear layers free it after packing; embeddings keep
    it, padded to their partition's rows)."""
    if hasattr(layer, "output_size_per_partition"):
        return int(layer.output_size_per_partition), int(layer.input_size_per_partition)
    return tuple(layer.weight.shape)  # type: ignore[return-value]


def _buffer(layer: torch.nn.Module) -> torch.Tensor:
    """The layer's unpacked weight: the parameter itself while vLLM keeps it, else a buffer
    of the full size beside the freed parameter, made at the first sync and reused."""
    shape = _full_shape(layer)
    if tuple(layer.weight.shape) == shape:
        return layer.weight.data
    buffer = getattr(layer, "_raydistill_unpacked", None)
    if buffer is None:
        buffer = torch.empty(shape, dtype=layer.weight.dtype)
        layer._raydistill_unpacked = buffer
    return buffer


def _plan(model: torch.nn.Module, items: list[tuple[str, torch.Tensor]]) -> list[Slot] | None:
    """Where each checkpoint tensor goes, or None if one has no place, or if the snapshot
    leaves a row of a parameter or buffer unwritten. Changes nothing."""
    parts = {
        part: (fused, i)
        for fused, names in getattr(model, "packed_modules_mapping", {}).items()
        for i, part in enumerate(names)
    }
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    modules = dict(model.named_modules())
    packed = _packed_layers(model)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    shapes.update({f"{n}.weight": _full_shape(m) for n, m in packed.items()})
    plan: list[Slot] = []
    filled: dict[str, int] = {}  # destination -> rows written
    for name, tensor in items:
        owner, _, leaf = name.rpartition(".")
        parent, _, short = owner.rpartition(".")
        rows = None
        if short in parts:  # q_proj -> its rows of qkv_proj
            fused, i = parts[short]
            owner = f"{parent}.{fused}" if parent else fused
            sizes = getattr(modules.get(owner), "output_sizes", None)
            if sizes is None or leaf != "weight":
                return None
            rows = (sum(sizes[:i]), sum(sizes[: i + 1]))
            name = f"{owner}.weight"
        elif name == "lm_head.weight" and tied and name not in shapes:
            continue  # the embedding's own, which the snapshot carries too
        shape = shapes.get(name)
        if shape is None:
            return None
        want = tuple(tensor.shape)
        if rows is None and len(shape) == 2 and want[1:] == shape[1:] and want[0] <= shape[0]:
            rows = (0, want[0])  # an embedding padded to the partition: its first rows
        if rows is not None and want != (rows[1] - rows[0], *shape[1:]):
            return None
        if rows is None and want != shape:
            return None
        plan.append((name, rows, tensor))
        written = rows[1] - rows[0] if rows else (shape[0] if shape else 1)
        filled[name] = filled.get(name, 0) + written
    for name, shape in shapes.items():
        if filled.get(name, 0) < _used_rows(modules, name, shape):
            return None  # it would keep its old values (or an empty buffer's)
    return plan


def _used_rows(modules: dict[str, torch.nn.Module], name: str, shape: tuple) -> int:
    """Rows of a parameter that hold weights: an embedding's padding rows hold none."""
    if not shape:
        return 1
    layer = modules.get(name.rpartition(".")[0])
    return int(getattr(layer, "org_vocab_size", shape[0]))
