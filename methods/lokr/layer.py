"""``LoKrLayer``: one targeted layer (``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d``) plus the Kronecker factors of
every LoKr adapter on it.

The update of adapter ``n`` is ``kron(w1, w2) * alpha / r`` reshaped to the base weight's shape, where ``w1`` is
``lokr_w1`` or ``lokr_w1_a @ lokr_w1_b`` and ``w2`` is ``lokr_w2``, ``lokr_w2_a @ lokr_w2_b`` or (effective conv)
the Tucker product of ``lokr_t2`` with ``lokr_w2_a`` and ``lokr_w2_b``. Which tensors exist and their shapes are
Hugging Face PEFT's choices (:func:`plan_factors`), so PEFT's files load as they are. The layer is self-contained
on purpose: LoHa's layer shares its outline, and a common LyCORIS base may be extracted later.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from peft_core.amp import autocast_off
from peft_core.errors import MergeError, TargetError
from peft_core.merging import RestoreToken, added_exactly, check_finite, restore_exactly
from peft_core.runtime import AdapterRuntime
from torch import nn

__all__ = ["TENSOR_NAMES", "FactorPlan", "LoKrLayer", "factorization", "kron", "layer_kind", "plan_factors"]

#: The ParameterDict attributes (PEFT's names: the state-dict keys are PEFT's up to the adapter name).
TENSOR_NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d"`` (``torch.nn.Conv1d``, not GPT-2's ``Conv1D``), ``"conv2d"``, or None: the layer
    types PEFT's LoKr adapts."""
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into ``(m, n)`` with ``m * n == dimension``, by LyCORIS' rule (which PEFT keeps):

    - a positive ``factor`` that divides ``dimension`` gives ``(factor, dimension // factor)`` as is;
    - otherwise divisors are tried upwards from 2 (none above ``factor`` when it is positive, any with ``-1``)
      until the pair crosses the square root; the result is ordered ``m <= n``.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        # LyCORIS also compares the pair's sum with that of (1, dimension), which never stops the walk
        if candidate > limit:
            break
        m, n = candidate, dimension // candidate
    return (n, m) if m > n else (m, n)


@attrs.frozen
class FactorPlan:
    """The factor shapes of one adapter on one layer: ``out = a * b``, ``in = c * d`` (``in`` per group for
    convolutions), ``kernel`` the conv kernel (empty for Linear); ``full_w1`` / ``full_w2`` say whether each
    factor is one matrix or a rank-``r`` product; ``effective`` whether ``w2`` is a Tucker decomposition."""

    a: int
    b: int
    c: int
    d: int
    kernel: tuple[int, ...]
    r: int
    full_w1: bool
    full_w2: bool
    effective: bool

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The tensors this plan creates, in PEFT's initialisation order (w1 side, w2 side, then the core)."""
        out: dict[str, tuple[int, ...]] = {}
        if self.full_w1:
            out["lokr_w1"] = (self.a, self.c)
        else:
            out["lokr_w1_a"] = (self.a, self.r)
            out["lokr_w1_b"] = (self.r, self.c)
        if self.full_w2:
            out["lokr_w2"] = (self.b, self.d, *self.kernel)
        elif self.effective:
            # PEFT's Conv1d core is (r, r, k, 1): the same 2-D Tucker product, with a unit second kernel axis
            k2 = self.kernel if len(self.kernel) == 2 else (*self.kernel, 1)
            out["lokr_w2_a"] = (self.r, self.b)
            out["lokr_w2_b"] = (self.r, self.d)
            out["lokr_t2"] = (self.r, self.r, *k2)
        else:
            out["lokr_w2_a"] = (self.b, self.r)
            out["lokr_w2_b"] = (self.r, self.d * math.prod(self.kernel))
        return out


def plan_factors(base_layer: nn.Module, r: int, *, decompose_both: bool, decompose_factor: int,
                 use_effective_conv2d: bool) -> FactorPlan:
    """PEFT 0.21's shape choice for ``base_layer``: sizes from :func:`factorization`, a factor is full unless ``r``
    is below half of its larger side (``w1`` is decomposed only with ``decompose_both``), and the effective conv
    form only for kernels larger than 1."""
    kind = layer_kind(base_layer)
    if kind == "linear":
        in_dim, out_dim, kernel = base_layer.in_features, base_layer.out_features, ()
    elif kind in ("conv1d", "conv2d"):
        in_dim, out_dim = base_layer.in_channels // base_layer.groups, base_layer.out_channels
        kernel = tuple(base_layer.kernel_size)
    else:
        raise TypeError(f"LoKr cannot adapt a {type(base_layer).__name__}")
    c, d = factorization(in_dim, decompose_factor)
    a, b = factorization(out_dim, decompose_factor)
    full_w1 = not (decompose_both and r < max(a, c) / 2)
    full_w2 = not r < max(b, d) / 2
    effective = use_effective_conv2d and bool(kernel) and any(k != 1 for k in kernel)
    return FactorPlan(a, b, c, d, kernel, r, full_w1, full_w2, effective and not full_w2)


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.kron(a, b)``: the operand with fewer axes gets leading unit axes, then block ``i`` of the result is
    ``a[i] * b``. Written out as one broadcast product because ``torch.kron`` fails ("view size is not
    compatible") on an einsum result with a trailing unit axis, which the effective Conv1d and ``(k, 1)``
    kernels produce (Hugging Face PEFT 0.21 raises there)."""
    n = max(a.dim(), b.dim())
    a = a.reshape((1,) * (n - a.dim()) + tuple(a.shape))
    b = b.reshape((1,) * (n - b.dim()) + tuple(b.shape))
    spread_a = [s for d in a.shape for s in (d, 1)]
    spread_b = [s for d in b.shape for s in (1, d)]
    return (a.reshape(spread_a) * b.reshape(spread_b)).reshape([x * y for x, y in zip(a.shape, b.shape)])


def _kaiming(t: torch.Tensor) -> None:
    # the default init of nn.Linear (and PEFT's choice for every random LoKr factor)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class LoKrLayer(nn.Module):
    """Wraps ``base_layer``; adapter tensors live in the ParameterDicts of :data:`TENSOR_NAMES` keyed by adapter."""

    # PEFT's LyCORIS layers have no mixed-batch inference (adapter_names): refused rather than guessed
    supports_routing = False

    def __init__(self, base_layer: nn.Module, runtime: AdapterRuntime, path: str = "") -> None:
        super().__init__()
        kind = layer_kind(base_layer)
        if kind is None:
            raise TargetError(f"LoKr cannot adapt {path!r}, a {type(base_layer).__name__}; it adapts torch.nn.Linear, "
                              "torch.nn.Conv1d and torch.nn.Conv2d (as Hugging Face PEFT)")
        self.base_layer = base_layer
        for name in TENSOR_NAMES:
            setattr(self, name, nn.ParameterDict())
        self.kind = kind
        self.path = path
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}
        self.module_dropout: dict[str, float] = {}
        self._runtime = runtime
        self._merged: dict[str, RestoreToken] = {}

    # models read their layers' weight directly (T5 checks ``wo.weight.dtype``): the base layer's, as in PEFT
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def _tensors(self, adapter_name: str) -> dict[str, nn.Parameter]:
        return {t: getattr(self, t)[adapter_name] for t in TENSOR_NAMES if adapter_name in getattr(self, t)}

    # ------------------------------------------------------------------ the AdapterLayer protocol
    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    def adapter_parameters(self, adapter_name: str) -> Mapping[str, nn.Parameter]:
        return {f"{t}.{adapter_name}": p for t, p in self._tensors(adapter_name).items()}

    def adapter_state(self, adapter_name: str) -> Mapping[str, torch.Tensor]:
        return {}

    def trained_base_parameters(self, adapter_name: str) -> Collection[str]:
        return ()

    # ------------------------------------------------------------------ adapters
    def add(self, adapter_name: str, r: int, alpha: float, *, rank_dropout: float, module_dropout: float,
            rank_dropout_scale: bool, init_weights: bool | str, decompose_both: bool, decompose_factor: int,
            use_effective_conv2d: bool) -> None:
        plan = plan_factors(self.base_layer, r, decompose_both=decompose_both, decompose_factor=decompose_factor,
                            use_effective_conv2d=use_effective_conv2d)
        w = self.base_layer.weight
        # made in fp32 on the CPU and initialised there, then moved like PEFT does: a seeded init gives PEFT's values
        made = {name: torch.empty(shape) for name, shape in plan.shapes().items()}
        for name, t in made.items():
            zero = (name in ("lokr_w1", "lokr_w1_a") and init_weights is True) or (
                name in ("lokr_w2", "lokr_w2_b") and init_weights == "lycoris")
            if zero:  # one side zero: the update starts at 0 while the other side trains
                nn.init.zeros_(t)
            else:
                _kaiming(t)
        dtype = w.dtype if w.is_floating_point() else None
        for name, t in made.items():
            getattr(self, name)[adapter_name] = nn.Parameter(t.to(device=w.device, dtype=dtype))
        self.r[adapter_name] = r
        self.alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / r
        self.rank_dropout[adapter_name] = rank_dropout
        self.rank_dropout_scale[adapter_name] = rank_dropout_scale
        self.module_dropout[adapter_name] = module_dropout

    def drop(self, adapter_name: str) -> None:
        """Forget ``adapter_name`` (a merged one stays folded into the weight: merge_and_unload)."""
        for name in TENSOR_NAMES:
            if adapter_name in getattr(self, name):
                del getattr(self, name)[adapter_name]
        for table in (self.r, self.alpha, self.scaling, self.rank_dropout, self.rank_dropout_scale,
                      self.module_dropout, self._merged):
            table.pop(adapter_name, None)

    @property
    def merged_adapters(self) -> list[str]:
        return list(self._merged)

    # ------------------------------------------------------------------ the update
    def delta_weight(self, adapter_name: str, *, rank_dropout: bool = False) -> torch.Tensor:
        """``kron(w1, w2) * alpha / r`` in the base weight's shape (rows dropped when ``rank_dropout``)."""
        t = self._tensors(adapter_name)
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:  # Tucker: core (r, r, k1, k2) times the output (r, b) and input (r, d) factors
            w2 = torch.einsum("ijkl,ip,jq->pqkl", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.dim() == 4:  # a conv w2 carries the kernel: w1 gets unit kernel axes so the product keeps it
            w1 = w1[:, :, None, None]
        # kron pads the lower-rank operand with leading axes (PEFT's full Conv1d w2 is 3-D against a 2-D w1);
        # whatever it gives is then read in the base weight's shape, which is how PEFT's files are meant
        weight = (kron(w1, w2) * self.scaling[adapter_name]).reshape(self.base_layer.weight.shape)
        if rank_dropout:
            # drawn on the CPU generator, one number per output row, as PEFT does (a seeded forward matches it)
            keep = (torch.rand(weight.size(0)) > self.rank_dropout[adapter_name]).float()
            if self.rank_dropout_scale[adapter_name] and keep.any():  # PEFT divides by zero when all rows drop
                keep = keep / keep.mean()
            keep = keep.view(-1, *[1] * (weight.dim() - 1)).to(weight.device)
            weight = (weight * keep).to(weight.dtype)
        return weight

    def _delta_activations(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        w = self.delta_weight(adapter_name, rank_dropout=self.training and bool(self.rank_dropout[adapter_name]))
        x = x if x.dtype == w.dtype else x.to(w.dtype)
        if self.kind == "linear":
            return F.linear(x, w)  # the base layer's output already holds the bias
        conv = self.base_layer
        fn = F.conv2d if self.kind == "conv2d" else F.conv1d
        return fn(x, w, stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rt = self._runtime
        result = self.base_layer(x, *args, **kwargs)
        if not rt.disabled:
            for name in rt.active:
                if name not in self.r or name in self._merged:
                    continue
                # in training PEFT draws one number per adapter and layer even when module_dropout is 0; drawing
                # the same ones keeps the random stream (rank dropout, the model's dropout) equal to PEFT's
                if self.training and not torch.rand(1) > self.module_dropout[name]:
                    continue
                result = result + self._delta_activations(name, x)
        # PEFT returns the input's dtype (the fp32 update promotes a bf16 base output; autocast lowers it)
        return result.to(x.dtype)

    # ------------------------------------------------------------------ merging
    def _merge_where(self) -> str:
        return f"{self.path or 'this layer'}.weight"

    def _merge_delta(self, adapter_name: str) -> torch.Tensor:
        """The update to fold in, in fp32: computed outside autocast (a merge under ``torch.autocast`` would
        otherwise multiply the factors in bf16) and outside autograd."""
        w = self.base_layer.weight
        with torch.no_grad(), autocast_off(w.device.type):
            return self.delta_weight(adapter_name).float()

    def check_merge(self, adapter_name: str) -> None:
        """``safe_merge``: MergeError if merging would put NaN/Inf into the weight (nothing is changed)."""
        if adapter_name not in self.r or adapter_name in self._merged:
            return
        w = self.base_layer.weight
        new = w.detach().float() + self._merge_delta(adapter_name).to(w.device)
        check_finite(new.to(w.dtype), adapter_name, self._merge_where())

    def merge(self, adapter_name: str, safe: bool = False) -> None:
        """``W += delta`` computed in fp32 and rounded once, recorded so that :meth:`unmerge` is exact."""
        if adapter_name not in self.r or adapter_name in self._merged:
            return
        w = self.base_layer.weight
        if w.is_meta:
            raise MergeError(f"cannot merge LoKr adapter {adapter_name!r} into {self.path!r}: its weight is on the "
                             "meta device; load real weights first")
        self._merged[adapter_name] = added_exactly(w, self._merge_delta(adapter_name), safe=safe,
                                                   adapter_name=adapter_name, where=self._merge_where())

    def unmerge(self, adapter_name: str) -> None:
        """Put the base weight back bit for bit (the core unmerges newest first)."""
        token = self._merged.pop(adapter_name, None)
        if token is not None:
            restore_exactly(self.base_layer.weight, token)

    def extra_repr(self) -> str:
        parts = []
        for name in self.r:
            shapes = ", ".join(f"{t}={tuple(p.shape)}" for t, p in self._tensors(name).items())
            parts.append(f"{name}: r={self.r[name]}, scale={self.scaling[name]:g} ({shapes})")
        return "lokr " + "; ".join(parts)
