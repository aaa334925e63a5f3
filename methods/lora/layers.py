"""LoRA layers: each wraps one base layer (kept as ``base_layer``) and holds any number of adapters.

Parameter names follow Hugging Face PEFT (``lora_A.<adapter>.weight``, ``lora_embedding_A.<adapter>``),
so ``named_parameters()`` reads the same to a PEFT user. Layers read the model's
:class:`~peft_core.AdapterRuntime` at forward time; activating or disabling adapters never walks them.

Every layer implements peft-core's :class:`~peft_core.layers.AdapterLayer` protocol (what it owns, which
base parameters an adapter trains, whether it routes mixed batches), so the core does the bookkeeping.
New parameters are created in the base weight's dtype and device; the core then applies
``autocast_adapter_dtype`` (fp32 adapters on half-precision models) and ``low_cpu_mem_usage``.

Public for extensions (see :mod:`peft_lora.hookspecs`): :class:`LoraLayer` (the base every LoRA layer
shares), :class:`ModulePairLayer` (A and B as modules), :class:`ConvLoraLayer` (any ``nn.ConvNd``: name the conv
class and functional),
:class:`LoraLinear` (subclass it for a Linear-like layer with another weight format).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from peft_core.errors import AdapterError
from peft_core.merging import RestoreToken, added_exactly, replace_exactly, restore_exactly
from peft_core.runtime import AdapterRuntime, Routing
from torch import nn
from torch.nn.modules.module import _global_forward_hooks

from .functional import lora_linear, lora_linear_gated
from .fused import fused_forward
from .variant import LoraVariant, trained_only, variant_state

__all__ = ["ConvLoraLayer", "LoraConv1d", "LoraConv2d", "LoraConv3d", "LoraEmbedding", "LoraLayer", "LoraLinear",
           "ModulePairLayer", "builtin_layer", "new_parameter_kwargs", "supported_base"]


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def supported_base(module: nn.Module) -> str | None:
    """The kind of a layer by its type ("linear", "conv1d" for transformers' Conv1D, "embedding", "conv1d_torch",
    "conv2d", "conv3d", "multihead_attention"), or None. Subclasses count
    (a quantized ``nn.Linear`` is "linear" for ``target_modules="all-linear"``); whether LoRA's built-in
    layers can wrap it is :func:`builtin_layer`'s question."""
    if isinstance(module, LoraLayer):
        return supported_base(module.base_layer)
    if isinstance(module, nn.Linear):
        return "linear"
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Conv1d):
        return "conv1d_torch"  # "conv1d" is transformers' Conv1D (GPT-2), a Linear with a transposed weight
    if isinstance(module, nn.Conv3d):
        return "conv3d"
    if isinstance(module, nn.MultiheadAttention):
        return "multihead_attention"
    return None


def new_parameter_kwargs(weight: torch.Tensor) -> dict[str, Any]:
    """``device``/``dtype`` for an adapter tensor created beside ``weight`` (fp32 beside a non-float weight)."""
    # like the weight they sit beside; the core keeps half-precision adapters in fp32
    # (autocast_adapter_dtype) and moves them to meta (low_cpu_mem_usage) afterwards
    return {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else torch.float32}


def uninitialised_linear(in_features: int, out_features: int, bias: bool, device: torch.device | None = None,
                         dtype: torch.dtype | None = None) -> nn.Linear:
    """An ``nn.Linear`` built as its ``__init__`` builds it, minus ``reset_parameters``: for values that are
    overwritten right after (loading). 14 µs instead of 80-160 µs for a LoRA-sized one, most of it the init's
    Python; ``torch.nn.utils.skip_init`` (a meta round trip) costs more than the init. A test checks that it ends
    up with the attributes of a real one, in case torch's ``__init__`` changes."""
    layer = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features = in_features, out_features
    layer.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
    layer.register_parameter("bias", nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
                             if bias else None)
    return layer


