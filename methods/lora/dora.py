"""DoRA (weight-decomposed LoRA, Liu et al. 2024) as a LoRA *variant*: ``LoraConfig(use_dora=True)``.

DoRA splits the adapted weight into a direction and a trained magnitude, one per output row::

    W' = m * (W + s B A) / ||W + s B A||_row        (the norm is treated as a constant: no gradient)

so a layer's output is ``W x + (f - 1) * (W x) + f * s * B A x`` with ``f = m / ||W + s B A||``.
The magnitude starts at the row norms, so a new adapter is the identity like plain LoRA's.

"Rows" are what the magnitude scales: a Linear's (and GPT-2 Conv1D's) output features, an Embedding's
embedding dimensions, a convolution's output channels. Each layer presents its weight and its ``B A`` as
matrices with those rows (:meth:`DoraLayout.rows`), so this module holds the maths once for all of them.

It is a variant, not a branch of LoRA's layers: LoRA asks its ``lora_variant`` hook (see
:mod:`peft_lora.hookspecs`) for each adapter on each layer, and LoRA's own implementation answers with
:class:`Dora` when ``use_dora`` is set, as a third party's variant would for its own flag.

Speed (Hugging Face PEFT's DoRA step is known to be slow): the row norms are computed without forming
``W + s B A``: ``||W_i||^2 + 2 s <B_i, (W A^T)_i> + s^2 B_i (A A^T) B_i^T``, one (rows x cols x r) matmul and
no weight-sized temporaries; ``||W_i||^2`` is kept until the base weight changes. Without dropout the base
output is reused, as in PEFT, and the output is ``f * (result + s B A x) + (1 - f) * bias``: the fused LoRA
update and one multiply-add, two output-sized passes; with dropout the base product on the dropped input is
computed once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from peft_core.amp import autocast_dtype, autocast_off
from torch import nn

from .layers import new_parameter_kwargs

if TYPE_CHECKING:
    from .layers import LoraLayer

__all__ = ["DORA_LAYOUT", "Dora", "DoraLayout", "Magnitude"]


class DoraLayout(Protocol):
    """What a LoRA layer provides for DoRA (LoRA's built-in layers implement it; a layer that does not has
    no DoRA, and ``use_dora=True`` on it is a TargetError naming the layer)."""

    def dora_rows(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W, B, A) as matrices with the magnitude's rows: W (rows x cols, the weight's own dtype, a view),
        B (rows x r) and A (r x cols) in fp32."""
        ...

    def dora_bias(self) -> torch.Tensor | None:
        """The base layer's bias shaped like the magnitude (None without one)."""
        ...

    def dora_base(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output for ``x`` without its bias (the dropout path needs it recomputed)."""
        ...

    def dora_update(self, x: torch.Tensor, adapter_name: str, out: torch.Tensor) -> torch.Tensor:
        """``out + s * B A x`` (a new tensor; Linear layers fuse the add into the matmul)."""
        ...

    def dora_shape(self, rows: torch.Tensor) -> torch.Tensor:
        """A per-row vector viewed to broadcast against the layer's output (and stored magnitude's shape)."""
        ...

    def dora_unrows(self, matrix: torch.Tensor) -> torch.Tensor:
        """A (rows x cols) matrix back in the base weight's layout."""
        ...


#: The methods of :class:`DoraLayout`: a layer with all of them can take a DoRA adapter.
DORA_LAYOUT = ("dora_rows", "dora_bias", "dora_base", "dora_update", "dora_shape", "dora_unrows")


