"""The (IA)^3 layer: wraps one ``nn.Linear`` or transformers ``Conv1D`` (kept as ``base_layer``) and holds
one learned vector per adapter in ``ia3_l[<adapter>]``.

An output-side vector has shape ``(out_features, 1)`` and scales the layer's output; a feed-forward
(input-side) vector has shape ``(1, in_features)`` and scales its input. These are Hugging Face PEFT's
names and shapes, so ``named_parameters()`` and the saved tensors read the same.

Merging multiplies the weight (and, output side, the bias) by the vector. Dividing back does not always
give the original bits, so merges go through peft-core's exact-restore helpers (:mod:`peft_core.merging`),
and unmerge restores the base weights bit for bit.

The layer implements peft-core's ``AdapterLayer`` protocol (``adapter_parameters`` & co.), which is how the
core knows what each adapter owns and that mixed batches can be routed through it.
"""

from __future__ import annotations

import functools
import operator
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from peft_core.errors import AdapterError, TargetError
from peft_core.merging import RestoreToken, check_finite, replace_exactly, restore_exactly
from peft_core.runtime import AdapterRuntime, Routing
from torch import nn

__all__ = ["IA3Layer", "base_kind", "warn_layout"]



def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency of peft-core
        return None
    return Conv1D


def base_kind(module: nn.Module) -> str | None:
    """``"linear"`` or ``"conv1d"`` (weight stored as in x out) for a layer (IA)^3 can adapt, else None."""
    if isinstance(module, IA3Layer):
        return base_kind(module.base_layer)
    if isinstance(module, nn.Linear):
        return "linear"
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    return None