class LoraLayer(nn.Module):
    """Common state and merge bookkeeping of every LoRA layer (implements peft-core's ``AdapterLayer``).

    Subclasses implement ``_create``, ``_delete``, ``delta_weight``, ``adapter_parameters`` and ``forward``.
    """

    #: Mixed batches (``adapter_names=[...]``): every built-in layer computes each row with its adapter.
    supports_routing = True
    #: ``base_layer.weight`` is the layer's dense floating-point weight in its usual layout, which DoRA and the
    #: weight-reading initialisations (PiSSA, OLoRA) read and write; a layer over a packed or quantized weight
    #: sets False, and those features then refuse it with a TargetError instead of reading the packed bits.
    plain_weight = True
    #: DoRA may run on this layer (it implements ``peft_lora.dora.DoraLayout`` for its weight format): by default
    #: where the weight is plain; a quantized layer that reads its weight dequantized sets True.
    @property
    def supports_dora(self) -> bool:
        return self.plain_weight

    #: lora_B can carry a bias (``lora_bias=True``); embeddings cannot (their A and B are bare parameters).
    supports_lora_bias = True

    def __init__(self, base_layer: nn.Module, runtime: AdapterRuntime) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._runtime = runtime
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.dropout_p: dict[str, float] = {}
        self._restore: dict[str, RestoreToken] = {}  # merged adapter -> what unmerge needs for an exact restore
        self.trains_bias: dict[str, bool] = {}  # adapter -> it trains the base layer's bias (bias != "none")
        self.variants: dict[str, LoraVariant] = {}  # adapter -> its variant (DoRA...), for those that have one
        self.lora_bias: dict[str, bool] = {}  # adapter -> lora_B has a bias (PEFT's lora_bias)
        self._restore_bias: dict[str, RestoreToken] = {}  # merged lora_bias adapter -> the base bias's restore data
        self._generation = 0  # bumped whenever the held or merged adapters change (invalidates _live's memo)

    # ---- subclass interface
    def _create(self, name: str, r: int, init: bool | str) -> None:
        raise NotImplementedError

    def _delete(self, name: str) -> None:
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """The adapter's update in the base weight's layout and dtype-agnostic fp32."""
        raise NotImplementedError

    # ---- the AdapterLayer protocol
    def adapter_parameters(self, adapter_name: str) -> dict[str, nn.Parameter]:
        raise NotImplementedError

    def adapter_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        # plain LoRA keeps none; a variant's frozen tensors (MiCA's B) and module buffers (VeLoRA's projection)
        return variant_state(self, adapter_name)

    def trained_base_parameters(self, adapter_name: str) -> tuple[str, ...]:
        bias = getattr(self.base_layer, "bias", None)
        if self.trains_bias.get(adapter_name) and isinstance(bias, nn.Parameter):
            return ("base_layer.bias",)
        return ()

    @property
    def weight(self) -> torch.Tensor:  # code that reads layer.weight keeps working
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    # ---- adapters
    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    def add(self, name: str, r: int, alpha: float, dropout: float, use_rslora: bool, init: bool | str,
            trains_bias: bool = False, variant: LoraVariant | None = None, lora_bias: bool = False) -> None:
        self._generation += 1
        self.trains_bias[name] = trains_bias
        self.lora_bias[name] = lora_bias
        self.r[name] = r
        self.lora_alpha[name] = alpha
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout_p[name] = dropout
        self._runtime.slot(name)  # its gate column in compiled graphs (see _forward_gated)
        if variant is not None and "init_lora_weights" in getattr(variant, "claims", ()):
            init = False  # the variant initialises A and B itself (MiCA), from the factories' own draws as in PEFT
        # loading: the file gives A and B right after (the core refuses a file missing one), so LoraLinear skips
        # the init it would throw away (about 5 of B5's 22 ms per load); a variant or a data-dependent init may
        # read them, so those still initialise
        self._fill = self._runtime.filling and variant is None and (init is True or init is False or init == "gaussian")
        try:
            self._create(name, r, init)
        finally:
            self._fill = False
        if isinstance(init, str) and init != "gaussian":
            from .init import initialise  # the data-dependent initialisations (PiSSA, OLoRA, ...)

            initialise(self, name, init)
        if variant is not None:
            store = self._modules.get(variant.attr)
            if store is None:
                store = nn.ModuleDict()
                self.add_module(variant.attr, store)
            store[name] = variant.create(self, name)  # type: ignore[index]
            self.variants[name] = variant

    def drop(self, name: str) -> None:
        self._generation += 1
        self._restore.pop(name, None)
        self._restore_bias.pop(name, None)
        for d in (self.r, self.lora_alpha, self.scaling, self.dropout_p, self.trains_bias, self.lora_bias):
            d.pop(name, None)
        variant = self.variants.pop(name, None)
        if variant is not None:
            del getattr(self, variant.attr)[name]
        self._delete(name)

    def variant_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """The parameters of ``name``'s variant module (DoRA's magnitude), keyed relative to this layer."""
        variant = self.variants.get(name)
        if variant is None:
            return {}
        module = getattr(self, variant.attr)[name]
        return {f"{variant.attr}.{name}.{k}": v for k, v in module.named_parameters()}

    @property
    def merge_target(self) -> torch.Tensor:
        """The tensor merging folds this layer's update into: the base weight. A layer that adapts another tensor
        (an ``nn.Parameter`` of its module, an attention's ``in_proj_weight``) names it here, and merge, unmerge
        and ``merged_weight`` follow."""
        return self.base_layer.weight

    def merged_weight(self, name: str) -> torch.Tensor:
        """The merge target with ``name`` folded in (fp32): what merging writes."""
        variant = self.variants.get(name)
        if variant is not None:
            return variant.merged_weight(self, name)
        w = self.merge_target
        return w.detach().float() + self.delta_weight(name).to(w.device)

    def _live(self) -> tuple[str, ...]:
        """Active adapters this layer holds and has not merged (memoized: this runs in every forward,
        and decoding is dominated by such per-layer overhead)."""
        rt = self._runtime
        if rt.disabled:
            return ()
        if torch.compiler.is_compiling():  # a graph evaluates this once; the memo write would be replayed per call
            return tuple(n for n in rt.active if n in self.r and n not in self._restore)
        key = (rt.active, self._generation)
        memo = self.__dict__.get("_live_memo")
        if memo is not None and memo[0] == key:
            return memo[1]
        live = tuple(n for n in rt.active if n in self.r and n not in self._restore)
        self.__dict__["_live_memo"] = (key, live)
        return live

    def _routed_rows(self, x: torch.Tensor, routing: Routing, result: torch.Tensor,
                     one: Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]) -> torch.Tensor:
        """A mixed batch group by group (the generic route, for layers or adapters without a batched one):
        ``one(rows_x, rows_result, adapter)`` returns those rows' output with the adapter applied, where
        ``rows_result`` is their base output. Rows of ``__base__`` and of adapters this layer lacks keep it."""
        if len(routing.names) != x.shape[0]:
            raise AdapterError(f"adapter_names has {len(routing.names)} entries but the batch has "
                               f"{x.shape[0]} rows")
        out = result
        for name in dict.fromkeys(routing.names):
            if name not in self.r:
                continue
            rows = torch.tensor([i for i, n in enumerate(routing.names) if n == name], device=x.device)
            new = one(x.index_select(0, rows), result.index_select(0, rows), name)
            out = out.index_copy(0, rows, new.to(out.dtype))
        return out

    # ---- merging
    def merge(self, name: str, safe: bool) -> None:
        if name not in self.r or name in self._restore:
            return
        self._generation += 1
        weight = self.merge_target
        base_bias = self._base_bias(name) if self.lora_bias.get(name) else None  # refuse before changing anything
        with torch.no_grad():
            variant = self.variants.get(name)
            if variant is not None:  # not an addition: write the merged value, remember the changed bits
                new = variant.merged_weight(self, name)
                if safe:
                    from peft_core.merging import check_finite

                    check_finite(new, name)
                self._restore[name] = replace_exactly(weight, new)
            else:
                self._restore[name] = added_exactly(weight, self.delta_weight(name), safe=safe, adapter_name=name)
            if base_bias is not None:  # lora_B's bias, scaled, folds into the base bias
                self._restore_bias[name] = added_exactly(base_bias, self.bias_delta(name), safe=safe,
                                                         adapter_name=name)

    def unmerge(self, name: str) -> None:
        self._generation += 1
        token = self._restore.pop(name, None)
        if token is not None:
            restore_exactly(self.merge_target, token)
        token = self._restore_bias.pop(name, None)
        if token is not None:
            restore_exactly(self.base_layer.bias, token)

    def _base_bias(self, name: str) -> torch.Tensor:
        bias = getattr(self.base_layer, "bias", None)
        if not isinstance(bias, torch.Tensor):
            from peft_core.errors import MergeError

            raise MergeError(f"adapter {name!r} has lora_bias=True but {type(self.base_layer).__name__} has no bias "
                             "to merge it into (as in PEFT); keep it unmerged")
        return bias

    def bias_delta(self, name: str) -> torch.Tensor:
        """What merging adds to the base bias: ``scaling * lora_B.bias`` (lora_bias adapters), in fp32."""
        return self.lora_B[name].bias.detach().float() * self.scaling[name]  # type: ignore[index,union-attr]

    def forget_merge(self, name: str) -> None:
        """Keep the merged weights; drop the restore data (merge_and_unload)."""
        self._generation += 1
        self._restore.pop(name, None)
        self._restore_bias.pop(name, None)

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, merged={list(self._restore)}"