class Magnitude(nn.Module):
    """Holds DoRA's magnitude as ``weight``, so the parameter reads ``lora_magnitude_vector.<adapter>.weight``
    as in Hugging Face PEFT (whose files store it as ``...lora_magnitude_vector``)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


def _row_norms(layer: LoraLayer, name: str) -> torch.Tensor:
    """``||W + s B A||`` per row, in fp32, without a weight-sized temporary."""
    w, b, a = layer.dora_rows(name)  # type: ignore[attr-defined]
    s = layer.scaling[name]
    with torch.no_grad():
        if layer.plain_weight:  # w is a view of the base weight: ||W_i||^2 changes only with it
            base = layer.base_layer.weight
            key = (base.data_ptr(), base._version, tuple(w.shape), w.dtype)
            memo = layer.__dict__.get("_dora_w2")
            if memo is None or memo[0] != key:
                memo = (key, w.float().pow(2).sum(1))
                layer.__dict__["_dora_w2"] = memo
            w2 = memo[1]
        else:  # a dequantized copy, made afresh (its quantization state may change under it): no memo
            w2 = w.float().pow(2).sum(1)
        # W A^T in the weight's dtype (a half-precision W is not copied to fp32 in every forward)
        wa = (w @ a.t().to(w.dtype)).float()  # rows x r
        n2 = w2 + (2 * s) * (b * wa).sum(1) + (s * s) * ((b @ (a @ a.t())) * b).sum(1)
        return n2.clamp_min(0).sqrt()


class Dora:
    """The DoRA variant (stateless: one instance serves every layer and adapter)."""

    #: Where the magnitude lives on the layer: ``<attr>.<adapter>.weight``.
    attr = "lora_magnitude_vector"
    #: The config field it implements (see peft_lora.variant).
    claims = frozenset({"use_dora"})

    def create(self, layer: LoraLayer, name: str) -> nn.Module:
        """The magnitude for a new adapter: the current row norms of ``W + s B A``."""
        weight = layer.base_layer.weight
        kw = new_parameter_kwargs(weight)
        if weight.is_meta:
            rows = layer.dora_rows(name)[0].shape[0]  # type: ignore[attr-defined]
            return Magnitude(layer.dora_shape(torch.empty(rows, device="meta", dtype=kw["dtype"])))  # type: ignore[attr-defined]
        return Magnitude(layer.dora_shape(_row_norms(layer, name).to(**kw)).clone())  # type: ignore[attr-defined]

    def factor(self, layer: LoraLayer, name: str) -> torch.Tensor:
        """``m / ||W + s B A||`` (gradient to m only), shaped like the stored magnitude."""
        m = getattr(layer, self.attr)[name].weight
        return m / layer.dora_shape(_row_norms(layer, name)).to(m.dtype)  # type: ignore[attr-defined]

    def forward(self, layer: LoraLayer, name: str, x: torch.Tensor, result: torch.Tensor, base: torch.Tensor,
                p: float) -> torch.Tensor:
        """``result + (f - 1) * W x + f * s * B A x``, with ``W x`` the bias-free base output (``base`` is the base
        layer's output, bias included); for dropout ``p > 0`` both terms use the dropped input, as in PEFT."""
        device_type = x.device.type
        if autocast_dtype(device_type) is not None and result.is_floating_point():
            with autocast_off(device_type):
                xs = x.to(result.dtype) if x.is_floating_point() else x
                return self.forward(layer, name, xs, result, base if base is result else base.to(result.dtype), p)
        f = self.factor(layer, name).to(result.dtype)
        bias = layer.dora_bias()  # type: ignore[attr-defined]
        bias = None if bias is None else bias.to(result.dtype)
        if p == 0.0 and result is base:
            # the usual case (one adapter, no dropout): f (W x + s B A x) + bias, from u = result + s B A x,
            # in two output-sized passes (the fused update, then one multiply-add)
            u = layer.dora_update(x, name, result)  # type: ignore[attr-defined]
            return u * f if bias is None else torch.addcmul((1 - f) * bias, f, u)
        if p > 0.0:
            x = F.dropout(x, p, True)
            wx = layer.dora_base(x)  # type: ignore[attr-defined]
        else:
            wx = base if bias is None else base - bias
        return torch.addcmul(result - wx, f, layer.dora_update(x, name, wx))  # type: ignore[attr-defined]

    def merged_weight(self, layer: LoraLayer, name: str) -> torch.Tensor:
        """The merged weight ``f * (W + s B A)`` in fp32 and the base weight's layout."""
        w, b, a = layer.dora_rows(name)  # type: ignore[attr-defined]
        with torch.no_grad():
            f = getattr(layer, self.attr)[name].weight.detach().float().reshape(-1) / _row_norms(layer, name)
            return layer.dora_unrows(f[:, None] * (w.float() + layer.scaling[name] * (b @ a)))  # type: ignore[attr-defined]

