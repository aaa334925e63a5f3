"""LoRA layers over quantized base layers: bitsandbytes ``Linear4bit`` (nf4/fp4, double quantization, any
compute dtype) and ``Linear8bitLt``, and ``nn.Linear`` with a torchao int8 weight.

The quantized weight is never trained and never touched by a forward: the adapter's update is added to the
base layer's output (``lora_linear``, as for a plain Linear), its A and B are fp32 beside the packed weight.

Merging dequantises the weight, adds the update in fp32 and quantises again, as Hugging Face PEFT does (the
merged model then differs from the unmerged one by the requantisation's rounding). Unmerging is exact,
unlike PEFT's (which dequantises and subtracts, and requantises again): the merge keeps the original
quantized weight object — a fraction of the dense weight's size — and unmerge puts it back.
"""

from __future__ import annotations

from typing import Any

import torch
from peft_core.errors import MergeError
from peft_core.merging import check_finite
from peft_core.runtime import AdapterRuntime
from peft_lora import LoraLinear, ModulePairLayer
from torch import nn

__all__ = ["LoraLinear4bit", "LoraLinear8bitLt", "LoraTorchaoLinear", "QuantizedLoraLinear"]


class QuantizedLoraLinear(LoraLinear):
    """LoRA beside a quantized Linear: what every quantized kind shares. Subclasses say how to dequantise the
    weight to fp32 (``dense_weight``) and how to quantise a dense weight into the base layer (``requantize``)."""

    inplace_output = False  # a quantized kernel's output is not ours to overwrite
    plain_weight = False  # packed bits: PiSSA/OLoRA must not read base_layer.weight as floats
    #: DoRA reads the weight through dense_weight() below (peft_lora.dora.DoraLayout), as PEFT dequantizes it
    supports_dora = True

    def __init__(self, base_layer: nn.Module, runtime: AdapterRuntime) -> None:
        # the packed weight's shape is not (out, in): take the sizes from the layer
        ModulePairLayer.__init__(self, base_layer, runtime)
        self.transposed = False
        self.in_features = int(base_layer.in_features)
        self.out_features = int(base_layer.out_features)

    def _create(self, name: str, r: int, init: bool | str) -> None:
        # fp32 beside a weight that is not floating point (what PEFT creates too); on the weight's device
        kw = {"device": self.base_layer.weight.device, "dtype": torch.float32}
        self._store(name, nn.Linear(self.in_features, r, bias=False, **kw),
                    nn.Linear(r, self.out_features, bias=self.lora_bias.get(name, False), **kw), r, init)

    # ---- DoRA's view (peft_lora.dora.DoraLayout): the dequantized weight, rows are the output features
    def dora_rows(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.dense_weight(), self.lora_B[name].weight.detach().float(),
                self.lora_A[name].weight.detach().float())

    def dora_base(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.dense_weight().to(x.dtype))

    def merged_weight(self, name: str) -> torch.Tensor:
        if name in self.variants:
            return super().merged_weight(name)
        return self.dense_weight() + self.delta_weight(name).to(self.base_layer.weight.device)

    # ---- what each quantized kind provides
    def dense_weight(self) -> torch.Tensor:
        """The base weight dequantised, fp32, (out, in)."""
        raise NotImplementedError

    def requantize(self, dense: torch.Tensor) -> None:
        """Quantise ``dense`` (out x in) the way the base weight is quantized and make it the base weight."""
        raise NotImplementedError

    # ---- merging: requantised, as PEFT does; unmerge exact (the original quantized weight is put back)
    def merge(self, name: str, safe: bool) -> None:
        if name not in self.r or name in self._restore:
            return
        if self.lora_bias.get(name):
            raise MergeError(f"adapter {name!r} has lora_bias=True, which peft-core does not merge into a quantized "
                             "layer; keep it unmerged")
        self._generation += 1
        original = self.base_layer.weight
        merged = self.merged_weight(name)  # dense + B A, or the variant's (DoRA's) merged weight
        if safe:
            check_finite(merged, name)
        saved = self._saved_state()
        self.requantize(merged)
        self._restore[name] = (original, saved)  # type: ignore[assignment]

    def unmerge(self, name: str) -> None:
        self._generation += 1
        token = self._restore.pop(name, None)
        if token is not None:
            original, saved = token  # type: ignore[misc]
            self.base_layer.weight = original
            self._put_back_state(saved)

    def _saved_state(self) -> Any:
        """What the base layer caches besides its weight, for an exact unmerge (None: nothing)."""
        return None

    def _put_back_state(self, saved: Any) -> None:
        """Restore what :meth:`_saved_state` returned."""

    def extra_repr(self) -> str:
        return f"{type(self.base_layer).__name__}, " + super().extra_repr()


