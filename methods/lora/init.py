"""LoRA's data-dependent initialisations (``init_lora_weights`` = ``"pissa"``, ``"pissa_niter_<n>"``, ``"olora"``,
``"orthogonal"``), computed as Hugging Face PEFT computes them so an adapter started here matches one
started there (the random ones given the same seed and the same layer order).

PiSSA and OLoRA move the principal part of the base weight into A and B and leave the *residual* in the
base layer: ``W = W_res + s B A``, so the model's output is unchanged at the start. The base weight is
changed in place (save the residual model if you want to reload it; or save with
``path_initial_model_for_weight_conversion`` to get a plain LoRA adapter for the original weights).
``"orthogonal"`` draws A's rows and B's columns from halves of one random orthogonal matrix, so that
``B A = 0`` at the start (the two halves are orthogonal to each other) while neither factor is zero.

PiSSA's and OLoRA's A and B stay in fp32 whatever the base dtype (as in PEFT: they are the weight's
principal part, and the residual is computed from exactly these values).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from peft_core.errors import ConfigError, TargetError

if TYPE_CHECKING:
    from .layers import LoraLayer

__all__ = ["INITS", "check", "initialise", "valid_init"]

#: The string initialisations this plugin runs (besides True, False and "gaussian").
INITS = ("pissa", "pissa_niter_<n>", "olora", "orthogonal")


def valid_init(value: object) -> bool:
    if value is True or value is False or value in ("gaussian", "pissa", "olora", "orthogonal"):
        return True
    if isinstance(value, str) and value.startswith("pissa_niter_"):
        return value[len("pissa_niter_"):].isdigit()
    return False


def _linear_weight(layer: LoraLayer, init: str) -> tuple[torch.Tensor, bool]:
    from .layers import LoraLinear

    if not isinstance(layer, LoraLinear) or not layer.plain_weight:
        raise TargetError(f"init_lora_weights={init!r} needs a Linear-like layer with a plain float weight; "
                          f"{type(layer).__name__} over {type(layer.base_layer).__name__} is not one "
                          "(exclude it, or use init_lora_weights=True)")
    w = layer.base_layer.weight
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TargetError(f"init_lora_weights={init!r} needs a float32/float16/bfloat16 base weight, got {w.dtype}")
    return w, layer.transposed


def _set(layer: LoraLayer, name: str, a: torch.Tensor, b: torch.Tensor, keep_fp32: bool = False) -> None:
    pa, pb = layer.lora_A[name].weight, layer.lora_B[name].weight  # type: ignore[union-attr,index]
    dev = pa.device
    pa.data = a.to(dev) if keep_fp32 else a.to(device=dev, dtype=pa.dtype)
    pb.data = b.to(dev) if keep_fp32 else b.to(device=dev, dtype=pb.dtype)


def _take_residual(layer: LoraLayer, name: str, w: torch.Tensor, transposed: bool, w32: torch.Tensor) -> None:
    """Leave ``W - s B A`` (with the stored, rounded A and B) in the base weight."""
    a, b = layer.lora_A[name].weight.float(), layer.lora_B[name].weight.float()  # type: ignore[union-attr,index]
    residual = w32 - layer.scaling[name] * (b @ a)
    with torch.no_grad():
        w.copy_((residual.t() if transposed else residual).to(w.dtype))


def check(layer: LoraLayer, init: bool | str, r: int) -> None:
    """Raise what :func:`initialise` would raise for ``layer`` at rank ``r``, without changing anything: LoRA checks
    every target first, since PiSSA and OLoRA write into the base weights and a failure halfway through would
    leave some of them changed."""
    from .variant_fields import VARIANT_INITS

    if not isinstance(init, str) or init == "gaussian" or init in VARIANT_INITS:
        return  # a variant's init ("mica") is its variant's to check: unclaimed, LoRA's claim check names it
    if not valid_init(init):
        raise ConfigError(f"init_lora_weights={init!r} is not an initialisation this plugin runs "
                          f"(True, False, 'gaussian', {', '.join(repr(i) for i in INITS)})")
    _linear_weight(layer, init)
    if init == "orthogonal" and r % 2:
        raise ConfigError(f"init_lora_weights='orthogonal' needs an even rank, got r={r}")


def initialise(layer: LoraLayer, name: str, init: str) -> None:
    """Set adapter ``name``'s A and B on ``layer`` (and, for PiSSA/OLoRA, the residual base weight)."""
    if layer.base_layer.weight.is_meta:
        return  # low_cpu_mem_usage: the weights come from a file
    r, s = layer.r[name], layer.scaling[name]
    check(layer, init, r)  # LoRA's inject ran it for every target already; direct callers get the same errors
    w, transposed = _linear_weight(layer, init)
    w32 = w.detach().float()
    w32 = w32.t() if transposed else w32  # (out, in)
    if init == "orthogonal":
        # the draws in PEFT's order, so a seeded run starts from the same A and B
        q, _ = torch.linalg.qr(torch.randn(r, r))
        a = torch.randn(w32.shape[1], r // 2).mm(q[0::2, :]).T / 10.0
        b = torch.randn(r // 2, w32.shape[0]).T.mm(q[1::2, :]) / 10.0
        _set(layer, name, a.contiguous(), b.contiguous())
        return
    if init == "olora":  # QR of the weight: B = Q[:, :r], A = R[:r]
        q, rr = torch.linalg.qr(w32)
        _set(layer, name, rr[:r].contiguous(), q[:, :r].contiguous(), keep_fp32=True)
    else:  # PiSSA: the r principal singular triplets, sqrt(S / s) on each side
        if init == "pissa":
            u, sv, vh = torch.linalg.svd(w32, full_matrices=False)
            u, sv, vh = u[:, :r], sv[:r], vh[:r]
        else:
            u, sv, v = torch.svd_lowrank(w32, r, niter=int(init[len("pissa_niter_"):]))
            vh = v.t()
        root = torch.diag(torch.sqrt(sv / s))
        _set(layer, name, root @ vh, u @ root, keep_fp32=True)
    _take_residual(layer, name, w, transposed, w32)
