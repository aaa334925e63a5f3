"""The AdaLoRA layer: one ``nn.Linear`` or transformers ``Conv1D`` (kept as ``base_layer``) plus, per adapter, the
SVD-shaped update ``B diag(E) A``: ``lora_A`` (r x in, right singular vectors), ``lora_E`` (r x 1, singular values),
``lora_B`` (out x r, left singular vectors) and ``ranknum`` (the rank the update is divided by, never trained).

Names, shapes and arithmetic are Hugging Face PEFT's, so ``named_parameters()`` reads the same and the outputs
agree to float rounding: ``y = W x + (dropout(x) @ (A * E)^T @ B^T) * lora_alpha / (ranknum + 1e-5)``.
Pruning a rank zeroes its entry of E (the rows of A and columns of B stay, and keep training); saved files hold
the kept ranks only (see :mod:`peft_adalora.plugin`).
"""

from __future__ import annotations

from typing import Any

import torch
from peft_core.errors import TargetError
from peft_core.merging import RestoreToken, added_exactly, restore_exactly
from peft_core.runtime import AdapterRuntime
from torch import nn

__all__ = ["RANKNUM_EPS", "AdaLoraLayer", "base_kind"]

#: Added to ranknum before dividing (PEFT's constant): a layer pruned to rank 0 divides by it, not by zero.
RANKNUM_EPS = 1e-5


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency of peft-core
        return None
    return Conv1D


def base_kind(module: nn.Module) -> str | None:
    """``"linear"`` or ``"conv1d"`` (GPT-2's, weight stored in x out) for what AdaLoRA adapts, else None."""
    if isinstance(module, AdaLoraLayer):
        return base_kind(module.base_layer)
    if isinstance(module, nn.Linear):
        return "linear"
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    return None


