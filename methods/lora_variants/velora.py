"""VeLoRA (memory-efficient training by rank-1 sub-token projections): ``LoraConfig(velora_config={...})``, as
Hugging Face PEFT 0.21.

The forward pass is plain LoRA's, and so is merging. What changes is what the backward pass of A keeps: instead
of A's whole input, each input row is cut into ``num_groups`` sub-tokens (zero-padded to equal length) and only each
sub-token's coordinate along one unit vector ``v`` (the *projection*) is saved, ``num_groups`` numbers per row. A's
weight gradient is computed from the reconstruction ``scale * coordinate * v`` (so it is an approximation); the
gradient to A's input is exact. This applies in training mode with gradients on; in eval the layer is plain LoRA.

``v`` (``init_type``): ``"random"`` draws it once (normalised N(0, 1)); ``"batch_average"`` sets it, at every training
forward, to the normalised mean sub-token of the batch; ``"batch_average_once"`` does so at the first training
forward only. It is saved with the adapter as ``<path>.lora_velora_embed`` (PEFT's key; in the model a buffer
``lora_velora_embed.<adapter>.weight``), never trained. Linear layers only (GPT-2's Conv1D included), as in PEFT.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft_lora import LoraConfig, LoraLayer, LoraLinear
from torch import nn

from .common import VariantTensor, added, linear_update, plain_merged_weight, require_layer

__all__ = ["Velora"]


def _group_size(features: int, groups: int) -> int:
    return -(-features // groups)  # ceil: the last sub-token is zero-padded


def _subtokens(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(rows, groups, size): every row of ``x`` (all leading dims flattened) cut into ``groups`` sub-tokens."""
    size = _group_size(x.shape[-1], groups)
    pad = groups * size - x.shape[-1]
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(-1, groups, size)


def _unit(v: torch.Tensor) -> torch.Tensor:
    """``v / ||v||`` in fp32; a zero vector becomes the all-ones direction (as PEFT)."""
    v = v.float()
    norm = torch.linalg.vector_norm(v)
    if norm == 0:
        v = torch.ones_like(v)
        norm = torch.linalg.vector_norm(v)
    return v / norm


class _ProjectedInputLinear(torch.autograd.Function):
    """``x @ W^T`` that saves, for W's gradient, only the sub-tokens' coordinates along ``v``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, v: torch.Tensor, groups: int,
                scale: float) -> torch.Tensor:
        out = F.linear(x, weight)
        coords = _subtokens(x, groups) @ v.to(x.dtype)  # (rows, groups)
        ctx.save_for_backward(coords, weight, v)
        ctx.x_shape, ctx.x_dtype, ctx.groups, ctx.scale = tuple(x.shape), x.dtype, groups, scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        coords, weight, v = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        dtype = g.dtype
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight.to(dtype)).reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            features = ctx.x_shape[-1]
            rebuilt = (coords.to(dtype).unsqueeze(-1) * v.to(dtype)).reshape(coords.shape[0], -1)[:, :features]
            grad_w = (g.t() @ (rebuilt * ctx.scale)).to(weight.dtype)
        return grad_x, grad_w, None, None, None


class Velora:
    """The VeLoRA variant of one adapter config (its settings; the projection and its state live in the module)."""

    attr = "lora_velora_embed"
    claims = frozenset({"velora_config"})

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings

    def create(self, layer: LoraLayer, name: str) -> nn.Module:
        assert isinstance(layer, LoraLinear)
        s = self.settings
        w = layer.base_layer.weight
        kw = {"device": w.device, "dtype": w.dtype if w.is_floating_point() else torch.float32}
        size = _group_size(layer.in_features, s["num_groups"])
        random = s["init_type"] == "random"
        v = _unit(torch.randn(size, **kw)).to(kw["dtype"]) if random else torch.zeros(size, **kw)
        return VariantTensor(v, trained=False, num_groups=s["num_groups"], scale=s["scale"],
                             init_type=s["init_type"], ready=random)

    def _refresh(self, module: nn.Module, x: torch.Tensor) -> None:
        """``batch_average``: the projection becomes the batch's normalised mean sub-token (``_once``: the first
        time only). A new tensor, not an in-place write: an earlier forward may still need the old one for backward."""
        s = module.settings
        if s["init_type"] == "random" or (s["init_type"] == "batch_average_once" and s["ready"]):
            return
        with torch.no_grad():
            mean = _subtokens(x.detach(), s["num_groups"]).reshape(-1, module.weight.shape[0]).mean(0)
            module.weight = _unit(mean).to(device=module.weight.device, dtype=module.weight.dtype)
        s["ready"] = True

    def forward(self, layer: LoraLayer, name: str, x: torch.Tensor, result: torch.Tensor, base: torch.Tensor,
                p: float) -> torch.Tensor:
        assert isinstance(layer, LoraLinear)
        if not (layer.training and torch.is_grad_enabled()):
            return linear_update(layer, name, x, result, p)
        a, b = layer.lora_A[name], layer.lora_B[name]
        x = x.to(a.weight.dtype)
        if p > 0:
            x = F.dropout(x, p, True)
        module = getattr(layer, self.attr)[name]
        self._refresh(module, x)
        s = module.settings
        h = _ProjectedInputLinear.apply(x, a.weight, module.weight, s["num_groups"], s["scale"])
        return added(result, b(h) * layer.scaling[name])

    def merged_weight(self, layer: LoraLayer, name: str) -> torch.Tensor:
        return plain_merged_weight(layer, name)


def velora_for(config: LoraConfig, layer: LoraLayer, path: str) -> Velora:
    require_layer(layer, path, "VeLoRA", "velora_config")
    assert config.velora_config is not None
    return Velora(dict(config.velora_config))
