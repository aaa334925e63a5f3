"""Exact merge and unmerge: fold an adapter into a weight so that taking it out restores the original bits.

``W + delta - delta`` is not ``W`` in floating point (a bf16 round trip drifts ~1e-4 per cycle), and
``W * s / s`` is not ``W`` either. Instead of inverting the arithmetic, :func:`replace_exactly` remembers
which *bits* the replacement changed: ``old = new XOR x`` holds exactly, whatever the transform was. Most
merges touch only the low bits of each element, so ``x`` is kept as its low byte(s) plus a sparse list of
the elements whose change reaches higher bits — about a quarter to a half of the weight's size, not a copy.

Any method plugin uses these (LoRA adds a low-rank product, (IA)^3 multiplies by a vector)::

    from peft_core.merging import check_finite, restore_exactly, replace_exactly

    new = (weight.float() * scale).to(weight.dtype)      # the merged value, nothing changed yet
    check_finite(new, adapter_name, path)                # safe_merge: MergeError, model untouched
    token = replace_exactly(weight, new)                 # writes new, returns the restore data
    ...
    restore_exactly(weight, token)                       # the original bits, whatever new was

Merges must be undone newest first (the core calls ``unmerge`` in that order), since each token
describes the change from the weight *as it was* when the merge ran.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .errors import MergeError

__all__ = ["RestoreToken", "added_exactly", "check_finite", "merge_all_or_nothing", "replace_exactly",
           "restore_exactly", "unmerge_all"]

#: float dtype -> (same-size int view, low-part int type, low-part mask)
_INT = {torch.float32: (torch.int32, torch.int16, 0xFFFF), torch.bfloat16: (torch.int16, torch.uint8, 0xFF),
        torch.float16: (torch.int16, torch.uint8, 0xFF), torch.float64: (torch.int64, torch.int32, 0xFFFFFFFF)}


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class RestoreToken:
    """What :func:`restore_exactly` needs, in the smallest of three forms: the XOR of old and new bits as
    low byte(s) plus sparse high changes; the few elements where an inverse transform misses (when the
    merge gave one, as (IA)^3's division does); or, when neither is smaller, the whole XOR."""

    __slots__ = ("index", "inverse", "low", "values", "xor")

    def __init__(self, *, low: torch.Tensor | None = None, index: torch.Tensor | None = None,
                 values: torch.Tensor | None = None, xor: torch.Tensor | None = None,
                 inverse: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.low, self.index, self.values, self.xor, self.inverse = low, index, values, xor, inverse

    @property
    def nbytes(self) -> int:
        """Memory held to make the restore exact."""
        return _nbytes(self.low, self.index, self.values, self.xor)


def check_finite(new: torch.Tensor, adapter_name: str, where: str = "") -> None:
    """``safe_merge``: raise :class:`MergeError` if the merged value ``new`` holds NaN or Inf."""
    if not torch.isfinite(new).all():
        place = f" into {where}" if where else ""
        raise MergeError(f"safe_merge: adapter {adapter_name!r} would put NaN/Inf{place}; the model was not changed")


def replace_exactly(weight: torch.Tensor, new: torch.Tensor, *,
                    inverse: Callable[[torch.Tensor], torch.Tensor] | None = None) -> RestoreToken:
    """Write ``new`` (same shape; cast to ``weight``'s dtype) into ``weight`` in place and return the token
    that :func:`restore_exactly` turns back into the original bits.

    ``inverse``: optionally, a function from the merged tensor back to (nearly) the original — for
    multiplicative merges, whose bit changes reach every element's exponent and mantissa, the few elements
    it misses are cheaper to keep than the XOR.
    """
    if weight.is_meta:
        raise MergeError("cannot merge on the meta device: load real weights first")
    if weight.dtype not in _INT:
        raise MergeError(f"cannot merge exactly into a {weight.dtype} weight (supported: "
                         f"{', '.join(str(d) for d in _INT)})")
    new = new.to(device=weight.device, dtype=weight.dtype)
    int_t, low_t, mask = _INT[weight.dtype]
    index_t = torch.int32 if weight.numel() < 2**31 else torch.int64
    with torch.no_grad():
        old = weight.detach().view(int_t).reshape(-1)
        xor = torch.bitwise_xor(new.view(int_t).reshape(-1), old)
        high = torch.nonzero(torch.bitwise_and(xor, ~mask)).squeeze(1)
        token = RestoreToken(low=torch.bitwise_and(xor, mask).to(low_t), index=high.to(index_t), values=xor[high])
        if inverse is not None:
            back = inverse(new).to(weight.dtype).reshape(-1).view(int_t)
            miss = torch.nonzero(back != old).squeeze(1)
            if _nbytes(miss.to(index_t)) + miss.numel() * old.element_size() < token.nbytes:
                token = RestoreToken(index=miss.to(index_t), values=old[miss].clone(), inverse=inverse)
        if token.nbytes >= xor.numel() * xor.element_size():
            token = RestoreToken(xor=xor)
        weight.data.copy_(new)
    return token


def restore_exactly(weight: torch.Tensor, token: RestoreToken) -> None:
    """Undo :func:`replace_exactly` on ``weight``, bit for bit."""
    int_t, _, mask = _INT[weight.dtype]
    with torch.no_grad():
        if token.inverse is not None:
            assert token.index is not None and token.values is not None
            restored = token.inverse(weight.detach()).to(weight.dtype).reshape(-1).view(int_t).clone()
            restored[token.index.long()] = token.values
        else:
            if token.xor is not None:
                xor = token.xor
            else:
                assert token.low is not None and token.index is not None and token.values is not None
                xor = torch.bitwise_and(token.low.to(int_t), mask)
                xor[token.index.long()] = token.values
            restored = torch.bitwise_xor(weight.detach().view(int_t).reshape(-1), xor)
        weight.data.copy_(restored.view(weight.dtype).view(weight.shape))


def added_exactly(weight: torch.Tensor, delta: torch.Tensor, *, safe: bool, adapter_name: str = "",
                  where: str = "") -> RestoreToken:
    """``weight += delta`` (computed in fp32, rounded once), reversibly; ``safe`` checks first."""
    new = (weight.detach().float() + delta.to(weight.device)).to(weight.dtype)
    if safe:
        check_finite(new, adapter_name, where)
    return replace_exactly(weight, new)


def merge_all_or_nothing(layers: Sequence[tuple[str, Any]], adapter_name: str, safe: bool, *,
                         check: Callable[[Any, str, str], None] | None = None,
                         merge: Callable[[Any, str, str], None] | None = None) -> None:
    """A method's ``merge`` hook over its ``(path, layer)`` pairs: with ``safe``, every layer is checked before
    any changes; if a merge fails part-way, the layers merged so far are unmerged again (in reverse), so the
    model is as it was. ``check(layer, adapter_name, path)`` and ``merge(layer, adapter_name, path)`` default to
    ``layer.check_merge(adapter_name)`` and ``layer.merge(adapter_name)``; layers unmerge with
    ``layer.unmerge(adapter_name)``."""
    if safe:
        for path, layer in layers:
            if check is None:
                layer.check_merge(adapter_name)
            else:
                check(layer, adapter_name, path)
    done: list[Any] = []
    try:
        for path, layer in layers:
            if merge is None:
                layer.merge(adapter_name)
            else:
                merge(layer, adapter_name, path)
            done.append(layer)
    except BaseException:
        for layer in reversed(done):
            layer.unmerge(adapter_name)
        raise


def unmerge_all(layers: Sequence[tuple[str, Any]], adapter_name: str) -> None:
    """A method's ``unmerge`` hook: ``layer.unmerge(adapter_name)`` over the pairs, last merged first."""
    for _, layer in reversed(layers):
        layer.unmerge(adapter_name)
