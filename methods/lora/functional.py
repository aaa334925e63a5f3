"""The LoRA update as tensor functions, written for speed and memory.

``lora_linear(result, x, A, B, scaling, p)`` returns ``result + scaling * dropout_p(x) @ A.T @ B.T``:

- no dropout work at all when ``p == 0`` (or in eval: callers pass ``p=0``);
- the add and the scaling are fused into one ``addmm`` on the output: one output-sized tensor, not three;
- with dropout, a custom autograd function keeps neither the dropped input nor its mask for backward:
  it saves a random seed and regenerates the mask, so saved activations are the same as without
  dropout (and never more than full fine-tuning);
- the maths runs in the activation dtype (adapter weights are cast, not the activations), so a bf16
  model never makes fp32 copies of its activations.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["lora_linear"]


def _mask(shape: torch.Size, p: float, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    keep = torch.empty(shape, device=device, dtype=dtype)
    keep.bernoulli_(1.0 - p, generator=gen)
    return keep.mul_(1.0 / (1.0 - p))


class _DropoutLora(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, result: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                scaling: float, p: float) -> torch.Tensor:
        seed = int(torch.randint(0, 2**62, (1,)).item())  # from the global RNG: manual_seed reproduces runs
        scale_mask = _mask(x.shape, p, seed, x.device, x.dtype)
        h = (x * scale_mask).reshape(-1, x.shape[-1]) @ a.t()
        del scale_mask
        out = torch.addmm(result.reshape(-1, result.shape[-1]), h, b.t(), alpha=scaling)
        ctx.save_for_backward(x, a, b, h)
        ctx.seed, ctx.p, ctx.scaling = seed, p, scaling
        return out.view(result.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, a, b, h = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        gb = (g2 @ b).mul_(ctx.scaling)  # (N, r): gradient at the low-rank bottleneck
        grad_b = (g2.t() @ h).mul_(ctx.scaling) if ctx.needs_input_grad[3] else None
        grad_a = grad_x = None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[1]:
            scale_mask = _mask(x.shape, ctx.p, ctx.seed, x.device, x.dtype).reshape(-1, x.shape[-1])
            if ctx.needs_input_grad[2]:
                grad_a = gb.t() @ (x.reshape(-1, x.shape[-1]) * scale_mask)
            if ctx.needs_input_grad[1]:
                grad_x = (gb @ a).mul_(scale_mask).view(x.shape)
        return grad, grad_x, grad_a, grad_b, None, None


_HALF = (torch.bfloat16, torch.float16)
#: Up to this many tokens, half-precision LoRA on a CPU runs in fp32 (measured crossover: 64-128 tokens
#: for a 512-wide r=16 layer on an AVX-512/AMX Xeon, see benchmarks/diagnose.py).
_SMALL_CPU_HALF = 64


def lora_linear(result: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                p: float = 0.0) -> torch.Tensor:
    """``result + scaling * B(A(dropout_p(x)))`` for linear-like layers (``a``: r x in, ``b``: out x r)."""
    if (p == 0.0 and x.dtype in _HALF and x.device.type == "cpu" and a.dtype == torch.float32
            and x.numel() <= _SMALL_CPU_HALF * x.shape[-1]):
        # A few tokens (decoding) in bf16/fp16 on a CPU: half-precision GEMMs this skinny cost ~3x their
        # fp32 equivalents (fixed kernel overhead), while the fp32 copy of so few rows is free. The result
        # is rounded to the activation dtype as usual; only the (more precise) route differs.
        h = x.reshape(-1, x.shape[-1]).float() @ a.t()
        out = torch.addmm(result.reshape(-1, result.shape[-1]).float(), h, b.t(), alpha=scaling)
        return out.to(x.dtype).view(result.shape)
    if a.dtype != x.dtype:
        a = a.to(x.dtype)
        b = b.to(x.dtype)
    if result.dtype != x.dtype:
        result = result.to(x.dtype)
    if p > 0.0:
        return _DropoutLora.apply(result, x, a, b, scaling, p)
    h = x.reshape(-1, x.shape[-1]) @ a.t()
    return torch.addmm(result.reshape(-1, result.shape[-1]), h, b.t(), alpha=scaling).view(result.shape)
