"""AdaptedModel: a base model plus named adapters of any installed method, composed through hooks.

The core never knows what a method does. This module keeps the adapter lifecycle every method shares —
adapter names, configs, which are active, adding, activating, deleting, disabling, merging, running — and
calls the owning plugin for the rest. Its helpers each have one role: :mod:`~peft_core.ownership` (which
parameters an adapter owns and when they train, from the layers' declarations), :mod:`~peft_core.merge_order`
(newest-first unmerging), :mod:`~peft_core.checkpoint` (files), :mod:`~peft_core.forward` (signature,
positional binding, mixed-batch checks).
"""

from __future__ import annotations

import os
import sys
import types
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from . import checkpoint
from .config import PeftConfig
from .errors import AdapterError, ConfigError, MergeError, PluginContractError
from .forward import ForwardWithBaseSignature, bind_positional, check_routing
from .layers import is_adapter_layer
from .merge_order import MergeStack
from .modules_to_save import ModulesToSave, matching_module_names
from .ownership import Ownership
from .registry import Registry, get_registry
from .runtime import BASE_ROW, AdapterRuntime
from .serialization import load_weights, resolve_weights
from .snapshot import ModuleSnapshot
from .spec import MethodSpec

__all__ = ["AdaptedModel"]

# Methods keep adapters in ModuleDicts and ParameterDicts keyed by adapter name; a key that is an attribute
# of either (ParameterDict adds 'get', 'copy', 'fromkeys'...) cannot be stored.
_RESERVED = frozenset(dir(nn.ModuleDict())) | frozenset(dir(nn.ParameterDict())) | {BASE_ROW}
#: save_pretrained writes adapter "x" to <folder>/x: the name must be one plain folder name.
_MAX_NAME_BYTES = 255


def _check_name(name: Any) -> str:
    if (not isinstance(name, str) or not name or "." in name or "/" in name or "\\" in name or name in _RESERVED
            or not name.isprintable() or len(name.encode("utf-8", "surrogatepass")) > _MAX_NAME_BYTES):
        raise AdapterError(
            f"adapter name {name!r} is not allowed: use a non-empty printable string of at most "
            f"{_MAX_NAME_BYTES} bytes without '.', '/' or '\\' (it becomes a folder name when saved), and not "
            f"{BASE_ROW!r} or an attribute name of nn.ModuleDict/nn.ParameterDict (such as 'keys', 'to', 'get')")
    return name


def _no_extra(where: str, extra: dict[str, Any], known: str) -> None:
    """Keywords Hugging Face PEFT does not take either: a TypeError naming them (never silently swallowed)."""
    if extra:
        raise TypeError(f"{where} got unexpected keyword argument(s) {', '.join(sorted(extra))}; it takes {known}")


