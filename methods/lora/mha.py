"""LoRA on ``torch.nn.MultiheadAttention``, laid out and computed as Hugging Face PEFT 0.21 does it.

An attention module holds no Linear layer that LoRA could wrap for its input projection: query, key and value
come from one fused parameter, ``in_proj_weight`` (``3 * embed_dim`` x ``embed_dim``), that the attention's
forward multiplies itself; and its ``out_proj`` is a Linear whose *forward* never runs (the attention reads
``out_proj.weight`` and ``out_proj.bias`` and does the product itself). So an adapter here is two updates:

- ``in_proj_weight``: ``lora_A.<adapter>`` (``r x embed_dim``) and ``lora_B.<adapter>`` (``3*embed_dim x r``) on
  :class:`LoraMultiheadAttention`, which wraps the attention;
- ``out_proj``: a LoRA Linear put in the attention's place of ``out_proj`` when the first adapter is added,
  so its tensors are ``base_layer.out_proj.lora_A.<adapter>.weight`` — PEFT's names, on disk as in memory.

Both updates act as *weight* changes: while the attention runs, ``in_proj_weight`` reads as ``W + s B A``
(swapped in for the call with :func:`torch.func.functional_call`, nothing in the module is changed) and the
out_proj layer's ``weight`` reads as ``W_o + s B_o A_o``. PEFT gets the same values by merging before and
unmerging after each call; the outputs and gradients are the same, and the base weights are never written
outside ``merge_adapter``. Because the containers torch ships read these tensors off the attention too
(``nn.TransformerEncoderLayer``'s inference fast path), they see the adapted weights as well.

What follows from a weight-space update (as in PEFT): ``lora_dropout`` has no effect here (there is no
input to drop; LoRA warns when it is asked for), and a mixed batch (``adapter_names=[...]``) cannot give each
row its own adapter (one weight serves the call): the layer says ``supports_routing = False`` and the core
refuses such calls. Refused with a TargetError before the model changes, as in PEFT: a ``kdim``/``vdim``
different from ``embed_dim`` (separate q/k/v weights), DoRA and other variants, and the weight-reading
initialisations (PiSSA, OLoRA, orthogonal).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from peft_core.errors import AdapterError, TargetError
from peft_core.runtime import AdapterRuntime
from torch import nn

from .layers import LoraLinear, ModulePairLayer, new_parameter_kwargs
from .swap import SwapLock
from .variant import LoraVariant

__all__ = ["LoraMultiheadAttention", "LoraOutProj", "check_attention_targets"]


def _without_routing(runtime: AdapterRuntime, names: tuple[str, ...], held: dict[str, int]) -> tuple[str, ...]:
    """``names``, or none during a mixed-batch call: then every row here is a base row, since the core refuses
    calls routing an adapter of this layer (``supports_routing = False``); never apply one to all rows."""
    routing = runtime.routing()
    if routing is None or runtime.disabled:
        return names
    if any(n in held for n in routing.names):
        raise AdapterError("LoRA on a MultiheadAttention cannot give each row of a mixed batch its own adapter "
                           "(adapter_names=[...]): its update is a weight change shared by the whole call; run one "
                           "adapter per call with set_adapter()")
    return ()


class LoraOutProj(LoraLinear):
    """The LoRA Linear in a :class:`LoraMultiheadAttention`'s ``out_proj`` place. The attention never calls it; it
    reads ``out_proj.weight``, which here is the adapted weight ``W_o + sum of s B A`` over the live adapters."""

    #: One weight for the whole call: no per-row adapters (the enclosing attention layer says so too).
    supports_routing = False

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        base = self.base_layer.weight
        names = _without_routing(self._runtime, self._live(), self.r)
        if not names:
            return base
        with torch.autocast(base.device.type, enabled=False):  # a stand-in for a parameter keeps its dtype
            adapted = base
            for name in names:  # one adapter after the other, rounded to the weight's dtype each time (as PEFT)
                adapted = adapted + self.delta_weight(name).to(base.dtype)
        return adapted


class LoraMultiheadAttention(ModulePairLayer):
    """LoRA for ``torch.nn.MultiheadAttention`` (see the module docstring): ``lora_A``/``lora_B`` update the fused
    ``in_proj_weight``; the LoRA layer in ``base_layer.out_proj`` updates the output projection.

    Reads like the attention it wraps (``embed_dim``, ``num_heads``, ``batch_first``, ``in_proj_weight``,
    ``out_proj``... are forwarded, the projections with the live adapters applied), so modules that inspect
    their attention, ``nn.TransformerEncoderLayer`` among them, keep working."""

    #: One weight for the whole call: a mixed batch would need a weight per row.
    supports_routing = False
    supports_lora_bias = False  # the fused in_proj update has no lora_B module to carry one

    def __init__(self, base_layer: nn.MultiheadAttention, runtime: AdapterRuntime) -> None:
        if not base_layer._qkv_same_embed_dim or base_layer.in_proj_weight is None:
            raise TargetError(f"LoRA on a MultiheadAttention needs kdim == vdim == embed_dim (one fused "
                              f"in_proj_weight), got embed_dim={base_layer.embed_dim}, kdim={base_layer.kdim}, "
                              f"vdim={base_layer.vdim}; Hugging Face PEFT has the same limit. Exclude this module")
        weight = base_layer.in_proj_weight
        if not (weight.is_floating_point() or weight.is_meta) or type(weight) not in (torch.Tensor, nn.Parameter):
            raise TargetError(f"LoRA on a MultiheadAttention needs a plain floating-point in_proj_weight, got "
                              f"{type(weight).__name__} of {weight.dtype}")
        if not isinstance(base_layer.out_proj, nn.Linear):
            raise TargetError(f"LoRA on a MultiheadAttention needs its out_proj to be an nn.Linear, got "
                              f"{type(base_layer.out_proj).__name__}")
        super().__init__(base_layer, runtime)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self._swap_lock = SwapLock()  # see forward

    # ---- the out_proj layer (made when the first adapter is added: making a layer must not change the model)
    def _out_layer(self) -> LoraOutProj | None:
        out = self.base_layer.out_proj
        return out if isinstance(out, LoraOutProj) else None

    # ---- adapters
    def add(self, name: str, r: int, alpha: float, dropout: float, use_rslora: bool, init: bool | str,
            trains_bias: bool = False, variant: LoraVariant | None = None, lora_bias: bool = False) -> None:
        if lora_bias:  # LoRA's inject refuses it first (supports_lora_bias); this is for direct calls
            raise TargetError("lora_bias=True is not supported on a MultiheadAttention; exclude it or drop lora_bias")
        if variant is not None:  # LoRA's lora_variant refuses DoRA first; this is for other plugins' variants
            raise TargetError(f"LoRA variant {type(variant).__name__} cannot run on a MultiheadAttention (its update "
                              "is a weight change, not a layer); exclude the attention or use plain LoRA")
        if isinstance(init, str) and init != "gaussian":
            raise TargetError(f"init_lora_weights={init!r} needs a Linear-like layer with a plain float weight; a "
                              "MultiheadAttention (fused in_proj_weight plus out_proj) is not one. Exclude it with "
                              "exclude_modules, or use init_lora_weights=True")
        out = self._out_layer()
        if out is None:
            out = LoraOutProj(self.base_layer.out_proj, self._runtime)
            self.base_layer.out_proj = out
            # PEFT builds out_proj's adapter when it wraps out_proj and again after in_proj's: the same draws in
            # the same order, so a seeded run starts from PEFT's tensors
            out.add(name, r, alpha, dropout, use_rslora, init, trains_bias)
        # the attention's own bias (in_proj_bias) is not a ``bias`` PEFT's bias="lora_only" finds: only out_proj's
        super().add(name, r, alpha, dropout, use_rslora, init, trains_bias=False)
        out.add(name, r, alpha, dropout, use_rslora, init, trains_bias)

    def drop(self, name: str) -> None:
        super().drop(name)
        out = self._out_layer()
        if out is not None and name in out.r:  # LoRA's remove drops the inner layer first; direct calls get here
            out.drop(name)
        if out is not None and not out.r:
            self.base_layer.out_proj = out.base_layer

    def _create(self, name: str, r: int, init: bool | str) -> None:
        kw = new_parameter_kwargs(self.base_layer.in_proj_weight)
        self._store(name, nn.Linear(self.in_features, r, bias=False, **kw),
                    nn.Linear(r, self.out_features, bias=False, **kw), r, init)

    def delta_weight(self, name: str) -> torch.Tensor:
        a = self.lora_A[name].weight.float()
        b = self.lora_B[name].weight.float()
        return (b @ a) * self.scaling[name]

    def _adapted_in_proj(self, names: Sequence[str]) -> torch.Tensor:
        base = self.base_layer.in_proj_weight
        with torch.autocast(base.device.type, enabled=False):  # a stand-in for a parameter keeps its dtype
            adapted = base
            for name in names:  # one adapter after the other, rounded to the weight's dtype each time (as PEFT)
                adapted = adapted + self.delta_weight(name).to(base.dtype)
        return adapted

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        query = args[0] if args else kwargs.get("query")
        names = _without_routing(self._runtime, self._live(), self.r)
        if names:
            # the attention runs with the adapted in_proj_weight in the parameter's place, put back right after
            # (also on error). The swap changes the module for everyone, so calls through this layer take turns.
            with self._swap_lock:
                result = torch.func.functional_call(self.base_layer, {"in_proj_weight": self._adapted_in_proj(names)},
                                                    args, kwargs)
        else:
            result = self.base_layer(*args, **kwargs)
        # out_proj's adapters need nothing here: the attention reads its (adapted) weight itself.
        # The outputs in the query's dtype, as PEFT returns them (under autocast the attention's are half precision)
        if isinstance(query, torch.Tensor) and isinstance(result, tuple) and len(result) == 2:
            out, attn = result
            return out.to(query.dtype), (attn.to(query.dtype) if attn is not None else None)
        return result

    # ---- merging: into in_proj_weight (out_proj's layer merges its own weight)
    @property
    def merge_target(self) -> torch.Tensor:
        return self.base_layer.in_proj_weight

    # ---- reads like the attention it wraps
    @property
    def in_proj_weight(self) -> torch.Tensor:
        """The fused q/k/v weight as the attention sees it now: with the live adapters applied."""
        return self._adapted_in_proj(_without_routing(self._runtime, self._live(), self.r))

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        return self.base_layer.in_proj_bias

    @property
    def out_proj(self) -> nn.Module:
        """The attention's out_proj (LoRA's layer, whose ``weight`` has the live adapters applied)."""
        return self.base_layer.out_proj

    @property
    def embed_dim(self) -> int:
        return self.base_layer.embed_dim

    @property
    def kdim(self) -> int:
        return self.base_layer.kdim

    @property
    def vdim(self) -> int:
        return self.base_layer.vdim

    @property
    def _qkv_same_embed_dim(self) -> bool:
        return self.base_layer._qkv_same_embed_dim

    @property
    def num_heads(self) -> int:
        return self.base_layer.num_heads

    @property
    def head_dim(self) -> int:
        return self.base_layer.head_dim

    @property
    def dropout(self) -> float:
        return self.base_layer.dropout

    @property
    def batch_first(self) -> bool:
        return self.base_layer.batch_first

    @property
    def bias_k(self) -> torch.Tensor | None:
        return self.base_layer.bias_k

    @property
    def bias_v(self) -> torch.Tensor | None:
        return self.base_layer.bias_v

    @property
    def add_zero_attn(self) -> bool:
        return self.base_layer.add_zero_attn

    def merge_masks(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_layer.merge_masks(*args, **kwargs)


def check_attention_targets(model: nn.Module, targets: Sequence[str], dropout: float) -> None:
    """Warn where a LoRA config asks for something that cannot act on a MultiheadAttention (Hugging Face PEFT
    accepts both silently, and its files must keep loading here, hence warnings rather than errors):
    ``lora_dropout`` on a targeted attention, and an attention's ``out_proj`` targeted without the attention
    (``"all-linear"`` does that), whose LoRA would never run since the attention never calls ``out_proj``."""
    chosen = set(targets)
    for path in targets:
        module = model.get_submodule(path)
        if dropout and isinstance(module, (nn.MultiheadAttention, LoraMultiheadAttention)):
            warnings.warn(f"lora_dropout={dropout} has no effect on MultiheadAttention {path!r} (as in Hugging Face "
                          "PEFT): its LoRA update is a weight change, with no input to drop", UserWarning,
                          stacklevel=2)
        parent, _, leaf = path.rpartition(".")
        if leaf != "out_proj" or parent in chosen:
            continue
        holder = model.get_submodule(parent) if parent else model
        if isinstance(holder, nn.MultiheadAttention):
            warnings.warn(f"LoRA on {path!r} will never run: that MultiheadAttention reads out_proj's weight itself "
                          f"and never calls out_proj (Hugging Face PEFT behaves the same). Target the attention "
                          f"{parent!r} instead (LoRA then adapts in_proj and out_proj), or exclude {path!r} with "
                          "exclude_modules", UserWarning, stacklevel=2)