class LoraLinear4bit(QuantizedLoraLinear):
    """LoRA on ``bitsandbytes.nn.Linear4bit`` (nf4 or fp4, with or without double quantization)."""

    def _unpacked(self) -> tuple[torch.Tensor, Any]:
        """The weight's 4-bit data and quant state in bitsandbytes' storage layout. On a CPU, bitsandbytes
        repacks a weight for its inference kernel at the first forward without autograd (and changes its quant
        state with it); dequantising that packed form as if it were the stored one gives a scrambled weight.
        bitsandbytes' own inverse (which its state_dict uses) undoes it, on copies: the layer keeps its form."""
        import copy

        import bitsandbytes as bnb

        weight = self.base_layer.weight
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            inverse = getattr(bnb.functional, "_convert_weight_packed_for_cpu_inverse", None)
            if inverse is None:
                raise RuntimeError("this bitsandbytes packs 4-bit weights for the CPU without the inverse peft-core "
                                   "needs to merge them; use bitsandbytes 0.48-0.50, or merge before any inference")
            data, state = inverse(data.clone(), copy.deepcopy(state))
        return data, state

    def dense_weight(self) -> torch.Tensor:
        import bitsandbytes as bnb

        data, state = self._unpacked()
        return bnb.functional.dequantize_4bit(data, state).float()

    def requantize(self, dense: torch.Tensor) -> None:
        import bitsandbytes as bnb

        weight = self.base_layer.weight
        _, state = self._unpacked()
        kwargs = {k: v for k, v in weight.__dict__.items() if not k.startswith("_") and k not in
                  ("data", "quant_state", "bnb_quantized", "requires_grad", "module")}
        fresh = bnb.nn.Params4bit(dense.to("cpu", state.dtype), requires_grad=False, module=self.base_layer,
                                  **kwargs)
        self.base_layer.weight = fresh.to(weight.device)


class LoraLinear8bitLt(QuantizedLoraLinear):
    """LoRA on ``bitsandbytes.nn.Linear8bitLt`` (LLM.int8(), row-wise int8 weights)."""

    def _scales(self) -> torch.Tensor:
        weight = self.base_layer.weight
        scb = getattr(weight, "SCB", None)
        state = getattr(self.base_layer, "state", None)
        if scb is None and state is not None:
            scb = state.SCB
        if scb is None:
            raise RuntimeError(f"{type(self.base_layer).__name__} has no quantization scales (SCB): is it quantized?")
        return scb

    def dense_weight(self) -> torch.Tensor:
        # row-wise absmax int8: w = q * SCB / 127
        weight = self.base_layer.weight
        return weight.data.float() * (self._scales().float().unsqueeze(1) / 127.0)

    def requantize(self, dense: torch.Tensor) -> None:
        import bitsandbytes as bnb

        weight = self.base_layer.weight
        fresh = bnb.nn.Int8Params(dense.to("cpu"), requires_grad=False, has_fp16_weights=weight.has_fp16_weights)
        self.base_layer.weight = fresh.to(weight.device)
        state = getattr(self.base_layer, "state", None)
        if state is not None:  # forget the old weight's int8 copy and scales: the next forward takes the new ones
            state.reset_grads()

    # Linear8bitLt moves the weight's int8 data and scales into its matmul state at the first forward (the
    # weight keeps neither): an exact unmerge puts those back too
    def _saved_state(self) -> Any:
        state = getattr(self.base_layer, "state", None)
        return None if state is None else (state.CB, state.SCB)

    def _put_back_state(self, saved: Any) -> None:
        state = getattr(self.base_layer, "state", None)
        if state is not None and saved is not None:
            state.reset_grads()
            state.CB, state.SCB = saved


class LoraTorchaoLinear(QuantizedLoraLinear):
    """LoRA on an ``nn.Linear`` whose weight torchao quantized to int8 (``Int8WeightOnlyConfig``)."""

    def __init__(self, base_layer: nn.Module, runtime: AdapterRuntime) -> None:
        super().__init__(base_layer, runtime)
        self._config = _torchao_config(base_layer.weight)

    def dense_weight(self) -> torch.Tensor:
        return self.base_layer.weight.dequantize().float()

    def requantize(self, dense: torch.Tensor) -> None:
        from torchao.quantization import quantize_

        if self._config is None:
            raise RuntimeError(f"cannot requantise a torchao {type(self.base_layer.weight).__name__} weight: only "
                               "int8 weight-only quantization is supported for merging")
        weight = self.base_layer.weight
        self.base_layer.weight = nn.Parameter(dense.to(weight.device, weight.dtype), requires_grad=False)
        quantize_(self.base_layer, self._config)


def _torchao_config(weight: torch.Tensor) -> Any:
    """The torchao config that quantises a dense weight like ``weight`` (None when not known)."""
    if type(weight).__name__ == "Int8Tensor" and getattr(weight, "act_quant_kwargs", None) is None:
        from torchao.quantization import Int8WeightOnlyConfig

        return Int8WeightOnlyConfig()
    return None
