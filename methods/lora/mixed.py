"""Mixed-batch inference: every row of the batch through its own adapter, in two batched matmuls.

Hugging Face PEFT loops over the adapters present in the batch (one gather, two matmuls and one
scatter each). Here every adapter's A and B are stacked once (cached until the weights change),
zero-padded to the largest rank with the scaling folded into B, and each row picks its slice:
``delta = bmm(bmm(x, A[row].T), B[row].T)``. Rows named ``__base__`` (or adapters this layer does not
hold) use an all-zero slot.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from peft_core.runtime import Routing

if TYPE_CHECKING:
    from .layers import LoraLinear

__all__ = ["mixed_linear"]


def _stacks(layer: LoraLinear, present: tuple[str, ...], dtype: torch.dtype,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    versions = tuple((layer.lora_A[n].weight._version, layer.lora_B[n].weight._version,
                      id(layer.lora_A[n].weight), id(layer.lora_B[n].weight)) for n in present)
    key = (present, dtype, device, versions)
    cache = layer.__dict__.get("_mixed_cache")
    if cache is not None and cache[0] == key:
        return cache[1], cache[2]
    rmax = max(layer.r[n] for n in present)
    a_stack = torch.zeros(len(present) + 1, rmax, layer.in_features, dtype=dtype, device=device)
    b_stack = torch.zeros(len(present) + 1, layer.out_features, rmax, dtype=dtype, device=device)
    with torch.no_grad():
        for i, n in enumerate(present, start=1):
            r = layer.r[n]
            a_stack[i, :r] = layer.lora_A[n].weight.to(dtype)
            b_stack[i, :, :r] = layer.lora_B[n].weight.to(dtype) * layer.scaling[n]
    layer.__dict__["_mixed_cache"] = (key, a_stack, b_stack)
    return a_stack, b_stack


def mixed_linear(layer: LoraLinear, x: torch.Tensor, routing: Routing, result: torch.Tensor) -> torch.Tensor:
    # checked before anything else: a routing that names no adapter of this layer must not hide a wrong length
    if len(routing.names) != x.shape[0]:
        from peft_core.errors import AdapterError

        raise AdapterError(f"adapter_names has {len(routing.names)} entries but the batch has {x.shape[0]} rows")
    present = tuple(n for n in dict.fromkeys(routing.names) if n in layer.r)
    if not present:
        return result
    index_key = ("lora_rows", present, x.device)
    rows = routing.cache.get(index_key)
    if rows is None:
        slot = {n: i for i, n in enumerate(present, start=1)}
        rows = torch.tensor([slot.get(n, 0) for n in routing.names], device=x.device)
        routing.cache[index_key] = rows
    a_stack, b_stack = _stacks(layer, present, x.dtype, x.device)
    x3 = x.reshape(x.shape[0], -1, x.shape[-1])
    h = torch.bmm(x3, a_stack[rows].transpose(1, 2))
    delta = torch.bmm(h, b_stack[rows].transpose(1, 2))
    return result + delta.view(result.shape).to(result.dtype)
