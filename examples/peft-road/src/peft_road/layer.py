"""The RoAd layer: wraps one ``nn.Linear`` (kept as ``base_layer``) and holds, per adapter, the angles
``road_theta[<adapter>]`` and scales ``road_alpha[<adapter>]`` that rotate its output.

The output's features are split into groups of ``group_size``; in each group, feature ``i`` and feature
``i + group_size/2`` form a pair ``(y0, y1)`` that becomes

    z0 = a0 * y0 - b0 * y1        a = alpha * cos(theta)
    z1 = a1 * y1 + b1 * y0        b = alpha * sin(theta)

(:func:`coefficients` says which angle and scale each position uses, per variant). Being linear in ``y``,
the rotation folds into the weights: rotating every column of ``W`` and the bias ``b`` gives a layer
whose output is the rotated output. These are Hugging Face PEFT's names, shapes and pairing, so
``named_parameters()`` and the saved tensors read the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from peft_core.errors import AdapterError, TargetError
from peft_core.merging import RestoreToken, check_finite, replace_exactly, restore_exactly
from peft_core.runtime import AdapterRuntime
from torch import nn

__all__ = ["RoadLayer", "coefficients", "rotate"]

#: Angles (and as many scales) a variant learns, per output feature.
_SIZE = {"road_1": 0.5, "road_2": 1, "road_4": 2}


def coefficients(variant: str, group_size: int, theta: torch.Tensor,
                 alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)``, one value per output feature, from an adapter's angles and scales."""
    half = group_size // 2
    if variant == "road_1":  # one angle per pair: both features of a pair use it
        theta = theta.reshape(-1, 1, half).expand(-1, 2, half).reshape(-1)
        alpha = alpha.reshape(-1, 1, half).expand(-1, 2, half).reshape(-1)
        return alpha * theta.cos(), alpha * theta.sin()
    if variant == "road_2":  # one angle per feature
        return alpha * theta.cos(), alpha * theta.sin()
    # road_4: per group, group_size angles and scales for a, then group_size for b
    theta, alpha = theta.reshape(-1, 2, group_size), alpha.reshape(-1, 2, group_size)
    return (alpha[:, 0] * theta[:, 0].cos()).reshape(-1), (alpha[:, 1] * theta[:, 1].sin()).reshape(-1)


