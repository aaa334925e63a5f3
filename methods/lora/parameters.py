"""LoRA on ``nn.Parameter``s (``LoraConfig.target_parameters``), with Hugging Face PEFT 0.21's semantics.

Some weights are no layer LoRA can wrap: transformers' mixture-of-experts blocks keep every expert's projection
in one 3-D parameter (``Qwen3MoeExperts.gate_up_proj``: experts x out x in) and index it in their forward.
:class:`LoraParameter` wraps the module that *holds* such a parameter. While the module runs, the parameter
reads as ``W + scaling * B A``: the module's own forward (any experts kernel included) sees the adapted
weight, and gradients reach A and B through it. Nothing is patched; outside that call the parameter is the
untouched base tensor.

Shapes and layout, as PEFT lays them out (so the two libraries' files hold the same tensors):

- 2-D ``(out, in)``: ``lora_A`` is ``r x in``, ``lora_B`` is ``out x r``, the update ``B @ A``.
- 3-D ``(E, out, in)`` (transformers' layout; an experts module with ``is_transposed=True`` stores
  ``(E, in, out)``): rank ``r`` *per expert*. ``lora_A`` is ``r*E x in``, row ``e*r + k`` belonging to expert
  ``e``; ``lora_B`` is ``out x r*E``, column ``k*E + e`` belonging to expert ``e`` (PEFT's interleaving).

Several parameters of one module: one :class:`LoraParameter` per parameter, nested (the first parameter in
the module's order innermost). The nesting gives the key names, on disk as in memory:
``experts.base_layer.lora_A.weight`` for the first, ``experts.lora_A.weight`` for the last of two. Every
adapter that targets parameters must therefore target the same ones (PEFT's rule), or an adapter's keys
would depend on what else is loaded.

Not possible here, as in PEFT: ``lora_dropout`` (the update is added to the weight, there is no input to
drop), mixed-batch routing (one weight per call serves every row), ``fan_in_fan_out``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Sequence
from typing import Any

import attrs
import torch
from peft_core.errors import AdapterError, TargetError
from peft_core.layers import is_adapter_layer
from peft_core.runtime import AdapterRuntime
from torch import nn
from torch.nn.utils import parametrize

from .config import LoraConfig
from .layers import ModulePairLayer, new_parameter_kwargs
from .swap import SwapLock
from .targeting import find_targets, rank_and_alpha

__all__ = ["LoraParameter", "ParameterTarget", "inject_parameters", "module_targets", "plan_parameters",
           "skip_default_targets"]

#: Architectures for which peft-core has default ``target_modules`` but Hugging Face PEFT 0.21 adapts no module
#: when ``target_parameters`` is given with ``target_modules=None``: it has no defaults for the first six, and
#: under transformers 5 it rewrites MoE configs (Mixtral's) before looking for defaults, leaving none.
_NO_PEFT_DEFAULT = frozenset({"distilbert", "longt5", "marian", "mbart", "mpnet", "umt5", "mixtral"})

#: The dtypes an update can be added to exactly (:mod:`peft_core.merging`).
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _holder(layer: nn.Module) -> nn.Module:
    """The module that really owns the parameter: below every (nested) LoraParameter."""
    while isinstance(layer, LoraParameter):
        layer = layer.base_layer
    return layer


class LoraParameter(ModulePairLayer):
    """LoRA on one parameter of ``base_layer`` (or of the module under nested LoraParameters), named
    ``parameter_name``. ``lora_A.<adapter>`` and ``lora_B.<adapter>`` are ``nn.Linear`` modules, as in PEFT."""

    #: One adapted weight serves the whole batch: a mixed batch would need a weight per row.
    supports_routing = False

    def __init__(self, base_layer: nn.Module, runtime: AdapterRuntime, parameter_name: str) -> None:
        super().__init__(base_layer, runtime)
        self.parameter_name = parameter_name
        self._swap_lock = SwapLock()  # see forward
        shape = tuple(self.parameter.shape)
        if len(shape) == 2:
            self.num_experts, self.out_features, self.in_features = 1, shape[0], shape[1]
            self.experts_transposed = False
        elif len(shape) == 3:
            # transformers' experts store (experts, out, in) unless their class says is_transposed (in, out)
            self.experts_transposed = bool(getattr(_holder(base_layer), "is_transposed", False))
            self.num_experts = shape[0]
            self.in_features, self.out_features = (shape[1], shape[2]) if self.experts_transposed \
                else (shape[2], shape[1])
        else:  # plan_parameters refuses these before any layer is built
            raise TargetError(f"LoRA on a parameter needs a 2-D or 3-D tensor; {parameter_name!r} has shape {shape}")

    # ---- the targeted tensor
    @property
    def parameter(self) -> nn.Parameter:
        """The base parameter this layer adapts (the real one, never the adapted value of a forward)."""
        holder = _holder(self.base_layer)
        found = holder._parameters.get(self.parameter_name)
        if found is None:
            raise AdapterError(f"{type(holder).__name__} has no parameter {self.parameter_name!r} any more; it "
                               "was removed or replaced after the LoRA layer was put on it")
        return found

    def _relative_name(self) -> str:
        """The parameter's name as seen from ``base_layer`` (``base_layer.`` once per nested LoraParameter)."""
        name, module = self.parameter_name, self.base_layer
        while isinstance(module, LoraParameter):
            name, module = f"base_layer.{name}", module.base_layer
        return name

    # ---- adapters
    def add(self, name: str, r: int, alpha: float, dropout: float, use_rslora: bool, init: bool | str,
            trains_bias: bool = False) -> None:
        if dropout:  # reached only by a plugin bug: plan_parameters and LoraConfig refuse it first
            raise TargetError(f"LoRA on parameter {self.parameter_name!r} cannot use lora_dropout={dropout}")
        super().add(name, r, alpha, 0.0, use_rslora, init, trains_bias)

    def _create(self, name: str, r: int, init: bool | str) -> None:
        kw = new_parameter_kwargs(self.parameter)
        rank = r * self.num_experts  # rank r for each expert, all experts' factors in one matrix (PEFT's layout)
        self._store(name, nn.Linear(self.in_features, rank, bias=False, **kw),
                    nn.Linear(rank, self.out_features, bias=False, **kw), r, init)

    def trained_base_parameters(self, adapter_name: str) -> tuple[str, ...]:
        # bias="lora_only": the holder's bias, as PEFT reads ``layer.bias`` through every nested wrapper
        holder = _holder(self.base_layer)
        if not (self.trains_bias.get(adapter_name) and isinstance(holder._parameters.get("bias"), nn.Parameter)):
            return ()
        depth, module = 1, self.base_layer
        while isinstance(module, LoraParameter):
            depth, module = depth + 1, module.base_layer
        return ("base_layer." * depth + "bias",)

    # ---- the update
    def _factors(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-expert ``(lhs, rhs)`` with ``update[e] = scaling * lhs[e] @ rhs[e]`` in the parameter's layout."""
        a = self.lora_A[name].weight.reshape(self.num_experts, -1, self.in_features)  # (E, r, in)
        b = self.lora_B[name].weight.reshape(self.out_features, -1, self.num_experts).permute(2, 0, 1)  # (E, out, r)
        lhs, rhs = (a.transpose(1, 2), b.transpose(1, 2)) if self.experts_transposed else (b, a)
        return lhs.to(dtype), rhs.to(dtype)

    def _update(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """``scaling * B A`` in the parameter's layout and ``dtype``, computed in the wider of the adapter's dtype
        and ``dtype`` (fp32 adapters of a bf16 model compute in fp32, as in PEFT; a merge always does)."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        compute = torch.promote_types(a.dtype, dtype)
        if self.parameter.dim() == 2:
            return ((b.to(compute) @ a.to(compute)) * self.scaling[name]).to(dtype)
        lhs, rhs = self._factors(name, compute)
        return (torch.bmm(lhs, rhs) * self.scaling[name]).to(dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        return self._update(name, torch.float32)

    def adapted(self, names: Sequence[str]) -> torch.Tensor:
        """The parameter as the base module sees it with adapters ``names`` on: ``W + sum of updates``, in W's
        dtype (a stand-in for a parameter must keep its dtype, hence autocast off)."""
        weight = self.parameter
        with torch.autocast(weight.device.type, enabled=False):
            if len(names) == 1 and weight.dim() == 3 and self.num_experts > 1:
                # one adapter on an expert stack: a fused W + s * lhs @ rhs, no update-sized temporary (as PEFT)
                lhs, rhs = self._factors(names[0], weight.dtype)
                return torch.baddbmm(weight, lhs, rhs, alpha=self.scaling[names[0]])
            update = self._update(names[0], weight.dtype)
            for name in names[1:]:
                update = update + self._update(name, weight.dtype)
            return weight + update

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        routing = self._runtime.routing()
        if routing is not None and not self._runtime.disabled:
            if any(n in self.r for n in routing.names):
                # the core refuses such calls before they run (supports_routing=False); never compute them wrongly
                raise AdapterError(f"LoRA on parameter {self.parameter_name!r} cannot give each row of a mixed batch "
                                   "its own adapter (adapter_names=[...]); run one adapter per call with set_adapter()")
            return self.base_layer(*args, **kwargs)  # no row names an adapter of this layer: the base alone
        names = self._live()
        if not names:
            return self.base_layer(*args, **kwargs)
        # the base module runs with the adapted tensor in the parameter's place, restored right after (also
        # on error); nested LoraParameters below swap their own parameters the same way. The swap changes the
        # module for everyone: two threads overlapping here would each restore what the other put in (measured:
        # wrong outputs, and the Parameter lost), so calls through this layer take turns.
        with self._swap_lock:
            return torch.func.functional_call(self.base_layer, {self._relative_name(): self.adapted(names)},
                                              args, kwargs)

    # ---- merging: into the targeted parameter, not base_layer.weight
    @property
    def merge_target(self) -> torch.Tensor:
        return self.parameter

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, {super().extra_repr()}"


# ------------------------------------------------------------------------------------------ targeting
@attrs.frozen
class ParameterTarget:
    """One parameter to adapt: where its chain of layers sits, its name on the holding module, its full name."""

    #: Path of the module that holds it, or of the outermost LoraParameter already on that module.
    path: str
    name: str
    #: ``<holder path>.<name>`` without ``base_layer`` parts (what target_parameters and rank_pattern match).
    key: str


def _is_saved_copy(module: nn.Module) -> bool:
    """A modules_to_save wrapper (the core's, or any with PEFT's attribute names): its module is trained whole."""
    return hasattr(module, "original_module") and isinstance(getattr(module, "modules_to_save", None), nn.ModuleDict)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _holders(model: nn.Module) -> Iterator[tuple[str, str, nn.Module, str | None]]:
    """``(top path, clean path, module, blocker)`` for every module whose own parameters are base-model
    parameters, in ``named_modules`` order. ``top path`` is where the module, or the LoraParameters on it, sit;
    ``clean path`` the module's path without ``base_layer`` parts; ``blocker`` the path of another kind of
    adapter layer wrapping it (a LoRA layer from target_modules, say), whose parameters cannot be targeted.
    Adapters' own tensors, modules_to_save copies and parametrizations are not walked."""
    seen: set[int] = set()

    def visit(module: nn.Module, path: str, clean: str, top: str | None,
              blocker: str | None) -> Iterator[tuple[str, str, nn.Module, str | None]]:
        if id(module) in seen or _is_saved_copy(module):
            return
        seen.add(id(module))
        if is_adapter_layer(module):
            base = getattr(module, "base_layer", None)
            if isinstance(base, nn.Module):
                own = isinstance(module, LoraParameter)
                yield from visit(base, _join(path, "base_layer"), clean, top if top is not None else path,
                                 blocker if own or blocker is not None else clean)
            return
        yield (top if top is not None else path), clean, module, blocker
        parametrized = parametrize.is_parametrized(module)
        for child_name, child in module._modules.items():
            if child is None or (parametrized and child_name == "parametrizations"):
                continue
            yield from visit(child, _join(path, child_name), _join(clean, child_name), None, blocker)

    yield from visit(model, "", "", None, None)


def _matches(key: str, entry: str) -> bool:
    return key == entry or key.endswith("." + entry)  # PEFT's rule for target_parameters


def _short(key: str) -> str:
    """``model.layers.0.mlp.experts.gate_up_proj`` -> ``mlp.experts.gate_up_proj``: what repeats per layer."""
    return re.sub(r"^(?:.*\.)?\d+\.", "", key)


def _no_match(model: nn.Module, entry: str, candidates: list[str], parametrized: list[str]) -> TargetError:
    shown = sorted(set(map(_short, candidates)))
    close = difflib.get_close_matches(entry, shown, n=5, cutoff=0.4)
    listing = close + [s for s in shown if s not in close]
    more = f" (and {len(listing) - 15} more)" if len(listing) > 15 else ""
    hint = ""
    if any(_matches(p, entry) for p in parametrized):
        hint = (" It names a parameter that torch.nn.utils.parametrize already parametrizes, which LoRA cannot "
                "target; remove that parametrization first.")
    return TargetError(f"target_parameters entry {entry!r} matched no parameter of {type(model).__name__} (an entry "
                       f"must equal a parameter's full name or end with '.' + the entry).{hint} 2-D and 3-D "
                       f"parameters of this model, closest first: {', '.join(listing[:15]) or '(none)'}{more}")


def _param_sets(model: nn.Module) -> dict[str, set[str]]:
    """Adapter -> the full names (without base_layer parts) of the parameters its LoraParameters adapt."""
    sets: dict[str, set[str]] = {}
    for top, clean, _, _ in _holders(model):
        layer = model.get_submodule(top) if top != "" else model
        while isinstance(layer, LoraParameter):
            for adapter in layer.r:
                sets.setdefault(adapter, set()).add(_join(clean, layer.parameter_name))
            layer = layer.base_layer
    return sets


def skip_default_targets(model: nn.Module, config: LoraConfig) -> bool:
    """Whether ``target_modules=None`` means "no modules" rather than the architecture's defaults: with
    target_parameters, for the architectures where Hugging Face PEFT has no defaults."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return bool(config.target_parameters) and model_type in _NO_PEFT_DEFAULT


def module_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """The modules ``target_modules`` adapts: :func:`peft_lora.targeting.find_targets`, except that with
    ``target_parameters`` an empty list (PEFT's way to adapt parameters only) or an unresolved None adapts none."""
    if config.target_parameters and (config.target_modules is None or config.target_modules == ()):
        return []
    return find_targets(model, config)


def plan_parameters(model: nn.Module, adapter_name: str, config: LoraConfig,
                    module_paths: Sequence[str]) -> list[ParameterTarget]:
    """What ``target_parameters`` adapts, checked completely before anything in the model changes: every entry
    matches, every match is a 2-D or 3-D floating-point parameter of a module that nothing else adapts, and the
    adapter targets the same parameters as the model's other parameter-targeting adapters. ``module_paths``:
    this adapter's target_modules matches (a module cannot be targeted both ways)."""
    modules = set(module_paths)
    # a target_modules match that is already a LoraParameter gets this adapter on that parameter (as in PEFT)
    joined = {p: model.get_submodule(p) for p in modules}
    joined = {p: m for p, m in joined.items() if isinstance(m, LoraParameter)}
    entries = config.target_parameters or ()
    if joined and config.lora_dropout:
        raise TargetError(f"target_modules matches {sorted(joined)}, which hold LoRA on a parameter "
                          f"({joined[min(joined)].parameter_name!r}); that cannot use lora_dropout="
                          f"{config.lora_dropout}. Set lora_dropout=0 for this adapter")
    plan: list[ParameterTarget] = []
    found: set[str] = set()
    candidates: list[str] = []
    parametrized: list[str] = []
    saved = tuple(config.modules_to_save or ())
    for top, clean, module, blocker in _holders(model) if entries else ():
        for pname, param in module._parameters.items():
            if param is None:
                continue
            key = _join(clean, pname)
            if param.dim() in (2, 3):
                candidates.append(key)
            hits = [e for e in entries if _matches(key, e)]
            if not hits:
                continue
            found.update(hits)
            where = f"target_parameters entry {hits[0]!r} matches {key!r}"
            if not clean:
                raise TargetError(f"{where}, a parameter of the model's top module {type(model).__name__}; LoRA on "
                                  "a parameter wraps the module that holds it, which the top module cannot be (as "
                                  "in PEFT). Name a parameter of a submodule")
            if blocker is not None or clean in modules:
                layer = blocker if blocker is not None else clean
                raise TargetError(f"{where}, but module {layer!r} is adapted as a whole (target_modules matches "
                                  "it, for this or another adapter); a parameter of it cannot also be targeted, as "
                                  "in PEFT. Leave it out of target_modules (target_modules=[] targets parameters "
                                  "only) or out of target_parameters")
            if any(f".{m}." in f".{clean}." for m in saved):
                raise TargetError(f"{where}, inside modules_to_save {list(saved)}, which is trained whole; drop it "
                                  "from target_parameters or from modules_to_save")
            if param.dim() not in (2, 3):
                raise TargetError(f"{where}, of shape {tuple(param.shape)}; LoRA on a parameter needs a 2-D "
                                  "(out, in) matrix or a 3-D (experts, out, in) stack, as in PEFT. Make the entry "
                                  "name such a parameter (a longer suffix, e.g. 'experts.gate_up_proj')")
            if type(param) is not nn.Parameter or param.dtype not in _FLOAT_DTYPES:
                raise TargetError(f"{where}, a {param.dtype} {type(param).__name__}; LoRA on a parameter needs a "
                                  "plain float32/bfloat16/float16/float64 nn.Parameter (not a quantized weight)")
            plan.append(ParameterTarget(path=top, name=pname, key=key))
        if parametrize.is_parametrized(module):
            parametrized += [_join(clean, n) for n in module.parametrizations]  # type: ignore[union-attr]
    for entry in entries:
        if entry not in found:
            raise _no_match(model, entry, candidates, parametrized)
    mine = {t.key for t in plan} | {_join(p, m.parameter_name) for p, m in joined.items()}
    if mine:
        for other, theirs in _param_sets(model).items():
            if other != adapter_name and theirs != mine:
                raise TargetError(
                    f"adapter {adapter_name!r} would put LoRA on parameters {_few(mine)}, but adapter {other!r} of "
                    f"this model is on {_few(theirs)}. As in PEFT, every adapter that targets parameters must "
                    "target the same ones: LoRA layers on parameters of one module are nested, and the nesting "
                    "names each adapter's tensors. Use the same target_parameters, or another copy of the model")
    return plan


def _few(names: set[str], n: int = 4) -> str:
    shown = sorted(names)
    return ", ".join(shown[:n]) + (f" (and {len(shown) - n} more)" if len(shown) > n else "")


def _existing(top: nn.Module, name: str) -> LoraParameter | None:
    """The LoraParameter already on parameter ``name`` in the chain starting at ``top``, if any."""
    while isinstance(top, LoraParameter):
        if top.parameter_name == name:
            return top
        top = top.base_layer
    return None


def inject_parameters(model: nn.Module, adapter_name: str, config: LoraConfig, runtime: AdapterRuntime,
                      plan: Sequence[ParameterTarget]) -> list[str]:
    """Put adapter ``adapter_name`` on the planned parameters (after :func:`plan_parameters` checked them):
    on the LoraParameter a parameter already has, else on a new one wrapped around the module (nesting on top
    of those of the module's earlier parameters). Returns the paths of the layers, in model order."""
    paths: list[str] = []
    # modules deeper in the tree first: wrapping a module changes its descendants' paths, not its ancestors'
    for target in sorted(plan, key=lambda t: -t.path.count(".")):  # stable: a module's parameters keep their order
        top = model.get_submodule(target.path)
        layer = _existing(top, target.name)
        if layer is None:
            layer = LoraParameter(top, runtime, target.name)
            model.set_submodule(target.path, layer)
        r, alpha = rank_and_alpha(config, target.key)
        layer.add(adapter_name, r, alpha, 0.0, config.use_rslora, config.init_lora_weights,
                  trains_bias=config.bias != "none")
        if target.path not in paths:
            paths.append(target.path)
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(paths, key=lambda p: order.get(p, len(order)))

