"""The LoRA update as tensor functions, written for speed and memory.

``lora_linear(result, x, A, B, scaling, p)`` returns ``result + scaling * dropout_p(x) @ A.T @ B.T``:

- no dropout work at all when ``p == 0`` (or in eval: callers pass ``p=0``);
- the add and the scaling are fused into one ``addmm`` on the output: one output-sized tensor, not three;
- with dropout on a CPU, a custom autograd function keeps neither the dropped input nor a full-size mask for
  backward. For the usual rates (``p <= 0.3``) only the ~``p * n`` dropped positions are drawn and saved
  (a dense mask's random numbers are most of its cost on a CPU), so saved activations stay within
  ``4 * p`` bytes per element of the no-dropout level, below full fine-tuning; larger rates, and CUDA
  (where the draw's host syncs cost more), use plain ``F.dropout`` (``hardware.py`` decides);
- the maths runs in the activation dtype (adapter weights are cast, not the activations), so a bf16
  model never makes fp32 copies of its activations, except on ``hardware.py``'s fp32 route (fp32
  adapters on a CPU whose half-precision GEMMs are slow for that many tokens);
- under ``torch.autocast`` it runs in the dtype of the base layer's output (autocast's dtype for every
  autocast-eligible base layer: what autocast would do to ``lora_B(lora_A(x))`` as modules, as in Hugging
  Face PEFT), cast once and computed with autocast off, so the in-place add and the custom backward see a
  single dtype; the custom function declares its autocast behaviour (``peft_core.amp.device_function``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from peft_core.amp import autocast_dtype, autocast_off, device_function

from .hardware import UNBOUNDED
from .hardware import choices as kernel_choices

__all__ = ["dropped_backward", "dropped_bottleneck", "dropped_positions", "fp32_route", "lora_linear",
           "lora_linear_gated"]


def dropped_positions(n: int, p: float, device: torch.device) -> torch.Tensor:
    """Flat indices of the dropped elements of an ``n``-element Bernoulli(``p``) dropout mask, drawn
    directly: the gaps between successive drops of i.i.d. Bernoulli trials are Geometric(``p``), so this
    draws ~``n * p`` random numbers instead of ``n``. Same distribution as ``F.dropout``'s mask; the
    global RNG is used, so ``torch.manual_seed`` reproduces runs."""
    parts: list[torch.Tensor] = []
    start = -1
    index_dtype = torch.int32 if n < 2**31 else torch.int64  # what is saved for backward: keep it small
    while True:
        expected = n * p
        draw = int(expected + 6 * math.sqrt(expected * (1 - p)) + 16)  # enough in all but ~1e-9 of calls
        gaps = torch.empty(draw, device=device, dtype=torch.float32).geometric_(p).to(torch.int64)
        positions = torch.cumsum(gaps, 0).add_(start)
        parts.append(positions[positions < n].to(index_dtype))
        if int(positions[-1]) >= n:
            return torch.cat(parts) if len(parts) > 1 else parts[0]
        start = int(positions[-1])


def _kept(x2: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    kept = x2.clone()
    kept.view(-1)[pos] = 0
    return kept


def dropped_bottleneck(x2: torch.Tensor, a: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``dropout_p(x2) @ A.T`` with the ``1 / (1 - p)`` scale folded into ``A``, and the dropped positions (all that
    backward keeps). The sparse kernel's forward; the fused route (``fused.py``) calls it too, so both draw and
    compute the same."""
    positions = dropped_positions(x2.numel(), p, x2.device)
    return _kept(x2, positions.long()) @ (a * (1.0 / (1.0 - p))).t(), positions