class AdaptedModel(nn.Module):
    """Wraps ``model`` (in place, never copied) and manages its adapters.

    ``AdaptedModel(model, config)`` adds ``config`` as adapter ``"default"`` and activates it.

    ``autocast_adapter_dtype`` (default True, as in Hugging Face PEFT): on a bfloat16/float16 model the
    adapters' new parameters are kept in float32; False keeps them in the base model's dtype.
    ``low_cpu_mem_usage`` (default False): the adapters' new parameters are created on the ``meta`` device and
    only get memory when a load fills them (``load_adapter``, ``set_peft_model_state_dict``).
    """

    def __init__(self, model: nn.Module, peft_config: PeftConfig | None = None,
                 adapter_name: str = "default", autocast_adapter_dtype: bool = True,
                 low_cpu_mem_usage: bool = False) -> None:  # PEFT's PeftModel.__init__ order
        super().__init__()
        if any(is_adapter_layer(m) for m in model.modules()):
            # another wrapper already adapted this model: a second one would change the first one's layers under
            # its feet (its outputs change, and its saved files no longer fit its config)
            warnings.warn(f"{type(model).__name__} already holds adapter layers (get_peft_model was called on it "
                          "before): wrapping it again changes the first wrapper's layers too. Add adapters to the "
                          "first wrapper with add_adapter(), or call unload() on it first", UserWarning, stacklevel=3)
        self.base_model = model
        self.adapter_modules = nn.ModuleDict()
        self.peft_config: dict[str, PeftConfig] = {}
        self._runtime = AdapterRuntime()
        self._ownership = Ownership(self)
        self._merges = MergeStack(self._call)
        self._meta_homes: dict[str, torch.device] = {}  # low_cpu_mem_usage: where each meta parameter belongs
        self._input_hook: Any = None
        self.train(model.training)  # the wrapper starts in the mode the user's model is in
        if peft_config is not None:
            self.add_adapter(adapter_name, peft_config, autocast_adapter_dtype=autocast_adapter_dtype,
                             low_cpu_mem_usage=low_cpu_mem_usage)
            self.set_adapter(adapter_name)

    # ------------------------------------------------------------------ plumbing
    @property
    def _registry(self) -> Registry:
        return get_registry()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in {"base_model", "adapter_modules", "peft_config"}:
                raise
        offers = [spec for spec, _ in self._registry.methods() if name in spec.operations]
        if len(offers) > 1:
            # Only the methods this model has adapters of can be meant; with one left, the user gets that
            # method's own operation (its docstring and signature in help()), not the dispatcher.
            present = {type(c).peft_type for c in self.peft_config.values()}
            offers = [spec for spec in offers if spec.name in present] or offers
        if len(offers) == 1:
            # a bound method, so help() and signature() show the operation's own (PEFT's API)
            return types.MethodType(offers[0].operations[name], self)
        if offers:
            return types.MethodType(_dispatch_operation(name, offers), self)
        return getattr(self.base_model, name)

    @property
    def is_distributed_loading_by_transformers(self) -> Any:
        """The base model's flag. ``transformers.Trainer.__init__`` reads it, which makes it the one early moment
        to tell a user of the stock Trainer that its checkpoints will not work (it knows only ``PreTrainedModel``
        and PEFT's ``PeftModel``: it saves the whole state dict, and crashes at the first checkpoint on
        tied-weight models) and which Trainer to use instead."""
        _warn_if_stock_trainer(sys._getframe(1).f_locals.get("self"))
        return getattr(self.base_model, "is_distributed_loading_by_transformers", False)

    def get_base_model(self) -> nn.Module:
        """The user's model, with the adapter layers in it (PEFT: ``model.get_base_model()``). Calling it runs the
        active adapters too; ``with model.disable_adapter():`` runs it without them."""
        return self.base_model

    @property
    def _hf_peft_config_loaded(self) -> bool:
        """transformers' flag for "PEFT adapters are attached" (its Trainer refuses to train a quantized model
        without them): true exactly while this model holds an adapter."""
        return bool(self.peft_config)

    def _call(self, adapter_name: str, hook: str, **kwargs: Any) -> Any:
        config = self.peft_config[adapter_name]
        method = type(config).peft_type
        return self._registry.call(method, hook, model=self.base_model, adapter_name=adapter_name,
                                   config=config, **kwargs)

    def _spec(self, adapter_name: str) -> Any:
        return self._registry.spec_for(self.peft_config[adapter_name])

    def _require(self, names: str | Sequence[str] | None) -> list[str]:
        if names is None:
            return list(self._runtime.active)
        if not isinstance(names, (str, Sequence)) or not all(isinstance(n, str) for n in names):
            raise AdapterError(f"expected an adapter name or a list of adapter names, got {names!r}; this model "
                               f"has {list(self.peft_config)}")
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise AdapterError(f"unknown adapter(s) {unknown}; this model has {list(self.peft_config)}")
        return names

    def _trains(self, adapter_name: str) -> bool:
        """Whether ``adapter_name``'s parameters train now: active and not in inference mode."""
        return adapter_name in self._runtime.active and not self.peft_config[adapter_name].inference_mode

    # ------------------------------------------------------------------ adapters
    @property
    def active_adapters(self) -> list[str]:
        """The names of the adapters a forward runs, in order (a copy: change it with ``set_adapter``)."""
        return list(self._runtime.active)

    @property
    def targeted_module_names(self) -> list[str]:
        """Paths (in the base model) of the modules adapters were put on, as Hugging Face PEFT lists them."""
        from .layers import adapter_layers

        return [path for path, _ in adapter_layers(self.base_model)]

    @property
    def active_peft_config(self) -> PeftConfig:
        """The config of the active adapter (PEFT's attribute; with several active, the first one's)."""
        if not self._runtime.active:
            raise AdapterError("no adapter is active; set_adapter() one first")
        return self.peft_config[self._runtime.active[0]]

    def disable_adapter_layers(self) -> None:
        """Run the base model alone until ``enable_adapter_layers()`` (merged adapters are unmerged first, as in
        PEFT). ``with model.disable_adapter():`` does the same for a block and restores everything after."""
        if self._merges:
            warnings.warn("disable_adapter_layers on a merged model: unmerging first", stacklevel=2)
            self._merges.unmerge_all()
        self._runtime.disabled = True

    def enable_adapter_layers(self) -> None:
        """Undo ``disable_adapter_layers()``: the active adapters act again."""
        self._runtime.disabled = False

    def get_layer_status(self) -> list[Any]:
        """A status line per adapter layer (PEFT's ``get_layer_status``)."""
        from .peft_names import get_layer_status

        return get_layer_status(self)

    def get_model_status(self) -> Any:
        """The adapters at a glance (PEFT's ``get_model_status``)."""
        from .peft_names import get_model_status

        return get_model_status(self)

    @property
    def active_adapter(self) -> str | list[str]:
        """PEFT's older spelling: the active adapter's name, or the list when several are active."""
        active = self._runtime.active
        return active[0] if len(active) == 1 else list(active)

    def _prepare_config(self, config: PeftConfig) -> PeftConfig:
        """Fill what the core knows (the base model's name); task models add their heads."""
        if config.base_model_name_or_path is None:
            name = getattr(getattr(self.base_model, "config", None), "name_or_path", None)
            if isinstance(name, str) and name:
                config = config.replace(base_model_name_or_path=name)
        return config

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Inject a new adapter (inactive until ``set_adapter``). All or nothing: if anything fails, the model
        is as it was. ``low_cpu_mem_usage`` and ``autocast_adapter_dtype``: see the class docstring."""
        self._add_adapter(adapter_name, peft_config, low_cpu_mem_usage, autocast_adapter_dtype, None)

    def _add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool,
                     autocast_adapter_dtype: bool, snapshot: ModuleSnapshot | None) -> None:
        """``add_adapter``; ``snapshot``: the caller's, taken just before (load_adapter's), instead of a new one."""
        _check_name(adapter_name)
        if adapter_name in self.peft_config:
            raise AdapterError(f"adapter {adapter_name!r} already exists; delete_adapter it first or "
                               "choose another name")
        if not isinstance(peft_config, PeftConfig):
            raise ConfigError(f"expected a PeftConfig (LoraConfig, ...), got {type(peft_config).__name__}")
        spec = self._registry.spec_for(peft_config)
        if peft_config.task_type is not None and peft_config.task_type not in spec.task_types:
            supported = ", ".join(sorted(t.value for t in spec.task_types))
            raise ConfigError(f"{spec.name} does not support task_type={peft_config.task_type.value}; "
                              f"it supports {supported}")
        config = self._complete_config(adapter_name, self._prepare_config(peft_config), spec)
        if snapshot is None:
            snapshot = ModuleSnapshot(self)
        before = {id(p) for p in self.parameters()}
        modules_before = {id(m) for m in self.modules()}
        self._ownership.freeze_unowned(self._trains)
        self.peft_config[adapter_name] = config
        try:
            targets = self._call(adapter_name, "inject", runtime=self._runtime, store=self.adapter_modules)
            if targets is None:
                raise PluginContractError(f"the {spec.name} plugin ({self._registry.owner(spec.name).name}) "
                                          "does not implement inject")
            if (not isinstance(targets, Sequence) or isinstance(targets, str)
                    or not all(isinstance(t, str) for t in targets)):
                raise PluginContractError(f"inject of {spec.name} returned {type(targets).__name__}; the hook "
                                          "contract expects a sequence of module names (str)")
            if config.modules_to_save:
                self._add_modules_to_save(adapter_name, config.modules_to_save)
            claims = self._call(adapter_name, "trained_base_parameters")
            if claims is not None and (isinstance(claims, str) or not isinstance(claims, Sequence)):
                raise PluginContractError(f"trained_base_parameters of {spec.name} returned "
                                          f"{type(claims).__name__}; the hook contract expects a list of names")
            self._ownership.declare(adapter_name, self.base_model, self.adapter_modules, claims, before)
        except BaseException:
            snapshot.restore()
            del self.peft_config[adapter_name]
            self._ownership.forget(adapter_name)
            raise
        self._match_training_mode(modules_before)
        # asked in every training forward (_add_loss_terms): answered now, so a compiled forward finds the answer
        # cached instead of tracing the registry's locked lookup
        self._registry.implements(spec.name, "training_loss_term")
        if autocast_adapter_dtype:
            self._ownership.upcast_half(adapter_name)
        if low_cpu_mem_usage:
            self._meta_homes.update(self._ownership.to_meta(adapter_name))
        self._ownership.update([adapter_name], self._trains)

    def _match_training_mode(self, known: set[int]) -> None:
        """Modules a plugin just created start in the train/eval mode of where they were put (a new
        layer in an eval-mode model must not run its dropout)."""
        mode = {"": self.training}
        for path, module in self.named_modules(remove_duplicate=False):
            if path:
                parent = mode[path.rpartition(".")[0]]
                if id(module) not in known:
                    module.training = parent
                mode[path] = module.training

    def _complete_config(self, adapter_name: str, config: PeftConfig, spec: MethodSpec) -> PeftConfig:
        """Let the method fill the fields that depend on the model (hook ``complete_config``)."""
        done = self._registry.call(spec.name, "complete_config", model=self.base_model,
                                   adapter_name=adapter_name, config=config)
        if done is None:
            return config
        if not isinstance(done, spec.config_cls):
            raise PluginContractError(f"complete_config of {spec.name} returned {type(done).__name__}; the hook "
                                      f"contract expects a {spec.config_cls.__name__} or None")
        return done

    def _add_modules_to_save(self, adapter_name: str, names: Sequence[str]) -> None:
        for path in matching_module_names(self.base_model, names):
            module = self.base_model.get_submodule(path)
            if not isinstance(module, ModulesToSave):
                wrapper = ModulesToSave(module, self._runtime, path)
                self.base_model.set_submodule(path, wrapper)
                module = wrapper
            module.add(adapter_name)
        # heads already wrapped for another adapter
        for path, module in self.base_model.named_modules():
            if isinstance(module, ModulesToSave) and adapter_name not in module.modules_to_save:
                if any(path == w or path.endswith("." + w) for w in names):
                    module.add(adapter_name)

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Make these adapters the active ones (several at once: their effects add up, in order)."""
        if adapter_name is None:  # _require(None) means "the active ones": here it would be a silent no-op
            raise AdapterError(f"set_adapter needs an adapter name or a list of them; this model has "
                               f"{list(self.peft_config)} (use disable_adapter() to run the base model)")
        names = self._require(adapter_name)
        if self._merges:
            warnings.warn("set_adapter on a merged model: unmerging first", stacklevel=2)
            self.unmerge_adapter()
        previous = self._runtime.active
        self._runtime.active = tuple(dict.fromkeys(names))
        self._ownership.update((*previous, *names), self._trains)
        self._sync_input_hook()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter. Deleting an active adapter deactivates it; if none stays active, the
        first remaining adapter becomes active (as in Hugging Face PEFT), with a warning."""
        self._require(adapter_name)
        if adapter_name in self._merges:
            self._merges.unmerge(adapter_name)
        was_active = adapter_name in self._runtime.active
        self._runtime.active = tuple(n for n in self._runtime.active if n != adapter_name)
        self._ownership.update([adapter_name], self._trains)  # what only it trained freezes; shared claims stay
        self._remove(adapter_name)
        if was_active:
            rest = self._runtime.active
            if not rest and self.peft_config:
                rest = (next(iter(self.peft_config)),)
                warnings.warn(f"deleted the active adapter {adapter_name!r}; {rest[0]!r} is now active",
                              stacklevel=2)
            self._runtime.active = rest
            self._ownership.update(rest, self._trains)
        self._sync_input_hook()

    def _remove(self, adapter_name: str) -> None:
        config = self.peft_config[adapter_name]
        if self._registry.implements(type(config).peft_type, "remove"):
            self._call(adapter_name, "remove", store=self.adapter_modules)
        elif self._ownership.owned(adapter_name):
            raise AdapterError(f"the {type(config).peft_type} plugin cannot remove adapters "
                               "(it does not implement the remove hook)")
        if adapter_name in self.adapter_modules:
            del self.adapter_modules[adapter_name]
        for path, module in list(self.base_model.named_modules()):
            if isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
                module.drop(adapter_name)
                if not len(module.modules_to_save):
                    self.base_model.set_submodule(path, module.original_module)
        del self.peft_config[adapter_name]
        for name in self._ownership.owned(adapter_name):  # its meta parameters need no home any more
            self._meta_homes.pop(name, None)
        self._ownership.forget(adapter_name)
        self._ownership.invalidate_slots()

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the block; restores the exact previous state after."""
        merged = self._merges.unmerge_all()
        was = self._runtime.disabled
        self._runtime.disabled = True
        try:
            yield
        finally:
            self._runtime.disabled = was
            for name in merged:
                self._merges.merge(name, safe=False)

    # ------------------------------------------------------------------ merging
    @property
    def merged_adapters(self) -> list[str]:
        """The adapters merged into the base weights, in merge order (``unmerge_adapter`` undoes the last)."""
        return list(self._merges.merged)

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Fold the active (or given) mergeable adapters into the base weights, reversibly.

        Adapters of non-mergeable methods (prompt and prefix tuning) stay as they are and keep acting
        on the inputs: merging a LoRA+prompt model merges the LoRA part only. Already merged adapters
        are skipped (a documented no-op).
        """
        for name in self._require(adapter_names):
            if name in self._merges or not self._spec(name).mergeable:
                continue
            self._merges.merge(name, safe=safe_merge)

    def unmerge_adapter(self) -> None:
        """Undo every merge, newest first, restoring the base weights exactly."""
        if not self._merges:
            warnings.warn("unmerge_adapter: nothing is merged", stacklevel=2)
            return
        self._merges.unmerge_all()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Sequence[str] | None = None) -> nn.Module:
        """Merge the active (or given) adapters, remove every adapter, and return the base model."""
        names = self._require(adapter_names)
        stuck = [n for n in names if not self._spec(n).mergeable]
        if stuck:
            raise MergeError(f"adapter(s) {stuck} ({', '.join(type(self.peft_config[n]).peft_type for n in stuck)})"
                             " act on the inputs and cannot be folded into weights. Use merge_adapter() to "
                             "merge the mergeable ones and keep the wrapped model, or delete_adapter() them")
        for name in names:
            if name not in self._merges:
                self._merges.merge(name, safe=safe_merge)
        return self._unload(keep_merged=True)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging; returns the base model exactly as it was."""
        return self._unload(keep_merged=False)

    def _unload(self, keep_merged: bool) -> nn.Module:
        if not keep_merged:
            self._merges.unmerge_all()
        # the base model comes back frozen, as it was wrapped: what adapters trained of it freezes again
        self._ownership.update(list(self.peft_config), lambda _: False)
        for name in list(self.peft_config):
            self._remove(name)  # a merged adapter's weights stay folded into the base layers
        self._merges.merged.clear()
        self._runtime.active = ()
        self._sync_input_hook()
        return self.base_model

    # ------------------------------------------------------------------ forward
    def _input_adapters(self) -> list[str]:
        reg = self._registry
        return [n for n in self._runtime.active
                if reg.implements(type(self.peft_config[n]).peft_type, "prepare_inputs")]

    def _sync_input_hook(self) -> None:
        needed = bool(self._input_adapters())
        if needed and self._input_hook is None:
            self._input_hook = self.base_model.register_forward_pre_hook(self._prepare_inputs_hook,
                                                                          with_kwargs=True)
        elif not needed and self._input_hook is not None:
            self._input_hook.remove()
            self._input_hook = None

    def _prepare_inputs_hook(self, module: nn.Module, args: tuple[Any, ...],
                             kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if self._runtime.disabled:
            return None
        names = self._input_adapters()
        if not names:
            return None
        if args:
            kwargs = {**bind_positional(module, args), **kwargs}
        for name in names:
            result = self._call(name, "prepare_inputs", store=self.adapter_modules, inputs=dict(kwargs))
            if result is None:
                continue
            if not isinstance(result, dict):
                raise PluginContractError(f"prepare_inputs of {type(self.peft_config[name]).peft_type} "
                                          f"returned {type(result).__name__}; the hook contract expects a dict")
            kwargs = result
        return (), kwargs

    @contextmanager
    def _routed(self, adapter_names: Sequence[str] | None, args: tuple[Any, ...] = (),
                kwargs: dict[str, Any] | None = None) -> Iterator[None]:
        if adapter_names is None:
            yield
            return
        check_routing(self, adapter_names, args, kwargs or {})
        with self._runtime.route(adapter_names):
            yield

    def _forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The base model's forward (same arguments, same output) with the active adapters applied.

        ``adapter_names`` (one name per batch row, ``"__base__"`` for the bare model) routes a mixed batch: each
        row goes through its own adapter, as PEFT's ``adapter_names``. Layers that cannot route refuse it with an
        AdapterError."""
        with self._routed(adapter_names, args, kwargs):
            outputs = self.base_model(*args, **kwargs)
        if self.training and not self._runtime.disabled:
            self._add_loss_terms(outputs)
        return outputs

    forward = ForwardWithBaseSignature()

    def _add_loss_terms(self, outputs: Any) -> None:
        """Add the trained adapters' ``training_loss_term`` answers to ``outputs.loss`` (a regulariser)."""
        loss = getattr(outputs, "loss", None)
        if not isinstance(loss, torch.Tensor):
            return
        reg = self._registry
        total = loss
        for name in self._runtime.active:
            method = type(self.peft_config[name]).peft_type
            if not self._trains(name) or not reg.implements(method, "training_loss_term"):
                continue
            term = self._call(name, "training_loss_term", outputs=outputs)
            if term is None:
                continue
            if not isinstance(term, torch.Tensor):
                raise PluginContractError(f"training_loss_term of {method} returned {type(term).__name__}; the "
                                          "hook contract expects a tensor or None")
            total = total + term
        if total is not loss:
            outputs.loss = total  # a transformers ModelOutput keeps its mapping entry in step with the attribute

    # ------------------------------------------------------------------ training steps
    def on_optimizer_step(self, global_step: int) -> None:
        """Tell the adapters that an optimiser step was taken: call this after ``optimizer.step()`` and before
        ``optimizer.zero_grad()``, with the 0-based index of the step (``AdapterTrainer`` does it for you).

        Methods with a training-time schedule act here through their ``on_optimizer_step`` hook (AdaLoRA
        reallocates its rank budget); for the others it does nothing. A config a method returns replaces the
        adapter's (it is what ``save_pretrained`` writes)."""
        if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 0:
            raise TypeError(f"on_optimizer_step needs the step index (an int >= 0), got {global_step!r}")
        reg = self._registry
        for name in list(self.peft_config):
            config = self.peft_config[name]
            if not reg.implements(type(config).peft_type, "on_optimizer_step"):
                continue
            with torch.no_grad():
                updated = self._call(name, "on_optimizer_step", global_step=global_step)
            if config_answer("on_optimizer_step", config, updated) is not None:
                self.peft_config[name] = updated

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The base model's ``generate`` (same arguments) with the active adapters, or with ``adapter_names``
        routing each batch row to its adapter (see ``forward``)."""
        with self._routed(adapter_names, args, kwargs):
            return self.base_model.generate(*args, **kwargs)

    # ------------------------------------------------------------------ parameters
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, as Hugging Face PEFT counts them."""
        trainable = total = 0
        for p in self.parameters():
            n = p.numel()
            total += n
            if p.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print PEFT's line: ``trainable params: 73,728 || all params: 4,457,728 || trainable%: 1.6539``."""
        trainable, total = self.get_nb_trainable_parameters()
        pct = 100 * trainable / total if total else 0.0
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")

    # ------------------------------------------------------------------ files (see checkpoint.py)
    def get_adapter_state_dict(self, adapter_name: str = "default",
                               state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The tensors ``save_pretrained`` writes for ``adapter_name``, keyed as on disk.

        ``state_dict``: this model's full state dict, if the caller has it already (or wants other
        values saved, as with Hugging Face PEFT's ``save_pretrained(state_dict=...)``).
        """
        self._require(adapter_name)
        return checkpoint.adapter_state_dict(self, adapter_name, state_dict)

    def save_pretrained(self, save_directory: str | os.PathLike[str], safe_serialization: bool = True,
                        selected_adapters: Sequence[str] | None = None, is_main_process: bool | None = None,
                        state_dict: dict[str, torch.Tensor] | None = None,
                        save_embedding_layers: str | bool = "auto", **kwargs: Any) -> None:
        """Write each adapter as ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's format).

        ``default`` goes to ``save_directory``, every other adapter to ``save_directory/<name>``. Each
        folder's files are replaced atomically: an interrupted save leaves the previous files intact.

        ``is_main_process=None`` means rank 0 when a ``torch.distributed`` process group is initialized,
        else True: every rank of a DDP/accelerate/FSDP job may call this, and only one writes. Adapter
        weights sharded by FSDP2 are gathered first, on every rank (see docs/distributed.md).
        ``state_dict``: take the adapter's tensors from this (the model's namespace) instead of the model.
        ``save_embedding_layers``: PEFT's "auto"/False write no base embedding weights (peft-core never
        resizes them); True is refused, since there is nothing peft-core changed to write.
        ``path_initial_model_for_weight_conversion`` (PEFT's, with its older name ``convert_pissa_to_lora``): a
        folder holding this adapter as first saved, right after ``get_peft_model``; the adapter is written
        converted relative to it by its method's ``convert_for_save`` hook (LoRA: a PiSSA/OLoRA adapter becomes
        a plain LoRA of twice the rank for the original base weights). That folder is read, never changed.
        Any other keyword is a TypeError naming it.
        """
        if save_embedding_layers is True:
            raise ConfigError("save_pretrained(save_embedding_layers=True): peft-core adapters never change the "
                              "base model's embedding layers, so there is nothing to add; save the base model "
                              "itself if you resized its vocabulary")
        initial = kwargs.pop("path_initial_model_for_weight_conversion", None)
        legacy = kwargs.pop("convert_pissa_to_lora", None)
        if legacy is not None:
            warnings.warn("save_pretrained(convert_pissa_to_lora=...) is PEFT's old name; use "
                          "path_initial_model_for_weight_conversion", FutureWarning, stacklevel=2)
            initial = initial if initial is not None else legacy
        _no_extra("save_pretrained", kwargs, "safe_serialization, selected_adapters, is_main_process, state_dict, "
                  "save_embedding_layers, path_initial_model_for_weight_conversion")
        names = list(self.peft_config) if selected_adapters is None else self._require(selected_adapters)
        checkpoint.save_adapters(self, save_directory, names, safe_serialization=safe_serialization,
                                 is_main_process=is_main_process, state_dict=state_dict, initial=initial)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload adapter with peft-core", revision: str | None = None,
                    selected_adapters: Sequence[str] | None = None, api: Any = None) -> Any:
        """Save the adapter(s) to a temporary folder and upload it with huggingface_hub's API.

        ``api`` is an ``huggingface_hub.HfApi`` (one is made with ``token`` when omitted); the upload
        is exactly the folder ``save_pretrained`` writes.
        """
        return checkpoint.push(self, repo_id, private=private, token=token, commit_message=commit_message,
                               revision=revision, selected_adapters=selected_adapters, api=api)

    def load_adapter(self, model_id: str | os.PathLike[str], adapter_name: str = "default",
                     is_trainable: bool = False, config: PeftConfig | None = None,
                     subfolder: str | None = None, revision: str | None = None, low_cpu_mem_usage: bool = False,
                     autocast_adapter_dtype: bool = True, **hub_kwargs: Any) -> None:
        """Add an adapter from a folder or Hub repo written by peft-core or Hugging Face PEFT.

        All or nothing: a bad file leaves the model as it was. Unless ``is_trainable``, the model is put in eval
        mode afterwards (no dropout), as in Hugging Face PEFT. ``low_cpu_mem_usage=True`` creates the
        adapter's parameters on ``meta`` and gives them the file's values (no random init first).
        ``hub_kwargs`` go to ``huggingface_hub`` (``token``, ``cache_dir``, ``local_files_only``...).
        """
        if config is None:
            config = PeftConfig.from_pretrained(model_id, subfolder=subfolder, revision=revision, **hub_kwargs)
        config = config.replace(inference_mode=not is_trainable)
        path = resolve_weights(model_id, subfolder=subfolder, revision=revision, **hub_kwargs)
        weights = load_weights(path)
        snapshot = ModuleSnapshot(self)
        self._runtime.filling = True  # the file overwrites every owned tensor next: plugins may skip random init
        try:
            self._add_adapter(adapter_name, config, low_cpu_mem_usage, autocast_adapter_dtype, snapshot)
        finally:
            self._runtime.filling = False
        try:
            self.load_adapter_state_dict(adapter_name, weights, source=str(path))
        except BaseException:
            snapshot.restore()
            self.peft_config.pop(adapter_name, None)
            self._ownership.forget(adapter_name)
            self._ownership.invalidate_slots()
            raise
        if not self._runtime.active:
            self.set_adapter(adapter_name)
        if not is_trainable:
            # loaded for inference: no dropout (as Hugging Face PEFT does), whatever mode the base model was in
            self.eval()

    def load_adapter_state_dict(self, adapter_name: str, weights: dict[str, torch.Tensor],
                                source: str = "state dict") -> None:
        """Copy disk-keyed ``weights`` into adapter ``adapter_name``; checks everything before copying."""
        checkpoint.load_adapter_tensors(self, adapter_name, weights, source)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike[str], adapter_name: str = "default",
                        is_trainable: bool = False, config: PeftConfig | None = None,
                        subfolder: str | None = None, revision: str | None = None, low_cpu_mem_usage: bool = False,
                        autocast_adapter_dtype: bool = True, **kwargs: Any) -> AdaptedModel:
        """Wrap ``model`` and load the adapter saved at ``model_id`` (folder or Hub repo)."""
        if config is None:
            config = PeftConfig.from_pretrained(model_id, subfolder=subfolder, revision=revision, **kwargs)
        wrapper = cls._class_for(config)(model)
        try:
            wrapper.load_adapter(model_id, adapter_name=adapter_name, is_trainable=is_trainable, config=config,
                                 subfolder=subfolder, revision=revision, low_cpu_mem_usage=low_cpu_mem_usage,
                                 autocast_adapter_dtype=autocast_adapter_dtype, **kwargs)
        except BaseException:
            wrapper._detach()
            raise
        wrapper.set_adapter(adapter_name)
        return wrapper

    @classmethod
    def _class_for(cls, config: PeftConfig) -> type[AdaptedModel]:
        return cls

    def _detach(self) -> None:
        if self._input_hook is not None:
            self._input_hook.remove()
            self._input_hook = None


def config_answer(hook: str, config: PeftConfig, answer: Any) -> PeftConfig | None:
    """``answer`` of a hook that returns the adapter's updated config or None, checked against the contract: an
    instance of the adapter's own config class (a PluginContractError names the hook and the method otherwise)."""
    if answer is not None and type(answer) is not type(config):
        raise PluginContractError(f"{hook} of {type(config).peft_type} returned {type(answer).__name__}; the hook "
                                  f"contract expects a {type(config).__name__} or None")
    return answer