class IA3Layer(nn.Module):
    """(IA)^3 on one ``nn.Linear`` or ``Conv1D``, with any number of adapters."""

    supports_routing = True  # _mixed computes each row with its own vector

    def __init__(self, base_layer: nn.Module, runtime: AdapterRuntime, path: str = "") -> None:
        kind = base_kind(base_layer)
        if kind is None:
            raise TargetError(f"module {path!r} is a {type(base_layer).__module__}.{type(base_layer).__name__}, "
                              "which peft-ia3 cannot adapt; supported: torch.nn.Linear and transformers "
                              "Conv1D. Target its linear sub-layers instead")
        super().__init__()
        self.base_layer = base_layer
        self.ia3_l = nn.ParameterDict()
        self._runtime = runtime
        self.transposed = kind == "conv1d"  # Conv1D stores its weight as (in, out)
        w = base_layer.weight
        self.in_features, self.out_features = (w.shape[0], w.shape[1]) if self.transposed else (w.shape[1], w.shape[0])
        self.feedforward: dict[str, bool] = {}
        # merged adapters, oldest first, each with the restore data of its weight and bias
        self._merged: list[tuple[str, RestoreToken, RestoreToken | None]] = []

    # passthroughs, so code that reads layer.weight (dtype checks in transformers) keeps working
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.ia3_l)

    @property
    def merged_adapters(self) -> list[str]:
        return [name for name, _, _ in self._merged]

    # ------------------------------------------------------------------ peft-core's AdapterLayer protocol
    def adapter_parameters(self, adapter_name: str) -> dict[str, nn.Parameter]:
        return {f"ia3_l.{adapter_name}": self.ia3_l[adapter_name]}

    def adapter_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return {}

    def trained_base_parameters(self, adapter_name: str) -> tuple[str, ...]:
        return ()

    # ------------------------------------------------------------------ adapters
    def add(self, name: str, feedforward: bool, init_ones: bool) -> None:
        w = self.base_layer.weight
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        # like the weight (peft-core keeps half-precision adapters in fp32: autocast_adapter_dtype)
        kw: dict[str, Any] = {"device": w.device, "dtype": w.dtype}
        # the identity at init: the adapted model starts out as the base model
        value = torch.ones(shape, **kw) if init_ones else torch.randn(shape, **kw)
        self.ia3_l[name] = nn.Parameter(value)
        self.feedforward[name] = feedforward

    def drop(self, name: str) -> None:
        """Forget adapter ``name``; if it is merged, its effect stays in the weights (merge_and_unload)."""
        self._merged = [entry for entry in self._merged if entry[0] != name]
        self.feedforward.pop(name, None)
        if name in self.ia3_l:
            del self.ia3_l[name]

    # ------------------------------------------------------------------ forward
    def _scale(self, names: Sequence[str]) -> torch.Tensor:
        return functools.reduce(operator.mul, [self.ia3_l[n].flatten() for n in names])

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rt = self._runtime
        if rt.disabled:
            return self.base_layer(x, *args, **kwargs)
        routing = rt.routing()
        if routing is not None:
            return self._mixed(x, routing, *args, **kwargs)
        merged = self.merged_adapters
        names = [n for n in rt.active if n in self.ia3_l and n not in merged]
        inside = [n for n in names if self.feedforward[n]]
        outside = [n for n in names if not self.feedforward[n]]
        if inside:
            scale = self._scale(inside)
            x = (x.to(scale.dtype) * scale).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        if outside:
            result = (result * self._scale(outside)).to(result.dtype)
        return result

    def _row_scales(self, present: list[str], rows: list[str], width: int, like: torch.Tensor,
                    batch_dims: int) -> torch.Tensor:
        """One vector per batch row (ones for rows whose adapter has no vector on this side)."""
        dtype = self.ia3_l[present[0]].dtype
        table = torch.stack([torch.ones(width, dtype=dtype, device=like.device),
                             *(self.ia3_l[n].flatten().to(like.device) for n in present)])
        slot = {n: i for i, n in enumerate(present, start=1)}
        index = torch.tensor([slot.get(n, 0) for n in rows], device=like.device)
        return table[index].view(like.shape[0], *([1] * batch_dims), width)

    def _mixed(self, x: torch.Tensor, routing: Routing, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Mixed-batch inference: each row through its own adapter (or none, for ``__base__`` rows)."""
        rows = routing.names
        if len(rows) != x.shape[0]:
            raise AdapterError(f"adapter_names has {len(rows)} entries but the batch has {x.shape[0]} rows")
        present = [n for n in dict.fromkeys(rows) if n in self.ia3_l]
        inside = [n for n in present if self.feedforward[n]]
        outside = [n for n in present if not self.feedforward[n]]
        if inside:
            scale = self._row_scales(inside, list(rows), self.in_features, x, x.dim() - 2)
            x = (x.to(scale.dtype) * scale).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        if outside:
            scale = self._row_scales(outside, list(rows), self.out_features, result, result.dim() - 2)
            result = (result * scale).to(result.dtype)
        return result

    # ------------------------------------------------------------------ merging
    def _weight_scale(self, name: str) -> torch.Tensor:
        """The vector shaped to broadcast over the weight in its storage layout."""
        vec = self.ia3_l[name].detach()
        return vec.t() if self.transposed else vec

    def _merged_tensors(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight (and bias) with adapter ``name`` folded in, in their own dtypes; nothing changed."""
        weight = self.base_layer.weight
        new_w = (weight.detach() * self._weight_scale(name).to(weight.device)).to(weight.dtype)
        bias = self.bias
        new_b = None
        if bias is not None and not self.feedforward[name]:  # an input-side vector leaves the bias alone
            new_b = (bias.detach() * self.ia3_l[name].detach().reshape(bias.shape).to(bias.device)).to(bias.dtype)
        return new_w, new_b

    def check_merge(self, name: str, where: str) -> None:
        """Raise :class:`MergeError` if merging ``name`` would put NaN or Inf into this layer."""
        for t in self._merged_tensors(name):
            if t is not None:
                check_finite(t, name, where)

    def merge(self, name: str) -> None:
        if name not in self.ia3_l or name in self.merged_adapters:
            return
        new_w, new_b = self._merged_tensors(name)
        weight, bias = self.base_layer.weight, self.bias
        scale = self._weight_scale(name).to(weight.device)
        # the division misses few elements: cheaper to keep than the bit changes of a multiplication
        w_restore = replace_exactly(weight, new_w, inverse=lambda merged: merged / scale)
        b_restore = None
        if new_b is not None and bias is not None:
            vec = self.ia3_l[name].detach().reshape(bias.shape).to(bias.device).clone()
            b_restore = replace_exactly(bias, new_b, inverse=lambda merged: merged / vec)
        self._merged.append((name, w_restore, b_restore))

    def unmerge(self, name: str) -> None:
        """Restore the weights to what they were before ``name`` was merged, exactly.

        Merges are undone newest first; to unmerge an older adapter, the newer ones are unmerged, then
        merged again on top (so each restore applies to the weights it was recorded against).
        """
        names = self.merged_adapters
        if name not in names:
            return
        newer = names[names.index(name) + 1:]
        while self._merged:
            top, w_restore, b_restore = self._merged.pop()
            restore_exactly(self.base_layer.weight, w_restore)
            if b_restore is not None and self.bias is not None:
                restore_exactly(self.bias, b_restore)
            if top == name:
                break
        for again in newer:
            self.merge(again)

    def restore_bytes(self) -> int:
        """Bytes held to make unmerge exact (for tests and the curious)."""
        return sum(r.nbytes for _, *restores in self._merged for r in restores if r is not None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"adapters={self.adapter_names}, merged={self.merged_adapters}")


def warn_layout(path: str, layer: IA3Layer, fan_in_fan_out: bool) -> None:
    """The layer type decides the layout; say so when the config claims otherwise (as PEFT does)."""
    if fan_in_fan_out != layer.transposed:
        kind = "Conv1D" if layer.transposed else "torch.nn.Linear"
        warnings.warn(f"IA3Config.fan_in_fan_out={fan_in_fan_out} but {path} is a {kind}; using "
                      f"fan_in_fan_out={layer.transposed} for it", stacklevel=3)
