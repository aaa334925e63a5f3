"""Merge a delta into a weight so that unmerging restores the original bits exactly.

``W + delta - delta`` is not ``W`` in floating point (PEFT's bf16 round trip drifts ~1e-4 per cycle).
Instead of subtracting, we remember which bits the merge changed: ``old = new XOR x`` is exact. Most
changes touch only the low bits, so ``x`` is kept as its low byte(s) plus a sparse list of the
elements whose change reaches higher bits: about a quarter to a half of the weight's size, not a copy.
"""

from __future__ import annotations

from typing import Any

import torch
from peft_core.errors import MergeError

__all__ = ["fold", "unfold"]

_INT = {torch.float32: (torch.int32, torch.int16, 0xFFFF), torch.bfloat16: (torch.int16, torch.uint8, 0xFF),
        torch.float16: (torch.int16, torch.uint8, 0xFF), torch.float64: (torch.int64, torch.int32, 0xFFFFFFFF)}


def fold(weight: torch.Tensor, delta: torch.Tensor, *, safe: bool, where: str = "") -> Any:
    """Add ``delta`` to ``weight`` in place; return what :func:`unfold` needs to undo it exactly."""
    new = (weight.detach().float() + delta.to(weight.device)).to(weight.dtype)
    if safe and not torch.isfinite(new).all():
        raise MergeError(f"safe_merge: merging adapter {where!r} would put NaN/Inf into the weights; "
                         "the model was not changed")
    if weight.dtype not in _INT:
        raise MergeError(f"cannot merge into a {weight.dtype} weight")
    int_t, low_t, mask = _INT[weight.dtype]
    xor = torch.bitwise_xor(new.view(int_t), weight.detach().view(int_t)).reshape(-1)
    low = torch.bitwise_and(xor, mask).to(low_t)
    high_idx = torch.nonzero(torch.bitwise_and(xor, ~mask)).squeeze(1)
    weight.data.copy_(new)
    return (low, high_idx, xor[high_idx].clone())


def unfold(weight: torch.Tensor, token: Any) -> None:
    low, high_idx, high_val = token
    int_t, _, mask = _INT[weight.dtype]
    xor = torch.bitwise_and(low.to(int_t), mask)
    xor[high_idx] = high_val
    restored = torch.bitwise_xor(weight.detach().view(int_t).reshape(-1), xor)
    weight.data.copy_(restored.view(weight.dtype).view(weight.shape))