def dropped_backward(x2: torch.Tensor, g2: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, p: float,
                     pos: torch.Tensor, need_a: bool, need_x: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The gradients of A and of ``x2`` (flat, zero where dropped) for :func:`dropped_bottleneck`'s update
    ``scaling * h @ B.T``, given the output gradient ``g2`` and the positions as int64."""
    gd = (g2 @ b).mul_(scaling / (1.0 - p))  # bottleneck gradient, with the dropout scale
    grad_a = gd.t() @ _kept(x2, pos) if need_a else None
    grad_x = None
    if need_x:
        grad_x = gd @ a
        grad_x.view(-1)[pos] = 0
    return grad_a, grad_x


def _sparse_forward(ctx: Any, result: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                    scaling: float, p: float) -> torch.Tensor:
    """LoRA with dropout at a fraction of a dense dropout's cost, for small ``p``.

    Only the ~``p * n`` dropped positions are drawn (geometric gaps) instead of ``n`` random numbers,
    which is most of a dense dropout's cost on a CPU. The dropped copy of ``x`` is then a clone with those
    positions zeroed — cheap, and consumed at once by the (fast, dense) product with ``A``. Backward
    rebuilds it from the saved positions. Saved for backward: the positions (int32, ~``p * n``), never a
    full-size mask or dropped copy of ``x``. The ``1 / (1 - p)`` scale folds into the small matrices.
    """
    x2 = x.reshape(-1, x.shape[-1])
    h, positions = dropped_bottleneck(x2, a, p)
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h, b.t(), alpha=scaling)
    ctx.save_for_backward(x, a, b, h, positions)
    ctx.p, ctx.scaling = p, scaling
    return out.view(result.shape)


def _sparse_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    x, a, b, h, positions = ctx.saved_tensors
    x2 = x.reshape(-1, x.shape[-1])
    g2 = grad.reshape(-1, grad.shape[-1]).to(b.dtype)
    grad_b = (g2.t() @ h).mul_(ctx.scaling) if ctx.needs_input_grad[3] else None
    grad_a, grad_x = dropped_backward(x2, g2, a, b, ctx.scaling, ctx.p, positions.long(), ctx.needs_input_grad[2],
                                      ctx.needs_input_grad[1])
    if grad_x is not None:
        grad_x = grad_x.view(x.shape)
    return grad, grad_x, grad_a, grad_b, None, None


#: The sparse-dropout LoRA function for a device type ("cpu", "cuda"), autocast behaviour declared.
_sparse_dropout_lora = device_function("SparseDropoutLora", _sparse_forward, _sparse_backward)


_HALF = (torch.bfloat16, torch.float16)


def fp32_route(x: torch.Tensor, a: torch.Tensor) -> bool:
    """Whether half-precision ``x`` with fp32 adapter weights ``a`` runs the LoRA branch in fp32 (``hardware.py``).

    Where the table says "at any size" (half GEMMs emulated), a call that autograd records keeps the half route
    anyway: the fp32 route would save an fp32 copy of every adapted layer's input for backward, and a bf16 model is
    trained in bf16 to keep its activations small. Inference, and the few-token sizes of the native tiers, take it.
    """
    if x.dtype not in _HALF or a.dtype != torch.float32:
        return False
    limit = kernel_choices(x.device, x.dtype).fp32_route_max_tokens
    if x.numel() > limit * x.shape[-1]:
        return False
    return limit != UNBOUNDED or not (torch.is_grad_enabled() and (x.requires_grad or a.requires_grad))


def lora_linear(result: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                p: float = 0.0, inplace: bool = False) -> torch.Tensor:
    """``result + scaling * B(A(dropout_p(x)))`` for linear-like layers (``a``: r x in, ``b``: out x r).

    ``inplace``: ``result`` may be updated in place (the caller knows nothing else needs it).
    """
    device_type = x.device.type
    if autocast_dtype(device_type) is not None and result.is_floating_point():
        # autocast does not cast for in-place ops nor inside a custom backward: cast once, compute with it off
        with autocast_off(device_type):
            return _lora_linear(result, x.to(result.dtype), a, b, scaling, p, inplace)
    return _lora_linear(result, x, a, b, scaling, p, inplace)


def _lora_linear(result: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                 p: float, inplace: bool) -> torch.Tensor:
    if p == 0.0 and fp32_route(x, a):
        # bf16/fp16 with fp32 adapters where half GEMMs lose (hardware.py's table): a few tokens on a CPU with
        # native half GEMMs (their fixed overhead), any number where they are emulated. The result is rounded
        # to the activation dtype as usual; only the (more precise) route differs.
        h = x.reshape(-1, x.shape[-1]).float() @ a.t()
        out = torch.addmm(result.reshape(-1, result.shape[-1]).float(), h, b.t(), alpha=scaling)
        return out.to(x.dtype).view(result.shape)
    if a.dtype != x.dtype:
        a = a.to(x.dtype)
        b = b.to(x.dtype)
    if result.dtype != x.dtype:
        result = result.to(x.dtype)
    if p > 0.0:
        if p <= kernel_choices(x.device, x.dtype).sparse_dropout_max_p:
            return _sparse_dropout_lora(x.device.type).apply(result, x, a, b, scaling, p)
        x = torch.nn.functional.dropout(x, p, True)
    h = x.reshape(-1, x.shape[-1]) @ a.t()
    if inplace and result.is_contiguous():
        # the base layer's output is not needed by its own backward (plain Linear/Conv1D): adding into it
        # saves writing a second output-sized tensor
        result.view(-1, result.shape[-1]).addmm_(h, b.t(), alpha=scaling)
        return result
    return torch.addmm(result.reshape(-1, result.shape[-1]), h, b.t(), alpha=scaling).view(result.shape)


def lora_linear_gated(result: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                      scaling: float | torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``result + (gate * scaling) * B(A(x))`` for inference inside a compiled graph.

    ``gate`` (0 or 1 per row, broadcastable against ``result``) says whether each row takes this adapter; it is a
    tensor computed when the graph runs (``AdapterRuntime.gate_rows``), so which adapter is on never becomes a
    Python value the graph is specialised on. Multiplying by exactly 0 or 1 keeps the result exact. Dtypes as in
    :func:`lora_linear`: the activation dtype, or the base output's under autocast.
    """
    device_type = x.device.type
    if autocast_dtype(device_type) is not None and result.is_floating_point():
        with autocast_off(device_type):
            return _lora_linear_gated(result, x.to(result.dtype), a, b, scaling, gate)
    return _lora_linear_gated(result, x, a, b, scaling, gate)


def _lora_linear_gated(result: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       scaling: float | torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    if result.dtype != x.dtype:
        result = result.to(x.dtype)
    if a.dtype == torch.float32 and x.dtype in _HALF:
        # fp32 adapters on a half-precision model (autocast_adapter_dtype): inference only, so the fp32 copy of the
        # activations is transient; the sum is rounded once, as on the eager few-token route
        delta = (x.float() @ a.t() @ b.t()) * (gate.float() * scaling)
        return (result.float() + delta).to(x.dtype)
    if a.dtype != x.dtype:
        a = a.to(x.dtype)
        b = b.to(x.dtype)
    return result + (x @ a.t() @ b.t()) * (gate.to(x.dtype) * scaling)
