"""Mixed precision (``torch.autocast``) support shared by method plugins.

Two rules keep an adapter correct under autocast — what ``TrainingArguments(bf16=True)``, Accelerate's
``mixed_precision="bf16"`` and TRL's defaults turn on:

1. **One dtype per computation.** Autocast casts the inputs of the ops it knows (``matmul``, ``addmm``,
   ``conv``) but not of in-place ops (``addmm_``) nor of the ops inside a custom autograd function's
   backward. An adapter branch that mixes its fp32 weights with autocast's bf16 outputs fails there
   ("mat1 and mat2 must have the same dtype"). :func:`autocast_dtype` tells a layer which dtype autocast
   would compute in, so it can cast once and compute with autocast off (:func:`autocast_off`).
2. **Custom autograd functions declare their autocast behaviour.** :func:`device_function` builds, per
   device type, a ``torch.autograd.Function`` whose forward and backward are wrapped with
   ``torch.amp.custom_fwd`` / ``custom_bwd``: the backward runs in the autocast state the forward ran in,
   whatever state ``loss.backward()`` is called in.

Adapter *weights* are a separate matter: for bf16/fp16 base models the core keeps trainable adapter
parameters in fp32 (``autocast_adapter_dtype=True``, as in Hugging Face PEFT), see :mod:`peft_core.model`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["HALF_DTYPES", "autocast_dtype", "autocast_off", "device_function"]

HALF_DTYPES = (torch.float16, torch.bfloat16)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """Autocast's compute dtype for ``device_type`` ("cpu", "cuda"...) if autocast is on there, else None."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError):  # a device type autocast does not know (meta)
        return None
    return None


def autocast_off(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """A context with autocast disabled on ``device_type`` (a no-op context where autocast is off already)."""
    if autocast_dtype(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def device_function(name: str, forward: Callable[..., Any],
                    backward: Callable[..., Any]) -> Callable[[str], type[torch.autograd.Function]]:
    """``get(device_type)`` -> a ``torch.autograd.Function`` subclass named ``name`` whose ``forward(ctx, ...)``
    and ``backward(ctx, ...)`` are the given functions, declared with ``torch.amp.custom_fwd`` /
    ``custom_bwd`` for that device type (which the decorators need up front; hence one class per device)."""

    @functools.cache
    def get(device_type: str) -> type[torch.autograd.Function]:
        fwd = torch.amp.custom_fwd(device_type=device_type)(forward)
        bwd = torch.amp.custom_bwd(device_type=device_type)(backward)
        return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd),
                                                       "__doc__": forward.__doc__})

    return get