def _dispatch_operation(name: str, offers: Sequence[MethodSpec]) -> Any:
    """An operation that several installed methods offer (LoRA's and IA3's ``add_weighted_adapter``): the call
    goes to the method of the adapters it names (its string arguments, or lists of them, that are adapter names
    of the model); an AdapterError when that does not single out one of the offering methods."""
    by_type = {spec.config_cls.peft_type: spec for spec in offers}

    def call(model: AdaptedModel, *args: Any, **kwargs: Any) -> Any:
        named: set[str] = set()
        for value in (*args, *kwargs.values()):
            values = [value] if isinstance(value, str) else value if isinstance(value, (list, tuple)) else []
            named.update(v for v in values if isinstance(v, str) and v in model.peft_config)
        methods = {type(model.peft_config[n]).peft_type for n in named} & set(by_type)
        if named and not methods:
            owners = ", ".join(f"{n!r} is {type(model.peft_config[n]).peft_type}" for n in sorted(named))
            raise AdapterError(f"{name} is offered by {', '.join(sorted(by_type))} only; {owners}, which does "
                               f"not offer it")
        if len(methods) != 1:
            raise AdapterError(f"{name} is offered by several methods ({', '.join(sorted(by_type))}); the call must "
                               f"name adapters of exactly one of them (it names {sorted(named) or 'none'})")
        return by_type[methods.pop()].operations[name](model, *args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = "\n\n".join(f"{m}: {spec.operations[name].__doc__ or ''}" for m, spec in sorted(by_type.items()))
    return call


def _warn_if_stock_trainer(caller: object) -> None:
    trainer_module = sys.modules.get("transformers.trainer")
    if trainer_module is None or not isinstance(caller, trainer_module.Trainer):
        return
    if getattr(caller, "_peft_core_adapter_checkpoints", False):  # built with peft-core's integration
        return
    cls = type(caller)
    # a TRL trainer also takes its full-model paths (fused LM head, DPO's reference model): point to our versions
    trl_hint = (f" For TRL, use peft_core.integrations.trl.{cls.__name__} if it exists, else put "
                "AdapterTrainerMixin first in its bases." if cls.__module__.split(".")[0] == "trl" else "")
    warnings.warn(
        f"{cls.__name__} is a transformers Trainer that does not know peft-core models: its checkpoints "
        "would hold the whole model's state dict, and on tied-weight models (GPT-2, T5) the first checkpoint fails "
        "with 'Some tensors share memory'. Use peft_core.integrations.transformers.AdapterTrainer (adapter-only "
        "checkpoints, resume, best-model loading), or AdapterTrainerMixin on your own Trainer subclass, or save "
        f"with model.save_pretrained().{trl_hint}",
        UserWarning, stacklevel=4)  # warn, this helper, the property, Trainer.__init__: the user's Trainer(...) line
