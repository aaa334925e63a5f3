"""peft_lora_conv1d: LoRA on ``torch.nn.Conv1d``, an extension plugin of peft-core's LoRA.

peft-core finds it through the ``peft_core.methods`` entry point ``lora_conv1d``; it declares no method and
implements LoRA's ``lora_make_layer`` hook, so LoRA wraps every targeted ``nn.Conv1d`` (``groups=1``,
floating-point weights) in a :class:`LoraConv1d`. Parameter names and shapes are Hugging Face PEFT's
(``lora_A.<adapter>.weight``: ``(r, in_channels, kernel_size)``; ``lora_B.<adapter>.weight``:
``(out_channels, r, 1)``), so the adapter files load both ways.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft_core import AdapterRuntime, hookimpl
from peft_lora import ConvLoraLayer
from torch import nn

__all__ = ["LoraConv1d", "LoraConv1dPlugin", "plugin"]


class LoraConv1d(ConvLoraLayer):
    """LoRA for ``nn.Conv1d``: A is a conv with the base layer's kernel, stride, padding and dilation; B a
    kernel-1 conv, so ``B(A(x))`` is a conv whose weight, ``B @ A`` per kernel tap, merges into the base.

    Everything but the conv type is LoRA's shared conv layer (``peft_lora.ConvLoraLayer``): creation like the
    base conv (dilation and padding mode included, which PEFT leaves out: without them ``B(A(x))`` would not
    be the conv that merging folds into the base weight), the update, mixed batches, dropout."""

    conv_cls = nn.Conv1d
    conv_fn = F.conv1d


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