class AdaLoraLayer(nn.Module):
    """AdaLoRA on one ``nn.Linear`` or ``Conv1D``, with any number of adapters."""

    supports_routing = False  # no per-row path (PEFT's AdaLoRA has none either): mixed batches are refused

    def __init__(self, base_layer: nn.Module, runtime: AdapterRuntime, path: str = "") -> None:
        kind = base_kind(base_layer)
        if kind is None:
            raise TargetError(f"module {path!r} is a {type(base_layer).__module__}.{type(base_layer).__name__}, "
                              "which AdaLoRA cannot adapt; supported: torch.nn.Linear and transformers Conv1D "
                              "(as in PEFT). Target its linear sub-layers instead")
        super().__init__()
        self.base_layer = base_layer
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.ranknum = nn.ParameterDict()  # a frozen Parameter, as in PEFT (print_trainable_parameters counts it)
        self.scaling: dict[str, float] = {}
        #: Whether each adapter was added for training (PEFT allows one trainable AdaLoRA adapter per model).
        self.trainable: dict[str, bool] = {}
        #: The rank allocator's smoothed importance of each of the adapter's tensors ("A", "E", "B"): the pair
        #: (sensitivity EMA, uncertainty EMA). Runtime state, never saved (PEFT does not save it either).
        self.scores: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._runtime = runtime
        self.transposed = kind == "conv1d"
        w = base_layer.weight
        self.in_features, self.out_features = (w.shape[0], w.shape[1]) if self.transposed else (w.shape[1], w.shape[0])
        self._merged: list[tuple[str, RestoreToken]] = []

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A)

    @property
    def merged_adapters(self) -> list[str]:
        return [name for name, _ in self._merged]

    # ------------------------------------------------------------------ peft-core's AdapterLayer protocol
    def adapter_parameters(self, adapter_name: str) -> dict[str, nn.Parameter]:
        return {f"lora_A.{adapter_name}": self.lora_A[adapter_name],
                f"lora_E.{adapter_name}": self.lora_E[adapter_name],
                f"lora_B.{adapter_name}": self.lora_B[adapter_name]}

    def adapter_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return {f"ranknum.{adapter_name}": self.ranknum[adapter_name]}

    def trained_base_parameters(self, adapter_name: str) -> tuple[str, ...]:
        return ()

    # ------------------------------------------------------------------ adapters
    def add(self, name: str, rank: int, init_r: int, lora_alpha: float, dropout: float, init_weights: bool,
            trainable: bool) -> None:
        """Add adapter ``name`` at ``rank`` (``init_r``, or the kept ranks of a saved ``rank_pattern``)."""
        w = self.base_layer.weight
        kw: dict[str, Any] = {"device": w.device, "dtype": w.dtype}
        if init_weights:  # E = 0: the adapted model starts as the base model
            a = torch.randn(rank, self.in_features, **kw) * 0.02  # PEFT's normal(0, 0.02) for A and B
            b = torch.randn(self.out_features, rank, **kw) * 0.02
            e = torch.zeros(rank, 1, **kw)
        else:
            a, e, b = (torch.randn(rank, self.in_features, **kw), torch.randn(rank, 1, **kw),
                       torch.randn(self.out_features, rank, **kw))
        self.lora_A[name] = nn.Parameter(a)
        self.lora_E[name] = nn.Parameter(e)
        self.lora_B[name] = nn.Parameter(b)
        # the divisor stays the initial rank when a saved adapter comes back with fewer ranks (as in PEFT, whose
        # resize copies the old ranknum); a layer pruned to nothing divides by 0 + eps over an empty product
        ranks = float(init_r) if rank > 0 else 0.0
        device = w.device if not w.is_meta else "cpu"  # never on meta: no file fills it (PEFT keeps it off too)
        self.ranknum[name] = nn.Parameter(torch.full((1,), ranks, device=device, dtype=w.dtype), requires_grad=False)
        self.scaling[name] = float(lora_alpha) if lora_alpha > 0 else float(rank)
        self.lora_dropout[name] = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.trainable[name] = trainable

    def drop(self, name: str) -> None:
        """Forget adapter ``name``; if it is merged, its update stays in the weight (merge_and_unload)."""
        self._merged = [entry for entry in self._merged if entry[0] != name]
        for table in (self.lora_A, self.lora_E, self.lora_B, self.ranknum, self.lora_dropout):
            if name in table:
                del table[name]
        for plain in (self.scaling, self.trainable, self.scores):
            plain.pop(name, None)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        rt = self._runtime
        if rt.disabled:
            return result
        merged = self.merged_adapters
        dtype = result.dtype
        for name in rt.active:
            if name not in self.lora_A or name in merged:
                continue
            a, e, b = self.lora_A[name], self.lora_E[name], self.lora_B[name]
            h = self.lora_dropout[name](x.to(a.dtype))
            update = (h @ (a * e).T @ b.T) * self.scaling[name] / (self.ranknum[name] + RANKNUM_EPS)
            result = (result + update).to(dtype)  # added in the wider type and rounded once, as PEFT's +=
        return result

    # ------------------------------------------------------------------ merging
    def delta_weight(self, name: str) -> torch.Tensor:
        """The update as a weight in the base layer's layout (Conv1D: in x out)."""
        a, e, b = self.lora_A[name].detach(), self.lora_E[name].detach(), self.lora_B[name].detach()
        delta = (b @ (a * e)) * self.scaling[name] / (self.ranknum[name].detach() + RANKNUM_EPS)
        return delta.T if self.transposed else delta

    def merge(self, name: str, safe: bool, where: str = "") -> None:
        if name not in self.lora_A or name in self.merged_adapters:
            return
        weight = self.base_layer.weight
        token = added_exactly(weight, self.delta_weight(name).to(weight.device), safe=safe, adapter_name=name,
                              where=where)
        self._merged.append((name, token))

    def check_merge(self, name: str, where: str) -> None:
        """MergeError (nothing changed) if merging ``name`` would put NaN or Inf into the weight."""
        from peft_core.merging import check_finite

        weight = self.base_layer.weight
        check_finite(weight.detach().float() + self.delta_weight(name).to(weight.device), name, where)

    def unmerge(self, name: str) -> None:
        """Restore the weight bit for bit; newer merges are undone and redone on top (see IA3's layer)."""
        names = self.merged_adapters
        if name not in names:
            return
        newer = names[names.index(name) + 1:]
        while self._merged:
            top, token = self._merged.pop()
            restore_exactly(self.base_layer.weight, token)
            if top == name:
                break
        for again in newer:
            self.merge(again, safe=False)

    def extra_repr(self) -> str:
        ranks = {n: int(self.lora_A[n].shape[0]) for n in self.lora_A}
        return (f"in_features={self.in_features}, out_features={self.out_features}, ranks={ranks}, "
                f"merged={self.merged_adapters}")