_OWN_OUTPUT: tuple[type, ...] = (nn.Linear, *((_conv1d_type(),) if _conv1d_type() is not None else ()))


class ModulePairLayer(LoraLayer):
    """LoRA layers whose A and B are modules (``lora_A.<adapter>``, ``lora_B.<adapter>``): subclasses build
    the pair in ``_create`` and hand it to ``_store``."""

    def __init__(self, base_layer: nn.Module, runtime: AdapterRuntime) -> None:
        super().__init__(base_layer, runtime)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _store(self, name: str, a: nn.Module, b: nn.Module, r: int, init: bool | str) -> None:
        # PEFT's initialisations: B = 0 so a new adapter starts as the identity; False keeps the
        # modules' default (random) init for both
        if init is True:
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)
        elif init == "gaussian":
            nn.init.normal_(a.weight, std=1 / r)
            nn.init.zeros_(b.weight)
        if init is not False and getattr(b, "bias", None) is not None:
            nn.init.zeros_(b.bias)  # lora_bias: starts at zero too, so a new adapter is the identity
        self.lora_A[name] = a
        self.lora_B[name] = b

    def _delete(self, name: str) -> None:
        del self.lora_A[name]
        del self.lora_B[name]

    def adapter_parameters(self, adapter_name: str) -> dict[str, nn.Parameter]:
        out = {f"lora_A.{adapter_name}.weight": self.lora_A[adapter_name].weight,
               f"lora_B.{adapter_name}.weight": self.lora_B[adapter_name].weight}
        bias = getattr(self.lora_B[adapter_name], "bias", None)  # a variant's B (BD-LoRA's) may have none
        if isinstance(bias, nn.Parameter):  # lora_bias=True
            out[f"lora_B.{adapter_name}.bias"] = bias
        return trained_only(self, adapter_name, {**out, **self.variant_parameters(adapter_name)})


