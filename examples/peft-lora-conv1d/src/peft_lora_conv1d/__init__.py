"""peft_lora_conv1d: LoRA on ``torch.nn.Conv1d``, an extension plugin of peft-core's LoRA.

peft-core finds it through the ``peft_core.methods`` entry point ``lora_conv1d``; it declares no method and
implements LoRA's ``lora_make_layer`` hook, so LoRA wraps every targeted ``nn.Conv1d`` (``groups=1``,
floating-point weights) in a :class:`LoraConv1d`. Parameter names and shapes are Hugging Face PEFT's
(``lora_A.<adapter>.weight``: ``(r, in_channels, kernel_size)``; ``lora_B.<adapter>.weight``:
``(out_channels, r, 1)``), so the adapter files load both ways.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft_core import AdapterError, AdapterRuntime, hookimpl
from peft_core.runtime import Routing
from peft_lora import ModulePairLayer
from torch import nn

__all__ = ["LoraConv1d", "LoraConv1dPlugin", "plugin"]


def _new_kw(weight: torch.Tensor) -> dict[str, Any]:
    # New adapter tensors sit beside the base weight (same device and dtype); peft-core then applies
    # autocast_adapter_dtype and low_cpu_mem_usage to them, as it does for LoRA's built-in layers.
    return {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else torch.float32}


class LoraConv1d(ModulePairLayer):
    """LoRA for ``nn.Conv1d``: A is a conv with the base layer's kernel, stride, padding and dilation; B a
    kernel-1 conv, so ``B(A(x))`` is a conv whose weight, ``B @ A`` per kernel tap, merges into the base."""

    def __init__(self, base_layer: nn.Conv1d, runtime: AdapterRuntime) -> None:
        super().__init__(base_layer, runtime)

    def _create(self, name: str, r: int, init: bool | str) -> None:
        base = self.base_layer
        kw = _new_kw(base.weight)
        # dilation and padding_mode too (PEFT leaves them out): without them B(A(x)) would not be the conv
        # that merging folds into the base weight, and a dilated base would not even give the same length
        a = nn.Conv1d(base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation,
                      bias=False, padding_mode=base.padding_mode, **kw)
        b = nn.Conv1d(r, base.out_channels, 1, 1, bias=False, **kw)
        self._store(name, a, b, r, init)

    def delta_weight(self, name: str) -> torch.Tensor:
        a = self.lora_A[name].weight.float()  # (r, in, k)
        b = self.lora_B[name].weight.float()  # (out, r, 1)
        if a.shape[2] == 1:
            delta = (b.squeeze(2) @ a.squeeze(2)).unsqueeze(2)
        else:
            # delta[o, i, t] = sum_r b[o, r] * a[r, i, t]: a conv of A's taps (as a batch of inputs) by B
            delta = F.conv1d(a.permute(1, 0, 2), b).permute(1, 0, 2)
        return delta * self.scaling[name]

    def _delta(self, x: torch.Tensor, name: str, p: float, dtype: torch.dtype) -> torch.Tensor:
        a, b = self.lora_A[name], self.lora_B[name]
        xin = F.dropout(x, p, True) if p > 0 else x
        return b(a(xin.to(a.weight.dtype))).to(dtype) * self.scaling[name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        routing: Routing | None = self._runtime.routing()
        if routing is not None and not self._runtime.disabled:
            if x.dim() != 3:
                # an unbatched (channels, length) input has no rows: its first dim would be read as the batch
                raise AdapterError(f"adapter_names=[...] needs a batched (batch, channels, length) input for "
                                   f"LoraConv1d, got shape {tuple(x.shape)}; add a batch dimension")
            return self._routed_rows(x, routing, result, lambda rows, name: self._delta(rows, name, 0.0, result.dtype))
        training = self.training
        for name in self._live():
            result = result + self._delta(x, name, self.dropout_p[name] if training else 0.0, result.dtype)
        return result


class LoraConv1dPlugin:
    """LoRA on torch.nn.Conv1d layers (groups=1), with Hugging Face PEFT's parameter names and shapes."""

    @hookimpl
    def lora_make_layer(self, module: nn.Module, runtime: AdapterRuntime) -> LoraConv1d | None:
        if not isinstance(module, nn.Conv1d) or module.groups != 1:
            return None  # grouped convs: LoRA then reports the module as one no plugin can adapt
        weight = module.weight
        if type(weight) not in (torch.Tensor, nn.Parameter) or not weight.is_floating_point():
            return None  # a quantized or tensor-subclass weight: not plain floats to merge into
        return LoraConv1d(module, runtime)


plugin = LoraConv1dPlugin()