def rotate(y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, group_size: int) -> torch.Tensor:
    """The pairwise rotation of the last dimension of ``y``: ``z = a * y + b * partner(y)``, where the
    partner of ``y0`` is ``-y1`` and that of ``y1`` is ``y0``."""
    pairs = y.unflatten(-1, (-1, 2, group_size // 2))
    partner = torch.stack((-pairs[..., 1, :], pairs[..., 0, :]), dim=-2).flatten(-3)
    return y * a + partner * b


def _inverse(a: torch.Tensor, b: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients of the inverse rotation: each 2x2 block [[a0, -b0], [b1, a1]] inverted."""
    half = group_size // 2
    a2, b2 = a.reshape(-1, 2, half), b.reshape(-1, 2, half)
    det = a2[:, 0] * a2[:, 1] + b2[:, 0] * b2[:, 1]
    inv_a = torch.stack((a2[:, 1], a2[:, 0]), dim=1) / det.unsqueeze(1)
    return inv_a.reshape(-1), (-b2 / det.unsqueeze(1)).reshape(-1)


class RoadLayer(nn.Module):
    """RoAd on one ``nn.Linear``, with any number of adapters."""

    supports_routing = True  # _mixed rotates each row with its own adapter

    def __init__(self, base_layer: nn.Module, runtime: AdapterRuntime, path: str = "") -> None:
        if not isinstance(base_layer, nn.Linear):
            raise TargetError(f"module {path!r} is a {type(base_layer).__module__}.{type(base_layer).__name__}, "
                              "which peft-road cannot adapt; supported: torch.nn.Linear")
        super().__init__()
        self.base_layer = base_layer
        self.road_theta = nn.ParameterDict()  # PEFT's attribute names: state-dict keys then match PEFT's
        self.road_alpha = nn.ParameterDict()
        self._runtime = runtime
        self.path = path
        self.variant: dict[str, str] = {}
        self.group_size: dict[str, int] = {}
        # merged adapters, oldest first, each with the restore data of the weight and the bias
        self._merged: list[tuple[str, RestoreToken, RestoreToken | None]] = []

    # passthroughs, so code that reads layer.weight (dtype checks in transformers) keeps working
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def merged_adapters(self) -> list[str]:
        return [name for name, _, _ in self._merged]

    # ------------------------------------------------------------------ peft-core's AdapterLayer protocol
    @property
    def adapter_names(self) -> list[str]:
        return list(self.road_theta)

    def adapter_parameters(self, adapter_name: str) -> dict[str, nn.Parameter]:
        return {f"road_theta.{adapter_name}": self.road_theta[adapter_name],
                f"road_alpha.{adapter_name}": self.road_alpha[adapter_name]}

    def adapter_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return {}

    def trained_base_parameters(self, adapter_name: str) -> tuple[str, ...]:
        return ()

    # ------------------------------------------------------------------ adapters
    def check_add(self, variant: str, group_size: int) -> None:
        """Raise :class:`TargetError` if this layer's output cannot be split into groups of ``group_size``."""
        out = self.base_layer.out_features
        if out % group_size:
            raise TargetError(f"{self.path} has out_features={out}, not a multiple of RoadConfig.group_size="
                              f"{group_size}; choose a group_size that divides it, or leave the layer out")

    def add(self, name: str, variant: str, group_size: int, init_weights: bool) -> None:
        w = self.base_layer.weight
        size = int(self.base_layer.out_features * _SIZE[variant])
        kw: dict[str, Any] = {"device": w.device, "dtype": w.dtype}  # like the weight (section 5 of the guide)
        if init_weights:  # angle 0, scale 1: the identity, so the adapted model starts as the base model
            theta, alpha = torch.zeros(size, **kw), torch.ones(size, **kw)
        else:  # random rotations, for tests
            theta, alpha = torch.randn(size, **kw) * 0.5, 1 + torch.randn(size, **kw) * 0.5
        self.road_theta[name], self.road_alpha[name] = nn.Parameter(theta), nn.Parameter(alpha)
        self.variant[name], self.group_size[name] = variant, group_size

    def drop(self, name: str) -> None:
        """Forget adapter ``name``; if it is merged, its effect stays in the weights (merge_and_unload)."""
        self._merged = [entry for entry in self._merged if entry[0] != name]
        for table in (self.road_theta, self.road_alpha, self.variant, self.group_size):
            if name in table:
                del table[name]

    def _coefficients(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return coefficients(self.variant[name], self.group_size[name], self.road_theta[name], self.road_alpha[name])

    # ------------------------------------------------------------------ forward
    def _rotate(self, y: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """``y`` rotated by each adapter in turn, computed in the adapters' dtype, returned in ``y``'s."""
        z = y
        for name in names:
            a, b = self._coefficients(name)
            z = rotate(z.to(a.dtype), a, b, self.group_size[name])
        return z.to(y.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rt = self._runtime
        result = self.base_layer(x, *args, **kwargs)
        if rt.disabled:
            return result
        routing = rt.routing()
        if routing is not None:
            return self._mixed(result, routing.names)
        merged = self.merged_adapters
        return self._rotate(result, [n for n in rt.active if n in self.road_theta and n not in merged])

    def _mixed(self, result: torch.Tensor, rows: Sequence[str]) -> torch.Tensor:
        """Mixed-batch inference: each row rotated by its own adapter (none for ``__base__`` rows)."""
        if len(rows) != result.shape[0]:
            raise AdapterError(f"adapter_names has {len(rows)} entries but the batch has {result.shape[0]} rows")
        out = result.clone()
        for name in dict.fromkeys(rows):
            if name in self.road_theta:
                index = torch.tensor([i for i, n in enumerate(rows) if n == name], device=result.device)
                out[index] = self._rotate(result[index], [name])
        return out

    # ------------------------------------------------------------------ merging
    def _merged_tensors(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias with adapter ``name`` folded in, computed in fp32; nothing changed yet.

        The rotation acts on output features, which are the weight's rows: rotate every column."""
        a, b = (c.detach().float() for c in self._coefficients(name))
        g = self.group_size[name]
        new_w = rotate(self.base_layer.weight.detach().float().t(), a, b, g).t()
        bias = self.bias
        return new_w, None if bias is None else rotate(bias.detach().float(), a, b, g)

    def check_merge(self, name: str) -> None:
        """Raise :class:`MergeError` if merging ``name`` would put NaN or Inf into this layer."""
        for t in self._merged_tensors(name):
            if t is not None:
                check_finite(t.to(self.base_layer.weight.dtype), name, self.path)

    def merge(self, name: str) -> None:
        if name not in self.road_theta or name in self.merged_adapters:
            return
        new_w, new_b = self._merged_tensors(name)
        a, b = (c.detach().float() for c in self._coefficients(name))
        inv_a, inv_b = _inverse(a, b, self.group_size[name])
        g = self.group_size[name]
        # the inverse rotation gives back most elements exactly: the token keeps only those it misses
        w_token = replace_exactly(self.base_layer.weight, new_w,
                                  inverse=lambda merged: rotate(merged.float().t(), inv_a, inv_b, g).t())
        b_token = None
        if new_b is not None and self.bias is not None:
            b_token = replace_exactly(self.bias, new_b, inverse=lambda merged: rotate(merged.float(), inv_a, inv_b, g))
        self._merged.append((name, w_token, b_token))

    def unmerge(self, name: str) -> None:
        """Restore the weights to what they were before ``name`` was merged, bit for bit.

        The core unmerges newest first (it unmerges and re-merges later adapters around an older one), so
        ``name`` is this layer's latest merge."""
        if name not in self.merged_adapters:
            return
        if self.merged_adapters[-1] != name:
            raise AdapterError(f"{self.path}: asked to unmerge {name!r} while {self.merged_adapters[-1]!r} was "
                               "merged after it")
        _, w_token, b_token = self._merged.pop()
        restore_exactly(self.base_layer.weight, w_token)
        if b_token is not None and self.bias is not None:
            restore_exactly(self.bias, b_token)

    def restore_bytes(self) -> int:
        """Bytes held to make unmerge exact (for tests and the curious)."""
        return sum(t.nbytes for _, *tokens in self._merged for t in tokens if t is not None)

    def extra_repr(self) -> str:
        return (f"in_features={self.base_layer.in_features}, out_features={self.base_layer.out_features}, "
                f"adapters={self.adapter_names}, merged={self.merged_adapters}")
