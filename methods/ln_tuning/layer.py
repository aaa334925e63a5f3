"""``LNTuningLayer``: a targeted module (a LayerNorm/RMSNorm, usually) plus one trained copy of it per adapter.

While an adapter is active its copy runs instead of the original, which stays frozen and untouched: so several
adapters, ``disable_adapter`` and an exact unmerge come for free. Merging writes the copy's values into the
original's tensors (the original values are kept to put back bit for bit); the copy stays, so a merged adapter
can still be saved.

Dtypes: the core keeps an adapter's parameters in float32 on a half-precision model (``autocast_adapter_dtype``);
the copy then computes with its parameters cast to the original's dtype, so the layer returns what the original
would (Hugging Face PEFT keeps such copies in the model's dtype).
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping
from typing import Any

import torch
from peft_core.errors import AdapterError, MergeError
from peft_core.merging import check_finite
from peft_core.runtime import AdapterRuntime
from torch import nn

__all__ = ["LNTuningLayer"]


class LNTuningLayer(nn.Module):
    """Wraps ``base_layer``; the copies live in ``ln_tuning_layers[<adapter>]`` (PEFT's attribute name)."""

    # PEFT's LN tuning has no mixed-batch inference: refused rather than guessed
    supports_routing = False

    def __init__(self, base_layer: nn.Module, runtime: AdapterRuntime, path: str = "") -> None:
        super().__init__()
        self.base_layer = base_layer
        self.ln_tuning_layers = nn.ModuleDict()
        self.path = path
        self._runtime = runtime
        self._originals: dict[str, dict[str, torch.Tensor]] = {}  # merged adapter -> the original values

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
        return list(self.ln_tuning_layers)

    def adapter_parameters(self, adapter_name: str) -> Mapping[str, nn.Parameter]:
        prefix = f"ln_tuning_layers.{adapter_name}."
        return {prefix + n: p for n, p in self.ln_tuning_layers[adapter_name].named_parameters()}

    def adapter_state(self, adapter_name: str) -> Mapping[str, torch.Tensor]:
        prefix = f"ln_tuning_layers.{adapter_name}."
        return {prefix + n: b for n, b in self.ln_tuning_layers[adapter_name].named_buffers()}

    def trained_base_parameters(self, adapter_name: str) -> Collection[str]:
        return ()

    # ------------------------------------------------------------------ adapters
    def _base_tensors(self) -> dict[str, torch.Tensor]:
        """The original's parameters and floating-point buffers: what a merge overwrites."""
        tensors = dict(self.base_layer.named_parameters())
        tensors.update((n, b) for n, b in self.base_layer.named_buffers() if b.is_floating_point())
        return tensors

    def add(self, adapter_name: str) -> None:
        """A fresh copy of the original (its values before any merge) for ``adapter_name``."""
        fresh = copy.deepcopy(self.base_layer)
        for merged in self._originals.values():  # the base holds a merged adapter's values: start from the original
            own = dict(fresh.named_parameters())
            own.update(fresh.named_buffers())
            with torch.no_grad():
                for name, value in merged.items():
                    own[name].copy_(value)
        self.ln_tuning_layers[adapter_name] = fresh

    def drop(self, adapter_name: str) -> None:
        """Forget ``adapter_name`` (a merged one stays folded into the original: merge_and_unload)."""
        del self.ln_tuning_layers[adapter_name]
        self._originals.pop(adapter_name, None)

    @property
    def merged_adapters(self) -> list[str]:
        return list(self._originals)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        rt = self._runtime
        if rt.disabled:
            return self.base_layer(x, *args, **kwargs)
        names = [n for n in rt.active if n in self.ln_tuning_layers]
        if len(names) > 1:
            raise AdapterError(f"LN tuning runs one adapter at a time on a layer, but {names} are active on "
                               f"{self.path or 'a layer'}: set_adapter() one of them (as in Hugging Face PEFT)")
        if not names or names[0] in self._originals:  # none, or the merged one, which the original now holds
            return self.base_layer(x, *args, **kwargs)
        return self._run(self.ln_tuning_layers[names[0]], x, *args, **kwargs)

    def _run(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        base = dict(self.base_layer.named_parameters())
        cast = {n: p.to(base[n].dtype) for n, p in module.named_parameters()
                if n in base and p.dtype != base[n].dtype}
        if not cast:
            return module(*args, **kwargs)
        # float32 master values, computed in the original's dtype; the cast is differentiable
        return torch.func.functional_call(module, cast, args, kwargs, strict=False)

    # ------------------------------------------------------------------ merging
    def _merged_values(self, adapter_name: str) -> dict[str, torch.Tensor]:
        own = dict(self.ln_tuning_layers[adapter_name].named_parameters())
        own.update(self.ln_tuning_layers[adapter_name].named_buffers())
        return {n: own[n].detach().to(device=t.device, dtype=t.dtype) for n, t in self._base_tensors().items()}

    def check_merge(self, adapter_name: str) -> None:
        """``safe_merge``: MergeError if the copy holds NaN/Inf (nothing is changed)."""
        if adapter_name not in self.ln_tuning_layers or adapter_name in self._originals:
            return
        for name, value in self._merged_values(adapter_name).items():
            check_finite(value, adapter_name, f"{self.path or 'this layer'}.{name}")

    def merge(self, adapter_name: str, safe: bool = False) -> None:
        """Write the copy's values into the original, keeping the original values for ``unmerge``."""
        if adapter_name not in self.ln_tuning_layers or adapter_name in self._originals:
            return
        if self._originals:
            raise MergeError(f"LN tuning merges one adapter per layer: {list(self._originals)} is merged into "
                             f"{self.path or 'this layer'} already; unmerge_adapter() first (PEFT refuses this too)")
        if safe:
            self.check_merge(adapter_name)
        tensors = self._base_tensors()
        if any(t.is_meta for t in tensors.values()):
            raise MergeError(f"cannot merge LN tuning adapter {adapter_name!r} into {self.path!r}: its tensors are "
                             "on the meta device; load real weights first")
        values = self._merged_values(adapter_name)
        with torch.no_grad():
            self._originals[adapter_name] = {n: t.detach().clone() for n, t in tensors.items()}
            for name, tensor in tensors.items():
                tensor.copy_(values[name])

    def unmerge(self, adapter_name: str) -> None:
        """Put the original values back, bit for bit."""
        saved = self._originals.pop(adapter_name, None)
        if saved is None:
            return
        tensors = self._base_tensors()
        with torch.no_grad():
            for name, value in saved.items():
                tensors[name].copy_(value)

    def extra_repr(self) -> str:
        return f"ln_tuning adapters: {list(self.ln_tuning_layers)}"
