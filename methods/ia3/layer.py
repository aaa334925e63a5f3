"""``IA3Layer``: one targeted layer plus the (IA)^3 vectors of every adapter that scales it.

Shapes are Hugging Face PEFT's, so its files load as they are: a linear (or GPT-2 ``Conv1D``) layer holds
``(out, 1)`` for an output vector and ``(1, in)`` for an input (feed-forward) vector; a ``ConvNd`` holds
``(1, channels, 1, ...)``. Each adapter remembers its own role on the layer (PEFT decides it once per layer,
from the first adapter), so two adapters may treat one layer differently.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import torch
from peft_core.errors import MergeError
from peft_core.merging import RestoreToken, check_finite, replace_exactly, restore_exactly
from peft_core.runtime import AdapterRuntime
from torch import nn

from .targeting import layer_kind

__all__ = ["IA3Layer"]


def _scaled(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``t * scale`` computed in the vector's dtype and returned in ``t``'s (correct with and without autocast,
    which leaves elementwise products alone)."""
    return (t.to(scale.dtype) * scale).to(t.dtype)


class IA3Layer(nn.Module):
    """Wraps ``base_layer`` (``nn.Linear``, ``Conv1D``, ``nn.Conv2d``, ``nn.Conv3d``); the vectors live in
    ``ia3_l[<adapter>]`` (PEFT's attribute name, so the state-dict keys are PEFT's up to the adapter name)."""

    # PEFT's (IA)^3 has no mixed-batch inference (it ignores adapter_names): refused rather than guessed
    supports_routing = False

    def __init__(self, base_layer: nn.Module, runtime: AdapterRuntime, path: str = "") -> None:
        super().__init__()
        kind = layer_kind(base_layer)
        if kind is None:
            raise TypeError(f"IA3Layer cannot wrap a {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.ia3_l = nn.ParameterDict()
        self.kind = kind
        self.path = path
        self.feedforward: dict[str, bool] = {}
        self._runtime = runtime
        self._merged: dict[str, tuple[RestoreToken, RestoreToken | None]] = {}
        w = base_layer.weight
        if kind == "conv1d":  # Conv1D stores (in, out)
            self.in_features, self.out_features = int(w.shape[0]), int(w.shape[1])
        elif kind == "linear":
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        else:
            self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels

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
        return list(self.ia3_l)

    def adapter_parameters(self, adapter_name: str) -> Mapping[str, nn.Parameter]:
        return {f"ia3_l.{adapter_name}": self.ia3_l[adapter_name]}

    def adapter_state(self, adapter_name: str) -> Mapping[str, torch.Tensor]:
        return {}

    def trained_base_parameters(self, adapter_name: str) -> Collection[str]:
        return ()

    # ------------------------------------------------------------------ adapters
    def add(self, adapter_name: str, feedforward: bool, init_ia3_weights: bool) -> None:
        features = self.in_features if feedforward else self.out_features
        if self.kind == "conv":
            shape: tuple[int, ...] = (1, features) + (1,) * (self.base_layer.weight.dim() - 2)
        else:
            shape = (1, features) if feedforward else (features, 1)
        w = self.base_layer.weight
        make = torch.ones if init_ia3_weights else torch.randn
        self.ia3_l[adapter_name] = nn.Parameter(make(shape, dtype=w.dtype, device=w.device))
        self.feedforward[adapter_name] = feedforward

    def drop(self, adapter_name: str) -> None:
        """Forget ``adapter_name`` (a merged one stays folded into the weights: merge_and_unload)."""
        del self.ia3_l[adapter_name]
        self.feedforward.pop(adapter_name, None)
        self._merged.pop(adapter_name, None)

    @property
    def merged_adapters(self) -> list[str]:
        return list(self._merged)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        rt = self._runtime
        if rt.disabled:
            return self.base_layer(x, *args, **kwargs)
        names = [n for n in rt.active if n in self.ia3_l and n not in self._merged]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        inp = self._product([n for n in names if self.feedforward[n]])
        out = self._product([n for n in names if not self.feedforward[n]])
        if inp is not None:
            x = _scaled(x, inp)
        result = self.base_layer(x, *args, **kwargs)
        return result if out is None else _scaled(result, out)

    def _product(self, names: list[str]) -> torch.Tensor | None:
        """The product of these adapters' vectors, in the shape that broadcasts against the activations."""
        scale = None
        for name in names:
            v = self.ia3_l[name]
            v = v if self.kind == "conv" else v.flatten()
            scale = v if scale is None else scale * v
        return scale

    # ------------------------------------------------------------------ merging
    def _weight_scale(self, adapter_name: str) -> torch.Tensor:
        """The vector of ``adapter_name`` shaped to multiply the base weight elementwise."""
        v = self.ia3_l[adapter_name].detach()
        ff = self.feedforward[adapter_name]
        if self.kind == "linear":  # weight (out, in): vectors (out, 1) / (1, in) already broadcast
            return v
        if self.kind == "conv1d":  # weight (in, out)
            return v.T
        conv = self.base_layer
        if not ff:  # (1, out, 1..) -> (out, 1, 1..)
            return v.transpose(0, 1)
        if conv.groups == 1:
            return v
        # grouped conv: output channel o sees input channels group(o) * in_per_group + j, j < in_per_group
        in_pg, out_pg = conv.in_channels // conv.groups, conv.out_channels // conv.groups
        rest = v.shape[2:]
        v = v.reshape(conv.groups, 1, in_pg, *rest).expand(conv.groups, out_pg, in_pg, *rest)
        return v.reshape(conv.out_channels, in_pg, *rest)

    def _merged_tensors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                          torch.Tensor | None]:
        base = self.base_layer
        scale = self._weight_scale(adapter_name).to(base.weight.device).float()
        new_w = (base.weight.detach().float() * scale).to(base.weight.dtype)
        bias_scale = new_b = None
        if not self.feedforward[adapter_name] and getattr(base, "bias", None) is not None:
            bias_scale = self.ia3_l[adapter_name].detach().reshape(base.bias.shape).to(base.bias.device).float()
            new_b = (base.bias.detach().float() * bias_scale).to(base.bias.dtype)
        return scale, new_w, bias_scale, new_b

    def check_merge(self, adapter_name: str) -> None:
        """``safe_merge``: MergeError if merging would put NaN/Inf into this layer (nothing is changed)."""
        if adapter_name not in self.ia3_l or adapter_name in self._merged:
            return
        _, new_w, _, new_b = self._merged_tensors(adapter_name)
        check_finite(new_w, adapter_name, f"{self.path or 'this layer'}.weight")
        if new_b is not None:
            check_finite(new_b, adapter_name, f"{self.path or 'this layer'}.bias")

    def merge(self, adapter_name: str, safe: bool = False) -> None:
        """Fold ``adapter_name``'s vector into the base weight (and the bias, for an output vector), reversibly."""
        if adapter_name not in self.ia3_l or adapter_name in self._merged:
            return
        if safe:
            self.check_merge(adapter_name)
        if self.base_layer.weight.is_meta:
            raise MergeError(f"cannot merge IA3 adapter {adapter_name!r} into {self.path!r}: its weight is on the "
                             "meta device; load real weights first")
        scale, new_w, bias_scale, new_b = self._merged_tensors(adapter_name)
        w_token = replace_exactly(self.base_layer.weight, new_w, inverse=lambda merged: merged.float() / scale)
        b_token = None
        if new_b is not None:
            b_token = replace_exactly(self.base_layer.bias, new_b,
                                      inverse=lambda merged: merged.float() / bias_scale)
        self._merged[adapter_name] = (w_token, b_token)

    def unmerge(self, adapter_name: str) -> None:
        """Put the base weight (and bias) back bit for bit."""
        tokens = self._merged.pop(adapter_name, None)
        if tokens is None:
            return
        w_token, b_token = tokens
        if b_token is not None:
            restore_exactly(self.base_layer.bias, b_token)
        restore_exactly(self.base_layer.weight, w_token)

    def extra_repr(self) -> str:
        roles = ", ".join(f"{n}: {'input' if ff else 'output'}" for n, ff in self.feedforward.items())
        return f"ia3 scales ({roles})"