class LoraLinear(ModulePairLayer):
    """LoRA for ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2; weight stored in x out)."""

    #: Whether the update may be added into the base layer's output in place (subclasses over layers whose
    #: output backward might need, a quantized kernel say, set False).
    inplace_output = True

    def __init__(self, base_layer: nn.Module, runtime: AdapterRuntime) -> None:
        super().__init__(base_layer, runtime)
        self.transposed = supported_base(base_layer) == "conv1d"
        w = base_layer.weight
        self.in_features, self.out_features = (w.shape[0], w.shape[1]) if self.transposed else (w.shape[1], w.shape[0])

    def _create(self, name: str, r: int, init: bool | str) -> None:
        kw = new_parameter_kwargs(self.base_layer.weight)
        bias = self.lora_bias.get(name, False)
        if self.__dict__.get("_fill"):  # values from the file next (see add): no random draws
            self.lora_A[name] = uninitialised_linear(self.in_features, r, False, **kw)
            self.lora_B[name] = uninitialised_linear(r, self.out_features, bias, **kw)
            return
        self._store(name, nn.Linear(self.in_features, r, bias=False, **kw),
                    nn.Linear(r, self.out_features, bias=bias, **kw), r, init)

    def delta_weight(self, name: str) -> torch.Tensor:
        a = self.lora_A[name].weight.float()
        b = self.lora_B[name].weight.float()
        delta = (b @ a) * self.scaling[name]
        return delta.t() if self.transposed else delta

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.training and not self.variants and torch.compiler.is_compiling():
            return self._forward_gated(x, *args, **kwargs)
        routing = self._runtime.routing()
        if routing is not None and not self._runtime.disabled:
            return self._mixed(x, routing, *args, **kwargs)
        if not args and not kwargs and not torch.compiler.is_compiling():
            fused = fused_forward(self, x)  # base and update as one op, with siblings that read the same x
            if fused is not None:
                return fused
        result = self.base_layer(x, *args, **kwargs)
        names = self._live()
        if not names:
            return result
        training = self.training
        # torch's own Linear and transformers' Conv1D keep no reference to their output for backward,
        # so it can take the update in place; any other base layer (a quantized one, say) might, and a
        # forward hook on the base layer may have kept the output, so then it is left alone. A variant
        # (DoRA) reads the base output itself, so then nothing is updated in place.
        variants = self.variants
        inplace = (self.inplace_output and type(self.base_layer) in _OWN_OUTPUT and not variants
                   and not self.base_layer._forward_hooks and not _global_forward_hooks)
        base = result  # the base layer's own output (a variant rescales it)
        for name in names:
            p = self.dropout_p[name] if training else 0.0
            variant = variants.get(name)
            if variant is not None:
                result = variant.forward(self, name, x, result, base, p)
                continue
            result = lora_linear(result, x, self.lora_A[name].weight, self.lora_B[name].weight,
                                 self.scaling[name], p, inplace)
            if self.lora_bias[name]:
                result = result + self._scaled_bias(name, result.dtype)
        return result

    def _forward_gated(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Inference inside a compiled graph: every unmerged adapter the layer holds, each weighted per row by its
        gate (1 where the row's adapter is on, else 0; computed when the graph runs). The graph then depends
        only on which adapters the layer holds and has merged, so ``set_adapter``, ``disable_adapter`` and mixed
        batches run the same graph instead of compiling new ones (Hugging Face PEFT recompiles on
        ``set_adapter``). The price is one LoRA product per held adapter instead of per active one. Training
        keeps the eager selection: a zero-gated adapter would get zero gradients where eager gives none, and an
        optimiser's weight decay would then move it."""
        result = self.base_layer(x, *args, **kwargs)
        names = [n for n in self.r if n not in self._restore]
        if not names:
            return result
        rt = self._runtime
        gates = rt.gate_rows(x.detach())
        scalings = self.__dict__.get("_scaling_tensors", {})
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        for name in names:
            # a 0-d gate (the model-wide one) or one per row (a mixed batch)
            gate = gates[rt.slots[name]] if gates.dim() == 1 else gates[:, rt.slots[name]].view(shape)
            # a tensor scaling (prepare_model_for_compiled_hotswap) is read when the graph runs, so a hot-swap
            # that changes it compiles nothing; a float is a constant of the graph
            scaling = scalings.get(name, self.scaling[name])
            result = lora_linear_gated(result, x, self.lora_A[name].weight, self.lora_B[name].weight, scaling, gate)
            if self.lora_bias[name]:
                bias = self.lora_B[name].bias.to(result.dtype)
                result = result + bias * (gate.to(result.dtype) * scaling)
        return result

    def _scaled_bias(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        return self.lora_B[name].bias.to(dtype) * self.scaling[name]

    def _mixed(self, x: torch.Tensor, routing: Routing, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each row through its own adapter, with one batched matmul pair for all adapters (adapters with a
        variant, which scale the base output too, group by group)."""
        from .mixed import mixed_linear

        result = self.base_layer(x, *args, **kwargs)
        # the call's distinct adapters, once per call (every layer asks; decoding is dominated by such work)
        distinct = routing.cache.get("distinct")
        if distinct is None:
            distinct = routing.cache["distinct"] = tuple(dict.fromkeys(routing.names))
        if not any(n in self.variants or self.lora_bias.get(n) for n in distinct):
            return mixed_linear(self, x, routing, result)
        return self._routed_rows(x, routing, result, self._routed_one)

    def _routed_one(self, x: torch.Tensor, base: torch.Tensor, name: str) -> torch.Tensor:
        variant = self.variants.get(name)
        if variant is not None:
            return variant.forward(self, name, x, base, base, 0.0)
        new = lora_linear(base, x, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])
        return new + self._scaled_bias(name, new.dtype) if self.lora_bias[name] else new

    # ---- DoRA's view of this layer (peft_lora.dora.DoraLayout): rows are the output features
    def dora_rows(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w = self.base_layer.weight.detach()
        return (w.t() if self.transposed else w, self.lora_B[name].weight.detach().float(),
                self.lora_A[name].weight.detach().float())

    def dora_bias(self) -> torch.Tensor | None:
        bias = getattr(self.base_layer, "bias", None)
        return bias if isinstance(bias, torch.Tensor) else None

    def dora_base(self, x: torch.Tensor) -> torch.Tensor:
        w = self.base_layer.weight.to(x.dtype)
        return x @ w if self.transposed else F.linear(x, w)

    def dora_update(self, x: torch.Tensor, name: str, out: torch.Tensor) -> torch.Tensor:
        return lora_linear(out, x, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])


    def dora_shape(self, rows: torch.Tensor) -> torch.Tensor:
        return rows

    def dora_unrows(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.t() if self.transposed else matrix


class LoraEmbedding(LoraLayer):
    """LoRA for ``nn.Embedding``: ``lora_embedding_A`` (r x vocab) and ``lora_embedding_B`` (dim x r)."""

    def __init__(self, base_layer: nn.Embedding, runtime: AdapterRuntime) -> None:
        super().__init__(base_layer, runtime)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    supports_lora_bias = False

    def _create(self, name: str, r: int, init: bool | str) -> None:
        w = self.base_layer.weight
        kw = new_parameter_kwargs(w)
        # both drawn, A first, as Hugging Face PEFT does: a seeded run starts from the same tensors there and here
        a = nn.Parameter(torch.randn(r, w.shape[0], **kw))
        b = nn.Parameter(torch.randn(w.shape[1], r, **kw))
        if init is not False:
            # as Hugging Face PEFT, for True and "gaussian" alike: A = 0 and B ~ N(0, 1) (an embedding's own
            # init); the transposed roles of a Linear's A and B, so the zero factor is the one the ids select
            nn.init.zeros_(a)
            nn.init.normal_(b)
        self.lora_embedding_A[name] = a
        self.lora_embedding_B[name] = b

    def _delete(self, name: str) -> None:
        del self.lora_embedding_A[name]
        del self.lora_embedding_B[name]

    def adapter_parameters(self, adapter_name: str) -> dict[str, nn.Parameter]:
        return trained_only(self, adapter_name, {
            f"lora_embedding_A.{adapter_name}": self.lora_embedding_A[adapter_name],
            f"lora_embedding_B.{adapter_name}": self.lora_embedding_B[adapter_name],
            **self.variant_parameters(adapter_name)})

    def delta_weight(self, name: str) -> torch.Tensor:
        a = self.lora_embedding_A[name].float()
        b = self.lora_embedding_B[name].float()
        return (b @ a).t() * self.scaling[name]

    def _embed(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(ids, table, base.padding_idx, base.max_norm, base.norm_type,
                           base.scale_grad_by_freq, base.sparse)

    def _embed_scale(self) -> float | torch.Tensor:
        """A scaled embedding's factor (BART's, Gemma's ``embed_scale``, applied by its forward to every row), so
        the update is scaled like the base output, as in PEFT; 1 for a plain embedding."""
        scale = getattr(self.base_layer, "embed_scale", None)
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            return float(scale)
        if isinstance(scale, torch.Tensor) and scale.numel() == 1:
            return scale
        return 1.0

    def _one(self, ids: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
        a = self.lora_embedding_A[name]
        b = self.lora_embedding_B[name]
        after_a = self._embed(ids, a.t())
        scale = self._embed_scale()
        scale = scale.to(dtype) if isinstance(scale, torch.Tensor) else scale
        return (after_a @ b.t()).to(dtype) * self.scaling[name] * scale

    def _apply(self, ids: torch.Tensor, name: str, result: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        variant = self.variants.get(name)
        if variant is not None:
            return variant.forward(self, name, ids, result, base, 0.0)  # PEFT drops no embedding ids either
        return result + self._one(ids, name, result.dtype)

    def forward(self, ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(ids, *args, **kwargs)
        base = result
        routing = self._runtime.routing()
        if routing is not None and not self._runtime.disabled:
            return self._routed_rows(ids, routing, result, lambda i, own, name: self._apply(i, name, own, own))
        for name in self._live():
            result = self._apply(ids, name, result, base)
        return result

    # ---- DoRA's view (peft_lora.dora.DoraLayout): rows are the embedding dimensions, columns the vocabulary
    def dora_rows(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.base_layer.weight.detach().t(), self.lora_embedding_B[name].detach().float(),
                self.lora_embedding_A[name].detach().float())

    def dora_bias(self) -> torch.Tensor | None:
        return None

    def dora_base(self, ids: torch.Tensor) -> torch.Tensor:
        return self._embed(ids, self.base_layer.weight)

    def dora_update(self, ids: torch.Tensor, name: str, out: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        scale = self._embed_scale()  # the base output is scaled (scaled embeddings): so is the update
        scale = scale.to(out.dtype) if isinstance(scale, torch.Tensor) else scale
        return out + (self._embed(ids, a.t()) @ b.t()).to(out.dtype) * (self.scaling[name] * scale)

    def dora_shape(self, rows: torch.Tensor) -> torch.Tensor:
        return rows

    def dora_unrows(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.t()


_CONV_LAYOUT = {3: "(batch, channels, length)", 4: "(batch, channels, height, width)",
                5: "(batch, channels, depth, height, width)"}


class ConvLoraLayer(ModulePairLayer):
    """LoRA for a convolution: A is a conv like the base one (kernel, stride, padding, dilation, padding mode), B
    a kernel-1 conv from r to the output channels, so ``B(A(x))`` is the conv whose weight (``B @ A`` per kernel
    tap) merges into the base. A subclass names its conv class and functional (``nn.Conv1d``/``F.conv1d``...).

    A grouped base conv (``groups > 1``) gets a grouped B, as in Hugging Face PEFT: the rank must be divisible
    by ``groups``, and such an adapter cannot merge (its update mixes channels across groups, which the base
    conv's grouped weight cannot hold)."""

    conv_cls: ClassVar[type[nn.Module]]
    conv_fn: ClassVar[Callable[..., torch.Tensor]]

    def _create(self, name: str, r: int, init: bool | str) -> None:
        base = self.base_layer
        if r % base.groups:
            from peft_core.errors import TargetError

            raise TargetError(f"LoRA on a {type(base).__name__} with groups={base.groups} needs a rank divisible by "
                              f"{base.groups}, got r={r}: choose another r (rank_pattern can set it for this layer) "
                              "or do not target it")
        kw = new_parameter_kwargs(base.weight)
        # the base's padding mode and dilation too: merging folds B A into the base conv, which pads its own way,
        # so an A that always zero-pads would make merged outputs differ (Hugging Face PEFT's A zero-pads)
        a = self.conv_cls(base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation,
                          bias=False, padding_mode=base.padding_mode, **kw)
        b = self.conv_cls(r, base.out_channels, 1, 1, groups=base.groups, bias=self.lora_bias.get(name, False), **kw)
        self._store(name, a, b, r, init)

    def delta_weight(self, name: str) -> torch.Tensor:
        if self.base_layer.groups > 1:
            from peft_core.errors import MergeError

            raise MergeError(f"adapter {name!r} on a {type(self.base_layer).__name__} with "
                             f"groups={self.base_layer.groups} cannot be merged: its update mixes channels across "
                             "groups, which the grouped base weight cannot hold (Hugging Face PEFT refuses too); "
                             "keep it unmerged")
        a = self.lora_A[name].weight.float()  # (r, in, *kernel)
        b = self.lora_B[name].weight.float()  # (out, r, 1, ...)
        if all(k == 1 for k in a.shape[2:]):
            delta = (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:])
        else:  # delta[o, i, *t] = sum_r b[o, r] a[r, i, *t]: a conv of A's taps (as a batch of inputs) by B
            delta = type(self).conv_fn(a.transpose(0, 1), b).transpose(0, 1)
        return delta * self.scaling[name]

    def _delta(self, x: torch.Tensor, name: str, p: float, dtype: torch.dtype) -> torch.Tensor:
        a, b = self.lora_A[name], self.lora_B[name]
        xin = F.dropout(x, p, True) if p > 0 else x
        return b(a(xin.to(a.weight.dtype))).to(dtype) * self.scaling[name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        routing = self._runtime.routing()
        if routing is not None and not self._runtime.disabled:
            if x.dim() != self.base_layer.weight.dim():
                # an unbatched input has no rows: its channel dimension would be read as the batch
                layout = _CONV_LAYOUT.get(self.base_layer.weight.dim(), "(batch, channels, ...)")
                raise AdapterError(f"adapter_names=[...] needs a batched {layout} input for {type(self).__name__}, "
                                   f"got shape {tuple(x.shape)}; add a batch dimension")
            return self._routed_rows(x, routing, result, self._routed_one)
        training = self.training
        variants = self.variants
        base = result
        for name in self._live():
            p = self.dropout_p[name] if training else 0.0
            variant = variants.get(name)
            if variant is not None:
                result = variant.forward(self, name, x, result, base, p)
            else:
                result = result + self._delta(x, name, p, result.dtype)
        return result

    def _routed_one(self, x: torch.Tensor, base: torch.Tensor, name: str) -> torch.Tensor:
        variant = self.variants.get(name)
        if variant is None:
            return base + self._delta(x, name, 0.0, base.dtype)
        return variant.forward(self, name, x, base, base, 0.0)

    # ---- DoRA's view (peft_lora.dora.DoraLayout): rows are the output channels
    def dora_rows(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w = self.base_layer.weight.detach()
        b, a = self.lora_B[name].weight.detach().float(), self.lora_A[name].weight.detach().float()
        return w.flatten(1), b.flatten(1), a.flatten(1)

    def dora_bias(self) -> torch.Tensor | None:
        bias = self.base_layer.bias
        return None if bias is None else self.dora_shape(bias)

    def dora_base(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer._conv_forward(x, self.base_layer.weight.to(x.dtype), None)

    def dora_update(self, x: torch.Tensor, name: str, out: torch.Tensor) -> torch.Tensor:
        return out + self._delta(x, name, 0.0, out.dtype)


    def dora_shape(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.reshape(1, -1, *(1,) * (self.base_layer.weight.dim() - 2))

    def dora_unrows(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.reshape(self.base_layer.weight.shape)


class LoraConv1d(ConvLoraLayer):
    """LoRA for ``torch.nn.Conv1d`` (not transformers' GPT-2 ``Conv1D``, which is a Linear-like layer)."""

    conv_cls = nn.Conv1d
    conv_fn = F.conv1d


class LoraConv2d(ConvLoraLayer):
    """LoRA for ``nn.Conv2d``: A is a conv with the base kernel, B a 1x1 conv."""

    conv_cls = nn.Conv2d
    conv_fn = F.conv2d


class LoraConv3d(ConvLoraLayer):
    """LoRA for ``nn.Conv3d``."""

    conv_cls = nn.Conv3d
    conv_fn = F.conv3d


def builtin_layer(module: nn.Module, runtime: AdapterRuntime) -> LoraLayer | None:
    """LoRA's own layer for ``module``, or None when LoRA's built-in layers do not handle its type: torch's
    Linear, Embedding, Conv1d/2d/3d and transformers' Conv1D, with floating-point weights (a
    quantized subclass of ``nn.Linear`` needs an extension plugin that knows its weight format)."""
    if isinstance(module, nn.MultiheadAttention):  # no .weight: its layer checks in_proj_weight (peft_lora.mha)
        from .mha import LoraMultiheadAttention  # imported here: mha builds on this module's classes

        return LoraMultiheadAttention(module, runtime)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not (weight.is_floating_point() or weight.is_meta):
        return None
    if type(weight) not in (torch.Tensor, nn.Parameter):
        return None  # a tensor subclass (torchao's quantized weights, say): not plain floats to add to
    kind = supported_base(module)
    if kind in ("linear", "conv1d"):
        return LoraLinear(module, runtime)
    if kind == "embedding":
        return LoraEmbedding(module, runtime)  # type: ignore[arg-type]
    conv = _CONV_LAYERS.get(kind)  # type: ignore[arg-type]
    if conv is not None:
        return conv(module, runtime)
    return None


_CONV_LAYERS: dict[str, type[ConvLoraLayer]] = {"conv1d_torch": LoraConv1d, "conv2d": LoraConv2d,
                                                "conv3d": LoraConv3d}
