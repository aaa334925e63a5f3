"""AdaptedModel: a base model plus named adapters of any installed method, composed through hooks.

The core never knows what a method does. It keeps the bookkeeping every method shares — adapter
names, configs, which are active or merged, which parameters each adapter created, the
``modules_to_save`` copies, saving and loading files — and calls the owning plugin for the rest.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import compat
from .config import CONFIG_NAME, PeftConfig
from .errors import AdapterError, CheckpointError, ConfigError, MergeError, PluginContractError
from .modules_to_save import ModulesToSave, matching_module_names
from .registry import Registry, get_registry
from .runtime import BASE_ROW, AdapterRuntime
from .serialization import (
    SAFETENSORS_NAME,
    WEIGHTS_NAME,
    load_weights,
    resolve_file,
    serialize_safetensors,
    staged_files,
)
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


def _first(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return f"{shown} (and {len(items) - n} more)" if len(items) > n else shown


class _BoundForward:
    """``model.forward`` of an AdaptedModel: calls ``_forward`` but *shows* the base model's signature
    (plus ``adapter_names``), so tools that inspect it — the transformers Trainer choosing which dataset
    columns to keep, say — see ``input_ids``, ``labels``... instead of ``*args, **kwargs``."""

    __slots__ = ("_model",)

    def __init__(self, model: AdaptedModel) -> None:
        self._model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._model._forward(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return _signature_with_routing(type(self._model.base_model))


class _ForwardWithBaseSignature:
    def __get__(self, obj: AdaptedModel | None, objtype: type | None = None) -> Any:
        if obj is None:
            return AdaptedModel._forward
        return _BoundForward(obj)


@functools.lru_cache(maxsize=64)
def _signature_with_routing(cls: type) -> inspect.Signature:
    params = [p for p in inspect.signature(cls.forward).parameters.values() if p.name != "self"]
    routing = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
    if params and params[-1].kind is inspect.Parameter.VAR_KEYWORD:
        params.insert(len(params) - 1, routing)
    else:
        params.append(routing)
    return inspect.Signature(params)


class AdaptedModel(nn.Module):
    """Wraps ``model`` (in place, never copied) and manages its adapters.

    ``AdaptedModel(model, config)`` adds ``config`` as adapter ``"default"`` and activates it.
    """

    def __init__(self, model: nn.Module, peft_config: PeftConfig | None = None,
                 adapter_name: str = "default", **_: Any) -> None:
        super().__init__()
        self.base_model = model
        self.adapter_modules = nn.ModuleDict()
        self.peft_config: dict[str, PeftConfig] = {}
        self._runtime = AdapterRuntime()
        self._adapter_params: dict[str, list[str]] = {}
        self._slots: dict[str, list[tuple[nn.Module, str]]] = {}  # cache of _param_slots
        self._merged: list[str] = []
        self._input_hook: Any = None
        self.train(model.training)  # the wrapper starts in the mode the user's model is in
        if peft_config is not None:
            self.add_adapter(adapter_name, peft_config)
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
        for spec, _ in self._registry.methods():
            if name in spec.operations:
                return functools.partial(spec.operations[name], self)
        return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        return self.base_model

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

    # ------------------------------------------------------------------ adapters
    @property
    def active_adapters(self) -> list[str]:
        return list(self._runtime.active)

    @property
    def active_adapter(self) -> str | list[str]:
        active = self._runtime.active
        return active[0] if len(active) == 1 else list(active)

    def _prepare_config(self, config: PeftConfig) -> PeftConfig:
        """Fill what the core knows (the base model's name); task models add their heads."""
        if config.base_model_name_or_path is None:
            name = getattr(getattr(self.base_model, "config", None), "name_or_path", None)
            if isinstance(name, str) and name:
                config = config.replace(base_model_name_or_path=name)
        return config

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, **_: Any) -> None:
        """Inject a new adapter. All or nothing: if anything fails, the model is as it was."""
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
        snapshot = ModuleSnapshot(self)
        before = {id(p) for p in self.parameters()}
        modules_before = {id(m) for m in self.modules()}
        self._freeze_base()
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
        except BaseException:
            snapshot.restore()
            del self.peft_config[adapter_name]
            raise
        self._match_training_mode(modules_before)
        self._adapter_params[adapter_name] = [n for n, p in self.named_parameters() if id(p) not in before]
        self._slots.pop(adapter_name, None)
        self._update_trainable(adapter_name)

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

    def _freeze_base(self) -> None:
        """Only adapters train: every parameter no adapter created is frozen (plugins may then unfreeze
        what their method trains, such as LoRA's ``bias='all'``)."""
        owned = {n for names in self._adapter_params.values() for n in names}
        for name, param in self.named_parameters():
            if name not in owned:
                param.requires_grad_(False)

    def _add_modules_to_save(self, adapter_name: str, names: Sequence[str]) -> None:
        for path in matching_module_names(self.base_model, names):
            module = self.base_model.get_submodule(path)
            if not isinstance(module, ModulesToSave):
                wrapper = ModulesToSave(module, self._runtime)
                self.base_model.set_submodule(path, wrapper)
                module = wrapper
            module.add(adapter_name)
        # heads already wrapped for another adapter
        for path, module in self.base_model.named_modules():
            if isinstance(module, ModulesToSave) and adapter_name not in module.modules_to_save:
                if any(path == w or path.endswith("." + w) for w in names):
                    module.add(adapter_name)

    def _param_slots(self, adapter_name: str) -> list[tuple[nn.Module, str]]:
        """(owning module, attribute) of each parameter the adapter created, resolved once: the cost of
        set_adapter follows the adapters it touches, not how many are loaded, and a slot (unlike the
        Parameter object) survives wrappers that swap parameters in place, such as FSDP2."""
        slots = self._slots.get(adapter_name)
        if slots is None:
            slots = []
            for pname in self._adapter_params.get(adapter_name, ()):
                path, _, leaf = pname.rpartition(".")
                try:
                    slots.append((self.get_submodule(path) if path else self, leaf))
                except AttributeError:  # removed since (a modules_to_save copy unwrapped, say)
                    continue
            self._slots[adapter_name] = slots
        return slots

    def _update_trainable(self, *adapter_names: str) -> None:
        for name in adapter_names:
            trainable = name in self._runtime.active and not self.peft_config[name].inference_mode
            for module, leaf in self._param_slots(name):
                param = module._parameters.get(leaf)
                if param is not None:
                    param.requires_grad_(trainable)

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Make these adapters the active ones (several at once: their effects add up, in order)."""
        if adapter_name is None:  # _require(None) means "the active ones": here it would be a silent no-op
            raise AdapterError(f"set_adapter needs an adapter name or a list of them; this model has "
                               f"{list(self.peft_config)} (use disable_adapter() to run the base model)")
        names = self._require(adapter_name)
        if self._merged:
            warnings.warn("set_adapter on a merged model: unmerging first", stacklevel=2)
            self.unmerge_adapter()
        previous = self._runtime.active
        self._runtime.active = tuple(dict.fromkeys(names))
        self._update_trainable(*dict.fromkeys((*previous, *names)))
        self._sync_input_hook()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter. Deleting an active adapter deactivates it; if none stays active, the
        first remaining adapter becomes active (as in Hugging Face PEFT), with a warning."""
        self._require(adapter_name)
        if adapter_name in self._merged:
            self._unmerge_one(adapter_name)
        self._remove(adapter_name)
        if adapter_name in self._runtime.active:
            rest = tuple(n for n in self._runtime.active if n != adapter_name)
            if not rest and self.peft_config:
                rest = (next(iter(self.peft_config)),)
                warnings.warn(f"deleted the active adapter {adapter_name!r}; {rest[0]!r} is now active",
                              stacklevel=2)
            self._runtime.active = rest
            self._update_trainable(*rest)
        self._sync_input_hook()

    def _remove(self, adapter_name: str) -> None:
        config = self.peft_config[adapter_name]
        if self._registry.implements(type(config).peft_type, "remove"):
            self._call(adapter_name, "remove", store=self.adapter_modules)
        elif self._adapter_params.get(adapter_name):
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
        self._adapter_params.pop(adapter_name, None)
        self._slots.pop(adapter_name, None)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the block; restores the exact previous state after."""
        merged = list(self._merged)
        was = self._runtime.disabled
        for name in reversed(merged):
            self._unmerge_one(name)
        self._runtime.disabled = True
        try:
            yield
        finally:
            self._runtime.disabled = was
            for name in merged:
                self._merge_one(name, safe=False)

    # ------------------------------------------------------------------ merging
    def _merge_one(self, adapter_name: str, safe: bool) -> None:
        self._call(adapter_name, "merge", safe=safe)
        self._merged.append(adapter_name)

    def _unmerge_one(self, adapter_name: str) -> None:
        """Unmerge one adapter. Merges are undone newest first — a method may restore weights exactly
        only in that order — so adapters merged after this one are unmerged and merged again."""
        later = self._merged[self._merged.index(adapter_name) + 1:]
        for name in reversed(later):
            self._call(name, "unmerge")
        self._call(adapter_name, "unmerge")
        self._merged.remove(adapter_name)
        for name in later:
            self._call(name, "merge", safe=False)

    @property
    def merged_adapters(self) -> list[str]:
        return list(self._merged)

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Fold the active (or given) mergeable adapters into the base weights, reversibly.

        Adapters of non-mergeable methods (prompt and prefix tuning) stay as they are and keep acting
        on the inputs: merging a LoRA+prompt model merges the LoRA part only. Already merged adapters
        are skipped (a documented no-op).
        """
        for name in self._require(adapter_names):
            if name in self._merged or not self._spec(name).mergeable:
                continue
            self._merge_one(name, safe=safe_merge)

    def unmerge_adapter(self) -> None:
        """Undo every merge, newest first, restoring the base weights exactly."""
        if not self._merged:
            warnings.warn("unmerge_adapter: nothing is merged", stacklevel=2)
            return
        for name in reversed(list(self._merged)):
            self._unmerge_one(name)

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
            if name not in self._merged:
                self._merge_one(name, safe=safe_merge)
        return self._unload(keep_merged=True)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging; returns the base model exactly as it was."""
        return self._unload(keep_merged=False)

    def _unload(self, keep_merged: bool) -> nn.Module:
        if not keep_merged:
            for name in reversed(list(self._merged)):
                self._unmerge_one(name)
        for name in list(self.peft_config):
            self._remove(name)  # a merged adapter's weights stay folded into the base layers
        self._merged.clear()
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
            kwargs = {**_bind_positional(module, args), **kwargs}
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
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence) or not adapter_names:
            raise AdapterError("adapter_names must be a non-empty list with one adapter name per row")
        rows = _batch_rows(args, kwargs or {})
        if rows is not None and len(adapter_names) != rows:
            raise AdapterError(f"adapter_names has {len(adapter_names)} entries but the batch has {rows} rows; "
                               "give one adapter name per row")
        unknown = sorted({n for n in adapter_names if n != BASE_ROW and n not in self.peft_config})
        if unknown:
            raise AdapterError(f"adapter_names has unknown adapter(s) {unknown}; this model has "
                               f"{list(self.peft_config)} (use {BASE_ROW!r} for rows without an adapter)")
        if self._merged:
            raise AdapterError("adapter_names (mixed-batch inference) needs unmerged adapters; "
                               "call unmerge_adapter() first")
        if self.training:
            raise AdapterError("adapter_names (mixed-batch inference) is for inference; call model.eval() first")
        with self._runtime.route(adapter_names):
            yield

    def _forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        with self._routed(adapter_names, args, kwargs):
            return self.base_model(*args, **kwargs)

    forward = _ForwardWithBaseSignature()

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
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
        trainable, total = self.get_nb_trainable_parameters()
        pct = 100 * trainable / total if total else 0.0
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")

    # ------------------------------------------------------------------ state dicts
    def _mts_keys(self, adapter_name: str) -> dict[str, str]:
        """modules_to_save: model key -> disk key, for ``adapter_name``."""
        out = {}
        disk_prefix = self._spec(adapter_name).disk_model_prefix  # PEFT nests prompt methods differently
        for path, module in self.base_model.named_modules():
            if isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
                for pname, _ in module.modules_to_save[adapter_name].named_parameters():
                    model_key = f"{compat.MODEL_PREFIX}{path}.modules_to_save.{adapter_name}.{pname}"
                    out[model_key] = f"{disk_prefix}{path}.{pname}"
        return out

    def get_adapter_state_dict(self, adapter_name: str = "default",
                               state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The tensors ``save_pretrained`` writes for ``adapter_name``, keyed as on disk.

        ``state_dict``: this model's full state dict, if the caller has it already (or wants other
        values saved, as with Hugging Face PEFT's ``save_pretrained(state_dict=...)``).
        """
        self._require(adapter_name)
        full = self.state_dict() if state_dict is None else state_dict
        result = self._call(adapter_name, "state_dict_filter", store=self.adapter_modules, state_dict=full)
        if not isinstance(result, dict):
            raise PluginContractError(f"state_dict_filter of {type(self.peft_config[adapter_name]).peft_type}"
                                      f" returned {type(result).__name__}; the hook contract expects a dict")
        result = dict(result)
        for model_key, disk_key in self._mts_keys(adapter_name).items():
            result[disk_key] = full[model_key]
        # FSDP2 (fully_shard) keeps each rank's shard as a DTensor; a file needs whole tensors. Gathering is
        # a collective, so under FSDP every rank must call this (save_pretrained does, on every rank).
        return {k: v.full_tensor() if callable(getattr(v, "full_tensor", None)) else v for k, v in result.items()}

    def save_pretrained(self, save_directory: str | os.PathLike[str], safe_serialization: bool = True,
                        selected_adapters: Sequence[str] | None = None, is_main_process: bool | None = None,
                        state_dict: dict[str, torch.Tensor] | None = None, **_: Any) -> None:
        """Write each adapter as ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's format).

        ``default`` goes to ``save_directory``, every other adapter to ``save_directory/<name>``. Each
        folder's files are replaced atomically: an interrupted save leaves the previous files intact.

        ``is_main_process=None`` means rank 0 when a ``torch.distributed`` process group is initialized,
        else True: every rank of a DDP/accelerate/FSDP job may call this, and only one writes. Adapter
        weights sharded by FSDP2 are gathered first, on every rank (see docs/distributed.md).
        ``state_dict``: take the adapter's tensors from this (the model's namespace) instead of the model.
        """
        if is_main_process is None:
            is_main_process = not _distributed() or torch.distributed.get_rank() == 0
        names = list(self.peft_config) if selected_adapters is None else self._require(selected_adapters)
        # Every rank reads the adapter tensors (cheap: views of the live parameters) so that FSDP2 shards
        # can be gathered, which takes all ranks; only the main process serializes and writes.
        full = self.state_dict() if state_dict is None else state_dict  # one walk of the model for all adapters
        gathered = {name: self.get_adapter_state_dict(name, full) for name in names}
        if not is_main_process:
            return
        root = Path(save_directory)
        if root.exists() and not root.is_dir():
            raise CheckpointError(f"{root} exists and is not a folder")
        payloads = []
        for name in names:  # build every payload before touching the disk
            config = self.peft_config[name].replace(inference_mode=True)
            tensors = gathered[name]
            data = (serialize_safetensors(tensors) if safe_serialization else _torch_bytes(tensors))
            payloads.append((name, config, data))
        # one stage for every adapter: all files are written to temporary names before any replaces its target,
        # so a failure leaves every adapter folder as it was
        with staged_files(root) as files:
            for name, config, data in payloads:
                sub = "" if name == "default" else f"{name}/"
                files[sub + (SAFETENSORS_NAME if safe_serialization else WEIGHTS_NAME)] = data
                files[sub + CONFIG_NAME] = config.to_json_string().encode()

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload adapter with peft-core", revision: str | None = None,
                    selected_adapters: Sequence[str] | None = None, api: Any = None) -> Any:
        """Save the adapter(s) to a temporary folder and upload it with huggingface_hub's API.

        ``api`` is an ``huggingface_hub.HfApi`` (one is made with ``token`` when omitted); the upload
        is exactly the folder ``save_pretrained`` writes.
        """
        import tempfile

        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="peft-core-push-") as folder:
            self.save_pretrained(folder, selected_adapters=selected_adapters)
            return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                     revision=revision)

    def load_adapter(self, model_id: str | os.PathLike[str], adapter_name: str = "default",
                     is_trainable: bool = False, config: PeftConfig | None = None,
                     subfolder: str | None = None, revision: str | None = None, **hub_kwargs: Any) -> None:
        """Add an adapter from a folder or Hub repo written by peft-core or Hugging Face PEFT.

        All or nothing: a bad file leaves the model as it was.
        """
        if config is None:
            config = PeftConfig.from_pretrained(model_id, subfolder=subfolder, revision=revision, **hub_kwargs)
        config = config.replace(inference_mode=not is_trainable)
        path = resolve_file(model_id, SAFETENSORS_NAME, subfolder=subfolder, revision=revision, **hub_kwargs)
        if path is None:
            path = resolve_file(model_id, WEIGHTS_NAME, subfolder=subfolder, revision=revision, **hub_kwargs)
        if path is None:
            raise CheckpointError(f"{model_id!s}: no {SAFETENSORS_NAME} or {WEIGHTS_NAME} found"
                                  + (f" in subfolder {subfolder!r}" if subfolder else ""))
        weights = load_weights(path)
        snapshot = ModuleSnapshot(self)
        self.add_adapter(adapter_name, config)
        try:
            self.load_adapter_state_dict(adapter_name, weights, source=str(path))
        except BaseException:
            snapshot.restore()
            self.peft_config.pop(adapter_name, None)
            self._adapter_params.pop(adapter_name, None)
            self._slots.pop(adapter_name, None)
            raise
        if not self._runtime.active:
            self.set_adapter(adapter_name)

    def load_adapter_state_dict(self, adapter_name: str, weights: dict[str, torch.Tensor],
                                source: str = "state dict") -> None:
        """Copy disk-keyed ``weights`` into adapter ``adapter_name``; checks everything before copying."""
        mts = {disk: model for model, disk in self._mts_keys(adapter_name).items()}
        # PEFT's LoRA with bias="all" also writes a wrapped module's bias under the wrapper's own path, adapter
        # name stripped (<path>.modules_to_save.bias beside <path>.bias: the same tensor); <path>.<w> wins
        prefix, inner = self._spec(adapter_name).disk_model_prefix, f".modules_to_save.{adapter_name}."
        aliases = {prefix + model[len(compat.MODEL_PREFIX):].replace(inner, ".modules_to_save.", 1): model
                   for model in mts.values()}
        rest = {k: v for k, v in weights.items() if k not in mts and k not in aliases}
        mapped = self._call(adapter_name, "state_dict_load", store=self.adapter_modules, state_dict=rest)
        if not isinstance(mapped, dict):
            raise PluginContractError(f"state_dict_load of {type(self.peft_config[adapter_name]).peft_type} "
                                      f"returned {type(mapped).__name__}; the hook contract expects a dict")
        mapped = dict(mapped)
        for disk, model_key in aliases.items():
            if disk in weights:
                mapped[model_key] = weights[disk]
        for disk, model_key in mts.items():
            if disk in weights:
                mapped[model_key] = weights[disk]
        targets = dict(self.named_parameters())
        targets.update(self.named_buffers())
        unexpected = sorted(k for k in mapped if k not in targets)
        if unexpected:
            raise CheckpointError(f"{source}: {len(unexpected)} tensor(s) match nothing in "
                                  f"{type(self.base_model).__name__}: {_first(unexpected)}. The adapter was "
                                  "made for another architecture, or its keys are not in PEFT's format")
        order = {k: i for i, k in enumerate(targets)}  # report in model order: the first mismatching modules first
        bad_shape = [f"{k} {tuple(v.shape)} vs model {tuple(targets[k].shape)}"
                     for k, v in sorted(mapped.items(), key=lambda kv: order[kv[0]])
                     if tuple(v.shape) != tuple(targets[k].shape)]
        if bad_shape:
            raise CheckpointError(f"{source}: {len(bad_shape)} shape mismatch(es): {_first(bad_shape)}. The "
                                  "adapter was made for a model of another size, or with another r")
        missing = [k for k in self._adapter_params.get(adapter_name, ()) if k not in mapped]  # model order
        if missing:
            raise CheckpointError(f"{source}: {len(missing)} tensor(s) of adapter {adapter_name!r} are missing "
                                  f"from the file: {_first(missing)}")
        # only a floating tensor fits a floating parameter: copy_ would turn ints and bools into floats silently,
        # and drop the imaginary part of complex values
        bad_dtype = [f"{k} ({v.dtype})" for k, v in mapped.items()
                     if targets[k].is_floating_point() and not v.is_floating_point()]
        if bad_dtype:
            raise CheckpointError(f"{source}: {len(bad_dtype)} tensor(s) are not floating point, but the parameters "
                                  f"they load into are: {_first(bad_dtype)}. The file is corrupt or not an adapter")
        with torch.no_grad():
            for k, v in mapped.items():
                t = targets[k]
                if t.is_meta:
                    t.data = v.to(dtype=t.dtype)
                else:
                    t.copy_(v)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike[str], adapter_name: str = "default",
                        is_trainable: bool = False, config: PeftConfig | None = None,
                        subfolder: str | None = None, revision: str | None = None,
                        **kwargs: Any) -> AdaptedModel:
        """Wrap ``model`` and load the adapter saved at ``model_id`` (folder or Hub repo)."""
        if config is None:
            config = PeftConfig.from_pretrained(model_id, subfolder=subfolder, revision=revision, **kwargs)
        wrapper = cls._class_for(config)(model)
        try:
            wrapper.load_adapter(model_id, adapter_name=adapter_name, is_trainable=is_trainable, config=config,
                                 subfolder=subfolder, revision=revision, **kwargs)
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


def _batch_rows(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The batch size of a forward/generate call, from its token ids or embeddings (None when unknown)."""
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    return None


def _distributed() -> bool:
    """Whether this process is one rank of an initialized torch.distributed job."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _torch_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, buf)
    return buf.getvalue()


@functools.lru_cache(maxsize=64)
def _forward_params(cls: type) -> tuple[str, ...]:
    sig = inspect.signature(cls.forward)
    return tuple(p.name for p in sig.parameters.values()
                 if p.name != "self" and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _bind_positional(module: nn.Module, args: tuple[Any, ...]) -> dict[str, Any]:
    names = _forward_params(type(module))
    if len(args) > len(names):
        raise TypeError(f"{type(module).__name__}.forward got {len(args)} positional arguments")
    return dict(zip(names, args))
