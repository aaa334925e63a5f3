"""``OFTLayer``: one targeted layer plus the packed rotations of every OFT adapter on it.

Storage is Hugging Face PEFT's: ``oft_R[<adapter>]`` (``oft_embedding_R`` on an embedding) of shape
``(blocks, b * (b - 1) / 2)``, one row when ``block_share``. What each kind computes, with ``R`` the
block-diagonal rotation:

- ``nn.Linear``: ``base(x @ R)`` — the input is rotated first, then the base layer runs (PEFT's order);
- ``nn.Embedding``: ``base(ids) @ R`` — the looked-up vectors are rotated;
- ``nn.Conv2d``: the convolution with every filter rotated, ``W' = W R^T`` on ``W`` viewed as
  ``(out, in * kh * kw)``. For 1x1 kernels this is PEFT's computation; for larger kernels PEFT rotates
  overlapping input patches and folds them back by summation, which is not a rotation (its output at the
  identity init differs from the base layer's, and its merge disagrees with its own forward). This layer
  computes what PEFT's *merged* weight computes, for every kernel size.

Several active adapters rotate in turn, in the runtime's order: ``x @ R_a @ R_b`` before the base layer.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import attrs
import torch
from peft_core.errors import MergeError, TargetError
from peft_core.merging import RestoreToken, check_finite, replace_exactly, restore_exactly
from peft_core.runtime import AdapterRuntime
from torch import nn

from .rotation import apply_left, apply_right, block_layout, project_coft, rotations

__all__ = ["OFTLayer", "RotationOptions", "layer_kind"]


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv2d"`` or ``"embedding"``: the layer types PEFT 0.21's OFT adapts; None otherwise."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


@attrs.frozen
class RotationOptions:
    """How one adapter turns its packed parameter into rotation blocks on one layer."""

    blocks: int  # block positions along the rotated dimension (r)
    block_size: int
    block_share: bool
    coft: bool
    eps: float
    neumann: bool
    terms: int


class OFTLayer(nn.Module):
    """Wraps ``base_layer`` (``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding``) and the OFT adapters acting on it."""

    # PEFT 0.21's OFT has no mixed-batch inference (it ignores adapter_names and rotates every row with the active
    # adapters): refused up front rather than answered with wrong rows
    supports_routing = False

    def __init__(self, base_layer: nn.Module, runtime: AdapterRuntime, path: str = "") -> None:
        kind = layer_kind(base_layer)
        if kind is None:
            raise TargetError(f"OFT cannot adapt {path or 'this module'!r}, a {type(base_layer).__name__}; "
                              "supported: torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding")
        super().__init__()
        self.base_layer = base_layer
        self.kind = kind
        self.path = path
        # PEFT's attribute names, so state-dict keys are PEFT's up to the adapter name
        self.tensor_name = "oft_embedding_R" if kind == "embedding" else "oft_R"
        self.add_module(self.tensor_name, nn.ParameterDict())
        self.options: dict[str, RotationOptions] = {}
        self.trains_bias: dict[str, bool] = {}
        self._runtime = runtime
        self._merged: list[tuple[str, RestoreToken]] = []  # oldest first
        if kind == "linear":
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
            self.rotated_dim = self.in_features
        elif kind == "conv2d":
            self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
            kh, kw = base_layer.kernel_size
            self.rotated_dim = self.in_features * kh * kw
        else:
            self.in_features, self.out_features = base_layer.embedding_dim, base_layer.num_embeddings
            self.rotated_dim = self.in_features

    @property
    def params(self) -> nn.ParameterDict:
        """The packed parameters of every adapter (``oft_R`` or ``oft_embedding_R``)."""
        return getattr(self, self.tensor_name)

    # models read their layers' weight directly (T5 checks ``wo.weight.dtype``): the base layer's, as in PEFT
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    # ------------------------------------------------------------------ the AdapterLayer protocol
    @property
    def adapter_names(self) -> list[str]:
        return list(self.params)

    def adapter_parameters(self, adapter_name: str) -> Mapping[str, nn.Parameter]:
        return {f"{self.tensor_name}.{adapter_name}": self.params[adapter_name]}

    def adapter_state(self, adapter_name: str) -> Mapping[str, torch.Tensor]:
        return {}

    def trained_base_parameters(self, adapter_name: str) -> Collection[str]:
        if self.trains_bias.get(adapter_name) and isinstance(self.bias, nn.Parameter):
            return ("base_layer.bias",)  # bias="oft_only"
        return ()

    # ------------------------------------------------------------------ adapters
    def check_add(self) -> None:
        """TargetError for a layer OFT cannot rotate (called before the model changes)."""
        base = self.base_layer
        if self.kind == "conv2d":
            if base.kernel_size[0] != base.kernel_size[1]:
                # PEFT sizes the rotation as in_channels * kh * kh, which cannot fit a kh x kw filter
                raise TargetError(f"OFT target {self.path!r} is a Conv2d with a non-square kernel {base.kernel_size}; "
                                  "OFT (as PEFT) supports square kernels only. Exclude it with exclude_modules")
            if any(d != 1 for d in base.dilation):
                raise TargetError(f"OFT target {self.path!r} is a Conv2d with dilation {base.dilation}; OFT supports "
                                  "dilation 1 only (as PEFT). Exclude it with exclude_modules")
            if base.groups != 1:
                raise TargetError(f"OFT target {self.path!r} is a grouped Conv2d (groups={base.groups}); OFT rotates "
                                  "whole filters and supports groups=1 only. Exclude it with exclude_modules")

    def add(self, adapter_name: str, r: int, block_size: int, *, block_share: bool, coft: bool, eps: float,
            neumann: bool, terms: int, init_weights: bool, trains_bias: bool) -> None:
        blocks, size = block_layout(self.rotated_dim, r, block_size, self.path)
        w = self.base_layer.weight
        shape = (1 if block_share else blocks, size * (size - 1) // 2)
        param = nn.Parameter(torch.zeros(shape, dtype=w.dtype, device=w.device))
        if not init_weights:  # PEFT's random init, for tests: N(0, 0.1)
            with torch.no_grad():
                nn.init.normal_(param, mean=0.0, std=0.1)
        self.params[adapter_name] = param
        self.options[adapter_name] = RotationOptions(blocks=blocks, block_size=size, block_share=block_share,
                                                     coft=coft, eps=eps, neumann=neumann, terms=terms)
        self.trains_bias[adapter_name] = trains_bias

    def drop(self, adapter_name: str) -> None:
        """Forget ``adapter_name`` (a merged one stays folded into the weights: merge_and_unload)."""
        del self.params[adapter_name]
        self.options.pop(adapter_name, None)
        self.trains_bias.pop(adapter_name, None)
        self._merged = [(n, t) for n, t in self._merged if n != adapter_name]

    @property
    def merged_adapters(self) -> list[str]:
        return [n for n, _ in self._merged]

    # ------------------------------------------------------------------ rotations
    def rotation_blocks(self, adapter_name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The ``(blocks, b, b)`` rotation of ``adapter_name`` (in ``dtype``, default the parameter's).

        With ``coft`` the parameter is first projected in place, without gradient, as PEFT does on every use."""
        param = self.params[adapter_name]
        opt = self.options[adapter_name]
        if opt.coft:
            with torch.no_grad():
                param.copy_(project_coft(param, opt.block_size, opt.eps))
        packed = param if dtype is None else param.to(dtype)
        blocks = rotations(packed, opt.block_size, opt.neumann, opt.terms)
        if opt.block_share:
            blocks = blocks.expand(opt.blocks, opt.block_size, opt.block_size)
        return blocks

    # ------------------------------------------------------------------ forward
    def _live(self) -> list[str]:
        rt = self._runtime
        if rt.disabled:
            return []
        merged = self.merged_adapters
        return [n for n in rt.active if n in self.params and n not in merged]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        names = self._live()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        if self.kind == "embedding":
            result = self.base_layer(x, *args, **kwargs)
            out_dtype = result.dtype
            for name in names:
                blocks = self.rotation_blocks(name)
                result = apply_right(result.to(blocks.dtype), blocks)
            return result.to(out_dtype)
        if self.kind == "conv2d":
            return self._conv_forward(x, names)
        previous = x.dtype
        for name in names:  # rotate the input in the adapter's dtype, as PEFT, then run the base layer
            blocks = self.rotation_blocks(name)
            x = apply_right(x.to(blocks.dtype), blocks)
        return self.base_layer(x.to(previous), *args, **kwargs).to(previous)

    def _conv_forward(self, x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        base = self.base_layer
        weight = base.weight
        t: torch.Tensor | None = None
        # x R_a R_b W^T: the filters are W (R_a R_b)^T = (R_a (R_b W^T))^T, so the last adapter is applied first
        for name in reversed(names):
            blocks = self.rotation_blocks(name)
            if t is None:
                t = weight.reshape(self.out_features, -1).t().to(blocks.dtype)
            t = apply_left(blocks, t.to(blocks.dtype))
        assert t is not None
        rotated = t.t().reshape(weight.shape).to(weight.dtype)
        return base._conv_forward(x, rotated, base.bias)

    # ------------------------------------------------------------------ merging
    def _merged_tensor(self, adapter_name: str) -> torch.Tensor:
        """The weight with ``adapter_name`` merged on top of what is merged already, in fp32; nothing changed.

        Merged adapters act in merge order, as they do unmerged: ``W_k^T = R_1 ... R_k W^T`` (``E_k = E R_1 ... R_k``
        for an embedding). The newest rotation sits next to the weight, underneath the earlier ones, so the product
        is recomputed from the original weight, recovered bit for bit from the restore tokens, rather than from the
        rounded merged one."""
        w = self.base_layer.weight
        original = w.detach().clone()
        for _, token in reversed(self._merged):
            restore_exactly(original, token)
        names = [*self.merged_adapters, adapter_name]
        with torch.no_grad():
            if self.kind == "embedding":
                e = original.float()
                for name in names:
                    e = apply_right(e, self.rotation_blocks(name, torch.float32).detach())
                return e
            t = original.float().reshape(self.out_features, -1).t()
            for name in reversed(names):
                t = apply_left(self.rotation_blocks(name, torch.float32).detach(), t)
            return t.t().reshape(w.shape)

    def check_merge(self, adapter_name: str) -> None:
        """``safe_merge``: MergeError if merging would put NaN/Inf into this layer (nothing is changed)."""
        if adapter_name not in self.params or adapter_name in self.merged_adapters:
            return
        check_finite(self._merged_tensor(adapter_name), adapter_name, f"{self.path or 'this layer'}.weight")

    def merge(self, adapter_name: str, safe: bool = False) -> None:
        """Fold ``adapter_name``'s rotation into the base weight, reversibly."""
        if adapter_name not in self.params or adapter_name in self.merged_adapters:
            return
        if self.base_layer.weight.is_meta:
            raise MergeError(f"cannot merge OFT adapter {adapter_name!r} into {self.path!r}: its weight is on the "
                             "meta device; load real weights first")
        new = self._merged_tensor(adapter_name)
        if safe:
            check_finite(new, adapter_name, f"{self.path or 'this layer'}.weight")
        self._merged.append((adapter_name, replace_exactly(self.base_layer.weight, new)))

    def unmerge(self, adapter_name: str) -> None:
        """Put the weight back bit for bit as it was before ``adapter_name`` was merged (the core unmerges newest
        first)."""
        if adapter_name not in self.merged_adapters:
            return
        if self._merged[-1][0] != adapter_name:
            raise MergeError(f"{self.path}: asked to unmerge {adapter_name!r} while {self._merged[-1][0]!r} was "
                             "merged after it")
        _, token = self._merged.pop()
        restore_exactly(self.base_layer.weight, token)

    def extra_repr(self) -> str:
        parts = ", ".join(f"{n}: {o.blocks}x{o.block_size}{' shared' if o.block_share else ''}"
                          for n, o in self.options.items())
        return f"oft {self.kind} ({parts})"
