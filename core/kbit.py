"""Preparing a quantized (k-bit) model for adapter training: Hugging Face PEFT's
``prepare_model_for_kbit_training``, with its semantics.

Method-agnostic: it concerns the base model, before any adapter is added. What it does, in order:

1. freezes every parameter (the adapters added next are the only thing that trains);
2. casts every float16/bfloat16 parameter that is not a packed 4-bit weight to float32 — layer norms, the
   embeddings and the output head, which are not quantized — for numerically stable training (skipped for
   quantization methods whose kernels need their own dtypes: GPTQ, AQLM, EETQ, HQQ, torchao);
3. with ``use_gradient_checkpointing`` on a quantized model: makes the input embeddings' output require grad
   (checkpointed blocks with a frozen base otherwise give the adapters no gradient, unless
   ``gradient_checkpointing_kwargs={"use_reentrant": False}``, which needs no such help), and turns on the
   model's gradient checkpointing with those kwargs.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["prepare_model_for_kbit_training"]

#: quantization methods whose layers run their own kernels on their own dtypes: no fp32 cast
_KEEP_DTYPES = frozenset({"gptq", "aqlm", "eetq", "hqq", "torchao"})


def _quant_method(model: nn.Module) -> str | None:
    method = getattr(model, "quantization_method", None)
    value = getattr(method, "value", method)  # transformers' QuantizationMethod is a str enum
    return str(value).lower() if value is not None else None


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Get a quantized transformers model ready for adapter training (see the module docstring); returns it.

    Call it on the base model, then ``get_peft_model(model, config)``.
    """
    kwargs = dict(gradient_checkpointing_kwargs or {})
    kwargs.setdefault("use_reentrant", True)  # torch's current default, said out loud (torch warns otherwise)
    method = _quant_method(model)
    quantized = bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
                     or method in _KEEP_DTYPES)
    for param in model.parameters():
        param.requires_grad_(False)
    if method not in _KEEP_DTYPES:
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
                param.data = param.data.float()
    if quantized and use_gradient_checkpointing:
        if kwargs["use_reentrant"]:
            # reentrant checkpointing recomputes a block only for inputs that require grad
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            else:
                def _require_grad(module: nn.Module, args: Any, output: torch.Tensor) -> None:
                    output.requires_grad_(True)

                model.get_input_embeddings().register_forward_hook(_require_grad)
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if callable(enable):
            if "gradient_checkpointing_kwargs" in inspect.signature(enable).parameters:
                enable(gradient_checkpointing_kwargs=kwargs)
            else:
                enable()
    return model
