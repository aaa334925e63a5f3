"""``VeraLayer``: one targeted linear layer (``nn.Linear`` or GPT-2's ``Conv1D``) plus the VeRA vectors of every
adapter on it.

The adapter's output is ``base(x) + lambda_b * (B_s @ (lambda_d * (A_s @ dropout(x))))``, where ``A_s`` is the
first ``in_features`` columns of the adapter's shared ``vera_A`` and ``B_s`` the first ``out_features`` rows of
its ``vera_B``. Only the two vectors are this layer's (``vera_lambda_b``: out, ``vera_lambda_d``: r, PEFT's
names and shapes); the projections live once per adapter in the store and are only referenced here.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from peft_core.amp import autocast_dtype, autocast_off
from peft_core.errors import AdapterError, MergeError
from peft_core.merging import RestoreToken, added_exactly, check_finite, restore_exactly
from peft_core.runtime import AdapterRuntime
from torch import nn
from transformers.pytorch_utils import Conv1D

from .projections import VeraProjections

__all__ = ["VeraLayer", "layer_kind"]


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d"`` (GPT-2's transposed linear) or None: the layer types PEFT's VeRA adapts."""
    if isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


class VeraLayer(nn.Module):
    """Wraps ``base_layer``; the vectors live in ``vera_lambda_b[<adapter>]`` and ``vera_lambda_d[<adapter>]``."""

    # PEFT's VeRA ignores adapter_names (every row gets the active adapter): refused here rather than wrong rows
    supports_routing = False

    def __init__(self, base_layer: nn.Module, runtime: AdapterRuntime, path: str = "") -> None:
        super().__init__()
        kind = layer_kind(base_layer)
        if kind is None:
            raise TypeError(f"VeraLayer cannot wrap a {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.kind = kind
        self.path = path
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self._runtime = runtime
        # the adapters' store modules, by adapter name: a plain dict, so that the projections are neither
        # submodules of this layer nor in its state dict (they would be saved once per layer otherwise)
        self._projections: dict[str, VeraProjections] = {}
        self._trains_bias: dict[str, bool] = {}
        self._merged: list[tuple[str, RestoreToken]] = []
        w = base_layer.weight
        if kind == "conv1d":  # Conv1D stores (in, out)
            self.in_features, self.out_features = int(w.shape[0]), int(w.shape[1])
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    # models read their layers' weight directly: the base layer's, as in PEFT
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    # ------------------------------------------------------------------ the AdapterLayer protocol
    @property
    def adapter_names(self) -> list[str]:
        return list(self.vera_lambda_d)

    def adapter_parameters(self, adapter_name: str) -> Mapping[str, nn.Parameter]:
        return {f"vera_lambda_b.{adapter_name}": self.vera_lambda_b[adapter_name],
                f"vera_lambda_d.{adapter_name}": self.vera_lambda_d[adapter_name]}

    def adapter_state(self, adapter_name: str) -> Mapping[str, torch.Tensor]:
        return {}  # the projections are the store's, declared there

    def trained_base_parameters(self, adapter_name: str) -> Collection[str]:
        if self._trains_bias.get(adapter_name) and self.bias is not None:
            return ("base_layer.bias",)
        return ()

    # ------------------------------------------------------------------ adapters
    def check_add(self, projections: VeraProjections) -> str | None:
        """Why ``projections`` cannot serve this layer (too small), or None."""
        if projections.max_in < self.in_features:
            return f"vera_A has {projections.max_in} columns but {self.path!r} has {self.in_features} input features"
        if projections.max_out < self.out_features:
            return f"vera_B has {projections.max_out} rows but {self.path!r} has {self.out_features} output features"
        return None

    def add(self, adapter_name: str, projections: VeraProjections, r: int, dropout: float, d_initial: float,
            init_weights: bool, trains_bias: bool) -> None:
        w = self.base_layer.weight
        like = {"dtype": w.dtype, "device": w.device}
        if init_weights:  # lambda_b = 0: the adapter starts as the identity
            lambda_b = torch.zeros(self.out_features, **like)
            lambda_d = torch.full((r,), d_initial, **like)
        else:  # PEFT's raw values (ones and a standard normal), which change outputs from the start
            lambda_b = torch.ones(self.out_features, **like)
            lambda_d = torch.randn(r, **like)
        self.vera_lambda_b[adapter_name] = nn.Parameter(lambda_b)
        self.vera_lambda_d[adapter_name] = nn.Parameter(lambda_d)
        self.vera_dropout[adapter_name] = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        self.r[adapter_name] = r
        self._projections[adapter_name] = projections
        self._trains_bias[adapter_name] = trains_bias

    def drop(self, adapter_name: str) -> None:
        """Forget ``adapter_name`` (a merged one stays folded into the weights: merge_and_unload)."""
        del self.vera_lambda_b[adapter_name]
        del self.vera_lambda_d[adapter_name]
        del self.vera_dropout[adapter_name]
        self.r.pop(adapter_name, None)
        self._projections.pop(adapter_name, None)
        self._trains_bias.pop(adapter_name, None)
        self._merged = [(n, t) for n, t in self._merged if n != adapter_name]

    @property
    def merged_adapters(self) -> list[str]:
        return [n for n, _ in self._merged]

    def _sliced(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        proj = self._projections[adapter_name]
        return proj.vera_A[:, : self.in_features], proj.vera_B[: self.out_features, :]

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        result = self.base_layer(x, *args, **kwargs)
        rt = self._runtime
        if rt.disabled:
            return result
        merged = self.merged_adapters
        names = [n for n in rt.active if n in self.vera_lambda_d and n not in merged]
        if not names:
            return result
        device = x.device.type
        amp = autocast_dtype(device)
        out = result
        with autocast_off(device):  # one dtype for the whole branch: autocast's if it is on, else the vectors'
            for name in names:
                lambda_b, lambda_d = self.vera_lambda_b[name], self.vera_lambda_d[name]
                dtype = amp or lambda_d.dtype
                vera_a, vera_b = self._sliced(name)
                h = F.linear(self.vera_dropout[name](x).to(dtype), vera_a.to(device=x.device, dtype=dtype))
                delta = lambda_b.to(dtype) * F.linear(lambda_d.to(dtype) * h, vera_b.to(device=x.device, dtype=dtype))
                # summed in the adapter's dtype (fp32 for a bf16 model), cast back once: as PEFT
                out = out + delta
        return out.to(result.dtype)

    # ------------------------------------------------------------------ merging
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``(lambda_b * B_s) @ (lambda_d * A_s)`` in fp32, shaped like the base weight ((in, out) for Conv1D)."""
        vera_a, vera_b = (t.detach().float() for t in self._sliced(adapter_name))
        lambda_b = self.vera_lambda_b[adapter_name].detach().float().to(vera_b.device)
        lambda_d = self.vera_lambda_d[adapter_name].detach().float().to(vera_a.device)
        delta = (lambda_b[:, None] * vera_b) @ (lambda_d[:, None] * vera_a)
        delta = delta.T if self.kind == "conv1d" else delta
        return delta.to(self.base_layer.weight.device)

    def check_merge(self, adapter_name: str) -> None:
        """``safe_merge``: MergeError if merging would put NaN/Inf into this layer (nothing is changed)."""
        if adapter_name not in self.vera_lambda_d or adapter_name in self.merged_adapters:
            return
        w = self.base_layer.weight
        check_finite((w.detach().float() + self.delta_weight(adapter_name)).to(w.dtype), adapter_name,
                     f"{self.path or 'this layer'}.weight")

    def merge(self, adapter_name: str) -> None:
        """Add ``adapter_name``'s delta to the base weight (in fp32, rounded once), reversibly."""
        if adapter_name not in self.vera_lambda_d or adapter_name in self.merged_adapters:
            return
        w = self.base_layer.weight
        if w.is_meta:
            raise MergeError(f"cannot merge VeRA adapter {adapter_name!r} into {self.path!r}: its weight is on the "
                             "meta device; load real weights first")
        token = added_exactly(w, self.delta_weight(adapter_name), safe=False)
        self._merged.append((adapter_name, token))

    def unmerge(self, adapter_name: str) -> None:
        """Put the base weight back bit for bit (the core unmerges newest first)."""
        if adapter_name not in self.merged_adapters:
            return
        if self._merged[-1][0] != adapter_name:
            raise AdapterError(f"{self.path}: asked to unmerge {adapter_name!r} while {self._merged[-1][0]!r} was "
                               "merged after it")
        _, token = self._merged.pop()
        restore_exactly(self.base_layer.weight, token)

    def extra_repr(self) -> str:
        return f"vera r={self.r}, in={self.in_features}, out={self.out_features}"
