"""What the variants of this package share: their per-adapter modules, the plain LoRA update written as PEFT
computes it, and the layer checks that run before the model changes."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft_core.errors import TargetError
from peft_lora import LoraEmbedding, LoraLayer, LoraLinear
from torch import nn

__all__ = ["Settings", "VariantTensor", "added", "embedding_update", "float_weight", "linear_update",
           "plain_merged_weight", "require_layer"]


class Settings(nn.Module):
    """A variant's per-adapter module that holds no tensor, only settings (BD-LoRA's block layout, MiCA's marker):
    the layer stores one per adapter under the variant's ``attr``, so ``print(model)`` shows the variant."""

    def __init__(self, **settings: Any) -> None:
        super().__init__()
        self.settings = dict(settings)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.settings.items())


class VariantTensor(nn.Module):
    """A variant's one per-adapter tensor as ``weight`` (a trained parameter, or a buffer that is saved but not
    trained): it reads ``<attr>.<adapter>.weight`` in the model and is saved as ``<path>.<attr>``, PEFT's key
    (the convention of DoRA's ``lora_magnitude_vector``)."""

    def __init__(self, value: torch.Tensor, trained: bool, **settings: Any) -> None:
        super().__init__()
        if trained:
            self.weight = nn.Parameter(value)
        else:
            self.register_buffer("weight", value, persistent=True)
        self.settings = dict(settings)


def require_layer(layer: LoraLayer, path: str, variant: str, field: str, *, embedding: bool = False,
                  conv1d: bool = True) -> None:
    """TargetError unless ``layer`` is LoRA's own Linear layer (or its Embedding layer, if ``embedding``): where
    PEFT 0.21 has this variant. ``conv1d=False`` also refuses GPT-2's transposed ``Conv1D``. ``field`` is the
    config setting that asked for ``variant`` (for the message)."""
    kinds = (LoraLinear, LoraEmbedding) if embedding else (LoraLinear,)
    if type(layer) not in kinds:
        where = "nn.Linear, transformers Conv1D and nn.Embedding" if embedding else "nn.Linear and transformers Conv1D"
        raise TargetError(f"{field}: module {path!r} is a {type(layer.base_layer).__name__} ({type(layer).__name__}), "
                          f"which has no {variant} (Hugging Face PEFT 0.21 has it on {where} layers only); exclude it "
                          "with exclude_modules, or train it in a separate adapter")
    if not conv1d and isinstance(layer, LoraLinear) and layer.transposed:
        raise TargetError(f"{field}: module {path!r} is a transformers Conv1D (weight stored transposed, "
                          f"fan_in_fan_out), which {variant} does not support (nor does Hugging Face PEFT); target "
                          "nn.Linear layers, or exclude it with exclude_modules")


def float_weight(layer: LoraLayer, path: str, variant: str, field: str) -> None:
    """TargetError unless the base weight is float32/float16/bfloat16 (what an SVD of it needs, as in PEFT)."""
    dtype = layer.base_layer.weight.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TargetError(f"{field}: module {path!r} has a {dtype} base weight; {variant} takes an SVD of it and "
                          "needs float32, float16 or bfloat16 (as in Hugging Face PEFT)")


def added(result: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """``result + update`` summed in the wider of the two dtypes and rounded once to ``result``'s, as PEFT's
    ``result + lora_B(...)`` does (a bf16 model with an fp32 adapter: no second rounding of the update)."""
    return (result + update).to(result.dtype)


def linear_update(layer: LoraLinear, name: str, x: torch.Tensor, result: torch.Tensor, p: float,
                  between: torch.Tensor | None = None) -> torch.Tensor:
    """``result + s * B(between * A(dropout_p(x)))`` through the factor *modules* (so a block-diagonal one works),
    in PEFT's order and dtypes: the input cast to A's dtype, PEFT's dropout draws, the sum cast back."""
    a, b = layer.lora_A[name], layer.lora_B[name]
    x = x.to(a.weight.dtype) if x.is_floating_point() else x
    if p > 0:
        x = F.dropout(x, p, True)
    h = a(x)
    if between is not None:  # KaSA's learned singular values
        h = h * between
    if isinstance(b, nn.Linear) and b.weight.dtype != h.dtype:
        # a frozen B (MiCA's) is adapter_state, which autocast_adapter_dtype leaves in the model's half dtype while
        # it makes A fp32: compute in A's dtype, as PEFT (which casts B too)
        return added(result, F.linear(h, b.weight.to(h.dtype)) * layer.scaling[name])
    return added(result, b(h) * layer.scaling[name])


def embedding_update(layer: LoraEmbedding, name: str, ids: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """``result + s * B (A^T looked up by ids)``, in A's dtype (B cast to it, as in :func:`linear_update`)."""
    base = layer.base_layer
    a, b = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    after_a = F.embedding(ids, a.t(), base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                          base.sparse)
    return added(result, (after_a @ b.t().to(after_a.dtype)) * layer.scaling[name])


def plain_merged_weight(layer: LoraLayer, name: str) -> torch.Tensor:
    """``W + s B A`` in fp32 and the base weight's layout (a variant whose merge is plain LoRA's)."""
    w = layer.base_layer.weight
    return w.detach().float() + layer.delta_weight(name).to(w.device)
