"""The quantized-LoRA extension: teaches LoRA quantized base layers through LoRA's ``lora_make_layer`` hook.

An extension, not a method: it declares no method and changes nothing in ``peft_lora``; it is found through
the ``peft_core.methods`` entry-point group like any plugin (``lora_quantized``). bitsandbytes and torchao are
optional: the plugin loads without them (``pip install peft-core[bnb]`` / ``[torchao]`` bring them), and
answers only for layers of a library that is installed — which it must be, for such a layer to exist.

Quantized layer types that Hugging Face PEFT supports but this plugin does not yet (GPTQ, AWQ, HQQ, EETQ,
AQLM, ...) get a :class:`~peft_core.TargetError` naming the module, its type and that it is not supported.
"""

from __future__ import annotations

import sys

from peft_core import hookimpl
from peft_core.errors import TargetError
from peft_core.runtime import AdapterRuntime
from peft_lora import LoraLayer
from torch import nn

from .layers import LoraLinear4bit, LoraLinear8bitLt, LoraTorchaoLinear

__all__ = ["QuantizedLoraPlugin", "plugin"]

#: Module-path prefixes of quantized layer libraries that PEFT adapts and this plugin does not (yet).
_NOT_YET = {
    "auto_gptq": "GPTQ (auto-gptq)", "gptqmodel": "GPTQ (gptqmodel)", "optimum.gptq": "GPTQ (optimum)",
    "awq": "AWQ", "hqq": "HQQ", "eetq": "EETQ", "aqlm": "AQLM", "optimum.quanto": "quanto", "fp_quant": "FP-Quant",
    "inc": "Intel Neural Compressor",
}


def _bnb(name: str) -> type | None:
    """A bitsandbytes class if bitsandbytes is imported already (a model with its layers must have imported
    it; never import it just to ask)."""
    module = sys.modules.get("bitsandbytes.nn")
    return getattr(module, name, None) if module is not None else None


def _is_torchao(weight: object) -> bool:
    utils = sys.modules.get("torchao.utils")
    base = getattr(utils, "TorchAOBaseTensor", None) if utils is not None else None
    return base is not None and isinstance(weight, base)


class QuantizedLoraPlugin:
    """LoRA on quantized layers: bitsandbytes 4-bit/8-bit and torchao int8 (through lora_make_layer)."""

    @hookimpl
    def lora_make_layer(self, module: nn.Module, path: str, runtime: AdapterRuntime) -> LoraLayer | None:
        four, eight = _bnb("Linear4bit"), _bnb("Linear8bitLt")
        if four is not None and isinstance(module, four):
            return LoraLinear4bit(module, runtime)
        if eight is not None and isinstance(module, eight):
            return LoraLinear8bitLt(module, runtime)
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and _is_torchao(weight):
            if type(weight).__name__ != "Int8Tensor":
                raise TargetError(f"module {path!r} is an nn.Linear with a torchao {type(weight).__name__} weight; "
                                  "peft-core's quantized LoRA supports torchao int8 weights only "
                                  "(Int8WeightOnlyConfig)")
            return LoraTorchaoLinear(module, runtime)
        where = type(module).__module__
        for prefix, kind in _NOT_YET.items():
            if where == prefix or where.startswith(prefix + "."):
                raise TargetError(f"module {path!r} is a {where}.{type(module).__name__} ({kind} quantization), which "
                                  "peft-core's LoRA does not support yet; supported quantized layers: bitsandbytes "
                                  "Linear4bit and Linear8bitLt, torchao int8 weight-only Linear")
        return None


plugin = QuantizedLoraPlugin()
