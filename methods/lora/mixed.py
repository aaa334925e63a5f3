"""Mixed-batch inference: every row of the batch through its own adapter, in two batched matmuls.

Hugging Face PEFT loops over the adapters present in the batch (one gather, two matmuls and one
scatter each, per layer). Here the rows are grouped by adapter once per call (the index is shared by
every layer of the call), each layer's adapters are stacked once (cached until their weights change;
zero-padded to the largest rank, the scaling folded into B), and one ``bmm`` pair runs all groups:
``delta[k] = x[rows of k] @ A_k.T @ B_k.T``. Only activations are gathered — never a copy of the
adapter weights per row, which cost more than the maths when decoding. Rows named ``__base__`` (or an
adapter this layer does not hold) get no delta.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from peft_core.runtime import Routing

from .hardware import choices as kernel_choices

if TYPE_CHECKING:
    from .layers import LoraLinear

__all__ = ["mixed_linear"]


def _stacks(layer: LoraLinear, present: tuple[str, ...], dtype: torch.dtype,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(A: k+1 x r_max x in, B transposed: k+1 x r_max x out) for the adapters ``present`` and a zero slot, scaling
    folded into B;
    cached until the layer's adapters change (generation) or a weight is written (tensor versions)."""
    cache = layer.__dict__.get("_mixed_cache")
    key = (present, dtype, device, layer._generation)
    if cache is not None and cache[0] == key and [p._version for p in cache[3]] == cache[4]:
        return cache[1], cache[2]
    rmax = max(layer.r[n] for n in present)
    # one extra all-zero slot at the end, for rows that get no delta (the per-row route)
    a_stack = torch.zeros(len(present) + 1, rmax, layer.in_features, dtype=dtype, device=device)
    # B is kept transposed (r_max x out per adapter, contiguous): a batched product with a transposed operand ran
    # 2.8x slower on CPU (16 adapters, 2 rows each, 16 -> 1376: 56 vs 20 us)
    bt_stack = torch.zeros(len(present) + 1, rmax, layer.out_features, dtype=dtype, device=device)
    params = []
    with torch.no_grad():
        for i, n in enumerate(present):
            r = layer.r[n]
            a, b = layer.lora_A[n].weight, layer.lora_B[n].weight
            a_stack[i, :r] = a.to(dtype)
            bt_stack[i, :r] = b.t().to(dtype) * layer.scaling[n]
            params += [a, b]
    layer.__dict__["_mixed_cache"] = (key, a_stack, bt_stack, params, [p._version for p in params])
    return a_stack, bt_stack


def _groups(routing: Routing, present: tuple[str, ...],
            device: torch.device) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row grouping shared by all layers of one call: (rows per group G, gather index (k*G) with padding
    slots pointing at row 0, the real slots' positions in that index, and their destination rows)."""
    key = ("lora_groups", present, device)
    found = routing.cache.get(key)
    if found is None:
        members = [[i for i, n in enumerate(routing.names) if n == name] for name in present]
        width = max(len(m) for m in members)
        gather, slots, dest = [], [], []
        for k, rows in enumerate(members):
            for j in range(width):
                gather.append(rows[j] if j < len(rows) else 0)
                if j < len(rows):
                    slots.append(k * width + j)
                    dest.append(rows[j])
        found = (width, torch.tensor(gather, device=device), torch.tensor(slots, device=device),
                 torch.tensor(dest, device=device))
        routing.cache[key] = found
    return found


def _per_row(routing: Routing, present: tuple[str, ...], x: torch.Tensor, a_stack: torch.Tensor,
             bt_stack: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """Each row gathers its adapter's slot of the stacks (the last slot is all zeros: ``__base__`` rows
    and adapters this layer lacks), then one bmm pair runs every row."""
    key = ("lora_rows", present, x.device)
    slot = routing.cache.get(key)
    if slot is None:
        index = {n: i for i, n in enumerate(present)}
        slot = torch.tensor([index.get(n, len(present)) for n in routing.names], device=x.device)
        routing.cache[key] = slot
    x3 = x.reshape(x.shape[0], -1, x.shape[-1])
    delta = torch.bmm(torch.bmm(x3, a_stack[slot].transpose(1, 2)), bt_stack[slot])
    return result + delta.view(result.shape).to(result.dtype)


def mixed_linear(layer: LoraLinear, x: torch.Tensor, routing: Routing, result: torch.Tensor) -> torch.Tensor:
    # checked before anything else: a routing that names no adapter of this layer must not hide a wrong length
    if len(routing.names) != x.shape[0]:
        from peft_core.errors import AdapterError

        raise AdapterError(f"adapter_names has {len(routing.names)} entries but the batch has {x.shape[0]} rows")
    # which of the call's adapters this layer holds: the same answer for every layer holding the same
    # adapters, so it is computed once per call and layer generation, not per layer (decoding is
    # dominated by such per-layer work)
    held_key = ("lora_present", tuple(layer.r))
    present = routing.cache.get(held_key)
    if present is None:
        present = tuple(n for n in dict.fromkeys(routing.names) if n in layer.r)
        routing.cache[held_key] = present
    if not present:
        return result
    a_stack, bt_stack = _stacks(layer, present, x.dtype, x.device)
    rows = x.shape[0]
    tokens = x.numel() // (rows * x.shape[-1])
    # from some tokens per row (prefill) gathering each row's A and B beats grouping rows by adapter; where,
    # depends on the device (hardware.py's table)
    if tokens >= kernel_choices(x.device, x.dtype).per_row_min_tokens:
        return _per_row(routing, present, x, a_stack, bt_stack, result)
    width, gather, slots, dest = _groups(routing, present, x.device)
    grouped = x.reshape(rows, tokens, x.shape[-1]).index_select(0, gather)
    grouped = grouped.view(len(present), width * tokens, x.shape[-1])
    k = len(present)
    delta = torch.bmm(torch.bmm(grouped, a_stack[:k].transpose(1, 2)), bt_stack[:k])
    delta = delta.view(len(present) * width, tokens, -1).index_select(0, slots)
    out = result.reshape(rows, tokens, -1).index_add(0, dest, delta.to(result.dtype))
    return out.view(result.shape)
