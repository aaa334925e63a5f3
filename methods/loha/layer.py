"""``LoHaLayer``: one targeted ``Linear`` / ``Conv1d`` / ``Conv2d`` plus the LoHa factors of every adapter on it.

The update of one adapter is a Hadamard (elementwise) product of two low-rank products::

    dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r                    (Linear; convs with the kernel flattened)
    dW[o, i, k..] = (T1 x1 w1_a x2 w1_b) * (T2 x1 w2_a x2 w2_b) * s    (convs, use_effective_conv2d: Tucker form)

Tensor names and shapes are Hugging Face PEFT's (``hada_w1_a`` ... ``hada_t2``, ``ParameterDict``s keyed by
adapter), so its files load as they are. The forward adds ``F.linear(x, dW)`` (or the conv with ``dW``) to the
base output, the way PEFT does, so logits agree to rounding; merging adds ``dW`` to the weight through
``peft_core.merging``, so unmerging gives back the weight's bits.

Kept plain and self-contained on purpose: LoKr (``methods/lokr``) is built from the same LyCORIS family at the same
time, and a shared base may be extracted later from what the two really have in common.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from peft_core.amp import autocast_off
from peft_core.errors import AdapterError, ConfigError, MergeError, TargetError
from peft_core.merging import RestoreToken, added_exactly, check_finite, restore_exactly
from peft_core.runtime import AdapterRuntime
from torch import nn

__all__ = ["TENSOR_NAMES", "LoHaLayer", "hadamard_delta", "layer_kind", "tucker_delta"]

#: The per-adapter tensors, in PEFT's attribute (and file key) names.
TENSOR_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d"`` or ``"conv2d"``: the layer types PEFT's LoHa adapts; None for anything else
    (GPT-2's ``Conv1D`` included: PEFT has no LoHa layer for it)."""
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def hadamard_delta(w1_a: torch.Tensor, w1_b: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """``(w1_a @ w1_b) * (w2_a @ w2_b) * scale``: an (out, in) matrix of rank up to r**2 from rank-r factors."""
    return ((w1_a @ w1_b) * (w2_a @ w2_b)) * scale


def tucker_delta(t1: torch.Tensor, w1_a: torch.Tensor, w1_b: torch.Tensor, t2: torch.Tensor, w2_a: torch.Tensor,
                 w2_b: torch.Tensor, scale: float) -> torch.Tensor:
    """The Tucker form: each core ``t`` (r, r, kh, kw) is taken to (out, in, kh, kw) by ``w_a`` (r, out) on its
    first mode and ``w_b`` (r, in) on its second; the two kernels are multiplied elementwise."""
    one = torch.einsum("abhw,ao,bi->oihw", t1, w1_a, w1_b)
    two = torch.einsum("abhw,ao,bi->oihw", t2, w2_a, w2_b)
    return one * two * scale


class LoHaLayer(nn.Module):
    """Wraps ``base_layer`` (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``); the factors live in the
    ``hada_*`` ``ParameterDict``s under the adapter's name."""

    # PEFT's LyCORIS layers have no mixed-batch inference (they ignore adapter_names): refused, not guessed
    supports_routing = False

    def __init__(self, base_layer: nn.Module, runtime: AdapterRuntime, path: str = "") -> None:
        kind = layer_kind(base_layer)
        if kind is None:
            raise TargetError(f"LoHa target {path!r} is a {type(base_layer).__module__}.{type(base_layer).__name__}; "
                              "LoHa adapts torch.nn.Linear, torch.nn.Conv1d and torch.nn.Conv2d (as Hugging Face "
                              "PEFT). Narrow target_modules or add it to exclude_modules")
        super().__init__()
        self.base_layer = base_layer
        self.hada_w1_a = nn.ParameterDict()
        self.hada_w1_b = nn.ParameterDict()
        self.hada_w2_a = nn.ParameterDict()
        self.hada_w2_b = nn.ParameterDict()
        self.hada_t1 = nn.ParameterDict()
        self.hada_t2 = nn.ParameterDict()
        self.kind = kind
        self.path = path
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.module_dropout: dict[str, float] = {}
        self._runtime = runtime
        # merged adapters, oldest first, with what restores the weight's bits
        self._merged: list[tuple[str, RestoreToken]] = []
        if kind == "linear":
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
        return list(self.hada_w1_a)

    def _dicts(self, adapter_name: str) -> list[tuple[str, nn.ParameterDict]]:
        return [(n, getattr(self, n)) for n in TENSOR_NAMES if adapter_name in getattr(self, n)]

    def adapter_parameters(self, adapter_name: str) -> Mapping[str, nn.Parameter]:
        return {f"{n}.{adapter_name}": d[adapter_name] for n, d in self._dicts(adapter_name)}

    def adapter_state(self, adapter_name: str) -> Mapping[str, torch.Tensor]:
        return {}

    def trained_base_parameters(self, adapter_name: str) -> Collection[str]:
        return ()

    # ------------------------------------------------------------------ adapters
    def _shapes(self, r: int, effective: bool) -> dict[str, tuple[int, ...]]:
        """PEFT's shapes: Linear and flattened convs get (out, r) / (r, in*kernel); the Tucker form gets
        (r, out) / (r, in) factors and (r, r, kh, kw) cores (Conv1d: kw = 1)."""
        base = self.base_layer
        out = self.out_features
        if self.kind == "linear":
            return {"hada_w1_a": (out, r), "hada_w1_b": (r, self.in_features),
                    "hada_w2_a": (out, r), "hada_w2_b": (r, self.in_features)}
        in_pg = base.in_channels // base.groups
        kernel = tuple(base.kernel_size)
        if not effective:
            return {"hada_w1_a": (out, r), "hada_w1_b": (r, in_pg * math.prod(kernel)),
                    "hada_w2_a": (out, r), "hada_w2_b": (r, in_pg * math.prod(kernel))}
        core = (r, r, *kernel) if len(kernel) == 2 else (r, r, kernel[0], 1)
        return {"hada_t1": core, "hada_w1_a": (r, out), "hada_w1_b": (r, in_pg),
                "hada_t2": core, "hada_w2_a": (r, out), "hada_w2_b": (r, in_pg)}

    def add(self, adapter_name: str, r: int, alpha: float, rank_dropout: float, module_dropout: float,
            init_weights: bool, use_effective_conv2d: bool) -> None:
        """Create ``adapter_name``'s factors (PEFT's shapes and init: Kaiming-uniform, ``w2_b`` zeros when
        ``init_weights`` so that dW starts at 0)."""
        if r <= 0:
            raise ConfigError(f"LoHa rank for {self.path!r} must be a positive integer, got {r}")
        # a 1-wide kernel has nothing to decompose: PEFT flattens it like a linear layer
        effective = (use_effective_conv2d and self.kind != "linear"
                     and math.prod(self.base_layer.kernel_size) != 1)
        w = self.base_layer.weight
        dtype = w.dtype if w.is_floating_point() else torch.float32
        # Drawn in float32 on the CPU generator, in PEFT's order (w1_a, w1_b, w2_a, w2_b, then the cores; which is
        # TENSOR_NAMES' order), then moved to the weight's device and dtype, as PEFT does: with the same seed an
        # adapter starts with PEFT's values wherever the model lives. On the meta device nothing is drawn.
        home = w.device if w.is_meta else torch.device("cpu")
        shapes = self._shapes(r, effective)
        for n in TENSOR_NAMES:
            if n not in shapes:
                continue
            t = torch.empty(shapes[n], dtype=torch.float32, device=home)
            if not w.is_meta:
                if n == "hada_w2_b" and init_weights:
                    nn.init.zeros_(t)
                else:
                    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
            getattr(self, n)[adapter_name] = nn.Parameter(t.to(device=w.device, dtype=dtype))
        self.r[adapter_name] = r
        self.alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / r
        self.rank_dropout[adapter_name] = rank_dropout
        self.module_dropout[adapter_name] = module_dropout

    def drop(self, adapter_name: str) -> None:
        """Forget ``adapter_name`` (a merged one stays folded into the weight: merge_and_unload)."""
        for _, d in self._dicts(adapter_name):
            del d[adapter_name]
        for table in (self.r, self.alpha, self.scaling, self.rank_dropout, self.module_dropout):
            table.pop(adapter_name, None)
        self._merged = [(n, t) for n, t in self._merged if n != adapter_name]

    @property
    def merged_adapters(self) -> list[str]:
        return [n for n, _ in self._merged]

    # ------------------------------------------------------------------ the update
    def delta_weight(self, adapter_name: str, *, rank_dropout: bool = False) -> torch.Tensor:
        """``dW`` of ``adapter_name`` in the base weight's shape, in the adapter's dtype (with autograd).

        ``rank_dropout``: PEFT's training-time mask, one ``torch.rand`` draw per output row on the default CPU
        generator (so a seeded forward draws what PEFT's draws); kept rows are divided by the kept fraction."""
        scale = self.scaling[adapter_name]
        if adapter_name in self.hada_t1:
            delta = tucker_delta(self.hada_t1[adapter_name], self.hada_w1_a[adapter_name],
                                 self.hada_w1_b[adapter_name], self.hada_t2[adapter_name],
                                 self.hada_w2_a[adapter_name], self.hada_w2_b[adapter_name], scale)
        else:
            delta = hadamard_delta(self.hada_w1_a[adapter_name], self.hada_w1_b[adapter_name],
                                   self.hada_w2_a[adapter_name], self.hada_w2_b[adapter_name], scale)
        delta = delta.reshape(self.base_layer.weight.shape)
        if rank_dropout:
            keep = (torch.rand(delta.shape[0]) > self.rank_dropout[adapter_name]).to(delta.dtype)
            keep = keep.view(-1, *[1] * (delta.dim() - 1)).to(delta.device)
            # not an unbiased dropout: the kept rows are rescaled by their share (a NaN if none is kept, as PEFT)
            delta = delta * (keep / keep.mean())
        return delta

    def _delta_output(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The base layer's operation with ``delta`` as its weight and no bias (the base output has the bias)."""
        if self.kind == "linear":
            return F.linear(x, delta)
        # the conv's own forward: same stride, padding (and padding_mode), dilation and groups as the base
        return self.base_layer._conv_forward(x, delta, None)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        result = self.base_layer(x, *args, **kwargs)
        rt = self._runtime
        if rt.disabled:
            return result
        merged = self.merged_adapters
        names = [n for n in rt.active if n in self.hada_w1_a and n not in merged]
        if not names:
            return result
        training = self.training
        for name in names:
            # module dropout: PEFT draws torch.rand(1) for every adapter on every layer in every training forward
            # (even with module_dropout=0), before the rank-dropout draws; drawing the same keeps seeded runs equal
            if training and not bool(torch.rand(1) > self.module_dropout[name]):
                continue
            delta = self.delta_weight(name, rank_dropout=training and bool(self.rank_dropout[name]))
            result = result + self._delta_output(x.to(delta.dtype), delta)
        return result.to(x.dtype)  # PEFT returns the input's dtype

    # ------------------------------------------------------------------ merging
    def _merge_delta(self, adapter_name: str) -> torch.Tensor:
        """``dW`` in float32 with no autograd and no autocast (a merge is not a forward)."""
        device = self.base_layer.weight.device
        with torch.no_grad(), autocast_off(device.type):
            saved = {n: d[adapter_name] for n, d in self._dicts(adapter_name)}
            scale = self.scaling[adapter_name]
            f = {n: p.detach().float().to(device) for n, p in saved.items()}
            if "hada_t1" in f:
                delta = tucker_delta(f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"], f["hada_t2"], f["hada_w2_a"],
                                     f["hada_w2_b"], scale)
            else:
                delta = hadamard_delta(f["hada_w1_a"], f["hada_w1_b"], f["hada_w2_a"], f["hada_w2_b"], scale)
            return delta.reshape(self.base_layer.weight.shape)

    def check_merge(self, adapter_name: str, where: str = "") -> None:
        """``safe_merge``: MergeError if merging would put NaN/Inf into the weight (nothing is changed)."""
        if adapter_name not in self.hada_w1_a or adapter_name in self.merged_adapters:
            return
        w = self.base_layer.weight
        check_finite(w.detach().float() + self._merge_delta(adapter_name), adapter_name,
                     f"{where or self.path or 'this layer'}.weight")

    def merge(self, adapter_name: str, safe: bool = False, where: str = "") -> None:
        """Add ``dW`` to the base weight (computed in fp32, rounded once), reversibly."""
        if adapter_name not in self.hada_w1_a or adapter_name in self.merged_adapters:
            return
        w = self.base_layer.weight
        if w.is_meta:
            raise MergeError(f"cannot merge LoHa adapter {adapter_name!r} into {self.path!r}: its weight is on the "
                             "meta device; load real weights first")
        token = added_exactly(w, self._merge_delta(adapter_name), safe=safe, adapter_name=adapter_name,
                              where=f"{where or self.path or 'this layer'}.weight")
        self._merged.append((adapter_name, token))

    def unmerge(self, adapter_name: str) -> None:
        """Put the weight back bit for bit. The core unmerges newest first, so ``adapter_name`` is the latest."""
        names = self.merged_adapters
        if adapter_name not in names:
            return
        if names[-1] != adapter_name:
            raise AdapterError(f"{self.path}: asked to unmerge LoHa adapter {adapter_name!r} while {names[-1]!r} "
                               "was merged after it")
        _, token = self._merged.pop()
        restore_exactly(self.base_layer.weight, token)

    def extra_repr(self) -> str:
        ranks = {n: self.r[n] for n in self.hada_w1_a}
        return f"kind={self.kind}, ranks={ranks}, merged={self.merged_adapters}"
