"""The hook contract between peft-core and method plugins — the documentation of record.

A *method plugin* is any object (a module, a class instance) with functions named like the hooks
below, marked with :data:`hookimpl`, and published in the ``peft_core.methods`` entry-point group::

    # pyproject.toml of a plugin distribution
    [project.entry-points."peft_core.methods"]
    my_method = "my_package.plugin:plugin"

How the core calls them
-----------------------
``declare_methods`` is called once per plugin when it is registered. Every other hook concerns *one
adapter*, and the core calls it only on the plugin that declared that adapter's method: the call goes
through ``PluginManager.subset_hook_caller`` with every *other* method plugin removed (cached per
plugin). Plugins that declare no method ("extensions") stay in every call, so they can wrap a method's
hooks with ``@hookimpl(wrapper=True)`` — for instance to time every injection::

    class InjectTimer:
        @hookimpl(wrapper=True)
        def inject(self, adapter_name):
            start = time.perf_counter()
            result = yield
            print(f"inject {adapter_name}: {time.perf_counter() - start:.3f} s")
            return result

(To teach LoRA a new layer type, implement LoRA's published ``lora_make_layer`` instead; see below.)

Hooks other than ``declare_methods`` and ``add_hookspecs`` are ``firstresult``: the first non-None
answer is the answer, in pluggy's order (the last registered plugin first; an extension that must answer
before the owner marks its implementation ``tryfirst=True``). A hook that returns
``None`` means "not implemented": for ``inject``, ``state_dict_filter`` and ``state_dict_load`` that is
an error; ``merge``/``unmerge`` are required of (and only called for) methods declared ``mergeable`` —
declaring ``mergeable=True`` without both is a contract error at registration; ``complete_config``,
``prepare_inputs``, ``remove``, ``trained_base_parameters``, ``training_loss_term`` and ``on_optimizer_step``
are optional, and an extension's
implementation of one runs even when the owning plugin has none.

Who may implement what
----------------------
Any plugin may implement any hook. A *method plugin* implements them for the adapters of the methods it
declares, and is never called about another method's adapters. An *extension* (declares no method) is
called about every adapter and usually wraps (``wrapper=True``) rather than answers.

Plugins publish hooks of their own
----------------------------------
A plugin may add hook specifications from :func:`add_hookspecs`, as pytest plugins do from
``pytest_addhooks``: LoRA publishes ``lora_make_layer`` (:mod:`peft_lora.hookspecs`), through which an
extension teaches LoRA a new layer type. Such hooks are called through
:attr:`peft_core.registry.Registry.hook` (``get_registry().hook.lora_make_layer(...)``) and reach every
plugin that implements them; they are documented to the standard of this module.

Shared arguments
----------------
- ``model``: the user's base ``torch.nn.Module`` (adapted in place; never copied).
- ``adapter_name``: the adapter the call is about (``"default"`` unless the user named it).
- ``config``: that adapter's config, an instance of the method's ``config_cls``.
- ``runtime``: the :class:`~peft_core.runtime.AdapterRuntime` of the wrapping model; layers keep a
  reference and read ``runtime.active`` / ``runtime.disabled`` / ``runtime.routing()`` at forward time.
- ``store``: an ``nn.ModuleDict`` owned by the wrapping model, for modules that are not layers of the
  base model (prompt embeddings, say). Put them under ``store[adapter_name]``.

State-dict namespace
--------------------
``state_dict_filter`` receives, and ``state_dict_load`` returns, keys in the wrapping model's
namespace: ``base_model.<path in the user's model>`` and ``adapter_modules.<adapter>.<...>`` for the
store (see :mod:`peft_core.compat`). Keys on disk are Hugging Face PEFT's.

Errors
------
If a hook raises during ``inject``, the core restores the model to how it was before the call. An
exception raised by plugin code is re-raised as :class:`~peft_core.errors.PluginError` naming the plugin
whose code raised (an extension's wrapper, not the method it wrapped) and its distribution; peft-core's
own errors pass unchanged. Exceptions of the forward pass (``prepare_inputs``: the user's model or torch,
out-of-memory, ``KeyboardInterrupt``) reach the caller as themselves, with a note naming the plugin.

What ``inject`` may create, and what the core does with it
---------------------------------------------------------
``inject`` may replace modules of the base model by layers of its own and put modules in
``store[adapter_name]``. Layers declare what they hold through the :class:`~peft_core.layers.AdapterLayer`
protocol; everything under ``store[adapter_name]`` belongs to the adapter and trains. The core derives
from those declarations which parameters the adapter owns (trainable while it is active), which base
parameters it trains (``trained_base_parameters``), and whether mixed batches can be routed. A parameter
that ``inject`` creates and no layer declares is a :class:`~peft_core.errors.PluginContractError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .config import PeftConfig
    from .runtime import AdapterRuntime
    from .spec import MethodSpec

__all__ = ["PROJECT", "hookimpl", "hookspec"]  # the hook functions are the contract, not exported names

PROJECT = "peft_core"
hookspec = pluggy.HookspecMarker(PROJECT)
#: Mark a plugin's hook functions with this (``from peft_core import hookimpl``).
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def declare_methods() -> Sequence[MethodSpec]:
    """Declare the method(s) this plugin provides.

    When: once, as the registry registers the plugin (at entry-point discovery, or
    ``registry.register(...)`` in tests). Not firstresult: the registry calls each plugin on its own.

    Returns: a sequence of :class:`~peft_core.MethodSpec`. A plugin that returns an empty sequence (or
    does not implement this hook) is an *extension*: it may wrap other plugins' hooks but owns no method.
    Two distributions declaring the same ``name`` is an error naming both.

    Example::

        @hookimpl
        def declare_methods():
            return [MethodSpec(name="IA3", config_cls=IA3Config, task_types=list(TaskType),
                               mergeable=True, summary="learned rescaling vectors")]
    """


@hookspec
def add_hookspecs(pluginmanager: pluggy.PluginManager) -> None:
    """Publish this plugin's own hook specifications (pytest's ``pytest_addhooks``).

    When: once, as the registry registers the plugin, before any of the plugin's hooks is validated. Not
    firstresult; the registry calls each plugin on its own. Implementations of the published hooks by
    other plugins may be registered before or after the publisher: they are checked when discovery ends
    (a hook no installed plugin specifies makes its implementer a broken plugin).

    Returns: nothing. Call ``pluginmanager.add_hookspecs(module_or_class)``; mark the specs with
    :data:`hookspec` and document each as this module does.

    Example::

        @hookimpl
        def add_hookspecs(pluginmanager):
            from . import hookspecs
            pluginmanager.add_hookspecs(hookspecs)
    """


@hookspec(firstresult=True)
def complete_config(model: nn.Module, adapter_name: str, config: PeftConfig) -> PeftConfig | None:
    """Fill the fields of ``config`` that depend on the model (layer count, hidden size...).

    When: ``get_peft_model``, ``add_adapter`` and ``load_adapter``, before ``inject``, after the core
    has filled what it knows itself (``base_model_name_or_path``, the task heads in
    ``modules_to_save``). Configs are frozen, so the plugin returns a completed copy
    (``config.replace(...)``), and that copy is what the core stores, passes to every later hook and
    writes to ``adapter_config.json``. The model must not be changed here. A config read from a file
    is usually complete already.

    Returns (firstresult): the completed config, an instance of the method's ``config_cls``; or None
    to keep ``config`` as it is. Raise :class:`~peft_core.errors.ConfigError` when a field cannot be
    derived from the model, naming the field to set.

    Example::

        @hookimpl
        def complete_config(model, config):
            if config.num_layers is None:
                return config.replace(num_layers=model.config.num_hidden_layers)
            return None
    """


@hookspec(firstresult=True)
def inject(model: nn.Module, adapter_name: str, config: PeftConfig, runtime: AdapterRuntime,
           store: nn.ModuleDict) -> Sequence[str] | None:
    """Add adapter ``adapter_name`` to ``model``, in place.

    When: ``get_peft_model`` and ``add_adapter`` / ``load_adapter``, after the core has checked that the
    method supports ``config.task_type`` and that the name is free. Put new parameters in layers that
    implement :class:`~peft_core.layers.AdapterLayer` (or in ``store[adapter_name]``): the core learns from
    their declarations what the adapter owns and trains, handles ``config.modules_to_save`` itself and decides
    ``requires_grad`` (trainable while the adapter is active, unless ``config.inference_mode``), so plugins
    create parameters and nothing more — like the weights they sit beside (dtype, device; the core applies
    ``autocast_adapter_dtype`` and ``low_cpu_mem_usage``). Works on the ``meta`` device: touch no data.
    During ``load_adapter`` ``runtime.filling`` is True: the file then gives every tensor the adapter owns, so
    their random initialisation may be skipped (frozen state the file does not hold must still be made).

    Returns (firstresult): the names of the modules adapted, for messages and reports (may be empty for
    methods that change inputs rather than layers, e.g. prompt tuning). Raise
    :class:`~peft_core.errors.TargetError` when targets match nothing or have an unsupported type.

    Example::

        @hookimpl
        def inject(model, adapter_name, config, runtime):
            names = find_targets(model, config.target_modules, adaptable=is_linear)  # peft_core.targeting
            for n in names:
                layer = model.get_submodule(n)
                if not isinstance(layer, ScaleLayer):  # an AdapterLayer: see peft_core.layers
                    layer = ScaleLayer(layer, runtime)
                    model.set_submodule(n, layer)
                layer.add(adapter_name)
            return names
    """


@hookspec(firstresult=True)
def trained_base_parameters(model: nn.Module, adapter_name: str, config: PeftConfig) -> Sequence[str] | None:
    """Name the parameters of the base model, outside the adapter's layers, that this adapter trains.

    When: right after ``inject`` succeeded. Parameters of the adapter's own layers are declared by the
    layers (:meth:`~peft_core.layers.AdapterLayer.trained_base_parameters`); this hook is for the rest,
    such as LoRA's ``bias="all"`` (every bias of the model). The core makes each one trainable while some
    active, trainable adapter claims it, and frozen once none does; adding, activating or deleting another
    adapter never freezes what an active adapter trains.

    Returns (firstresult): paths in the base model (``"encoder.layer.0.output.LayerNorm.bias"``), or None
    for none. A path that names no parameter is a :class:`~peft_core.errors.PluginContractError`.

    Example::

        @hookimpl
        def trained_base_parameters(model, config):
            if config.bias == "all":
                return [n for n, _ in model.named_parameters() if n.endswith(".bias")]
            return None
    """


@hookspec(firstresult=True)
def state_dict_filter(model: nn.Module, adapter_name: str, config: PeftConfig, store: nn.ModuleDict,
                      state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Select this adapter's tensors from the wrapping model's state dict, renamed to disk keys.

    When: ``save_pretrained`` and ``get_peft_model_state_dict``. ``state_dict`` is the wrapping model's
    (keys ``base_model.<path>`` and ``adapter_modules.<...>``; tensors share storage with the model).

    Returns (firstresult): ``{disk_key: tensor}`` with Hugging Face PEFT's key names, adapter name
    stripped (``base_model.model.<path>.lora_A.weight``, ``prompt_embeddings``). The core adds the
    ``modules_to_save`` keys and writes the file.

    Example::

        @hookimpl
        def state_dict_filter(adapter_name, state_dict):
            tag = f".ia3_l.{adapter_name}"
            return {k.replace("base_model.", "base_model.model.", 1).replace(tag, ".ia3_l"): v
                    for k, v in state_dict.items() if tag in k}
    """


@hookspec(firstresult=True)
def state_dict_load(model: nn.Module, adapter_name: str, config: PeftConfig, store: nn.ModuleDict,
                    state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Translate an adapter file's tensors (disk keys) to keys of the wrapping model — the inverse of
    ``state_dict_filter``.

    When: loading an adapter, after ``inject`` created its (freshly initialised) parameters.
    ``state_dict`` holds the file's tensors minus the ``modules_to_save`` keys the core handles.

    Returns (firstresult): ``{model_key: tensor}``. The core then checks, before copying anything, that
    every key exists and every shape matches (an error lists the first offenders and the count), and
    copies the values in without changing the parameters' dtype or device. A disk key the method does
    not recognise should be passed through unchanged so the core reports it as unexpected.

    Example::

        @hookimpl
        def state_dict_load(adapter_name, state_dict):
            return {k.replace("base_model.model.", "base_model.", 1).replace(".ia3_l", f".ia3_l.{adapter_name}"): v
                    for k, v in state_dict.items()}
    """


@hookspec(firstresult=True)
def merge(model: nn.Module, adapter_name: str, config: PeftConfig, safe: bool) -> bool | None:
    """Fold adapter ``adapter_name`` into the base weights, in place and reversibly.

    When: ``merge_adapter``, ``merge_and_unload``; only for methods declared ``mergeable``. The core
    tracks which adapters are merged and never merges one twice. With ``safe=True`` the method computes
    the merged weights first and raises :class:`~peft_core.errors.MergeError` (model unchanged) if any
    is NaN or Inf. Keep what is needed to make ``unmerge`` restore the weights bit for bit.

    Returns (firstresult): True.

    Example::

        @hookimpl
        def merge(model, adapter_name, safe):
            for layer in my_layers(model):
                layer.merge(adapter_name, safe=safe)
            return True
    """


@hookspec(firstresult=True)
def unmerge(model: nn.Module, adapter_name: str, config: PeftConfig) -> bool | None:
    """Undo ``merge`` of ``adapter_name``, restoring the base weights exactly.

    When: ``unmerge_adapter``, entering ``disable_adapter()`` with merged adapters, ``set_adapter``
    away from a merged adapter, ``delete_adapter`` of a merged adapter. Only called for adapters the
    core merged, and always newest merge first (to unmerge an older adapter the core unmerges the newer
    ones, then merges them again), so restoring saved bits is exact.

    Returns (firstresult): True.

    Example::

        @hookimpl
        def unmerge(model, adapter_name):
            for layer in my_layers(model):
                layer.unmerge(adapter_name)
            return True
    """


@hookspec(firstresult=True)
def remove(model: nn.Module, adapter_name: str, config: PeftConfig, store: nn.ModuleDict) -> bool | None:
    """Take adapter ``adapter_name`` out of the model, putting the original modules back where no other
    adapter remains.

    When: ``delete_adapter`` and ``unload`` (the core unmerges first), and ``merge_and_unload`` (the core
    merges first: the merged weights must stay in the base layers; only the restore data is dropped).
    The core drops ``store[adapter_name]`` itself afterwards.

    Returns (firstresult): True. Not implementing it makes ``delete_adapter`` and ``unload`` raise for
    this method.

    Example::

        @hookimpl
        def remove(model, adapter_name):
            for name, layer in my_layers(model):
                layer.drop(adapter_name)
                if not layer.adapters:
                    model.set_submodule(name, layer.base_layer)
            return True
    """


@hookspec(firstresult=True)
def prepare_inputs(model: nn.Module, adapter_name: str, config: PeftConfig, store: nn.ModuleDict,
                   inputs: dict[str, Any]) -> dict[str, Any] | None:
    """Rewrite the keyword inputs of the base model's forward for an active adapter.

    When: just before every forward of the base model while ``adapter_name`` is active and adapters are
    not disabled — direct calls and each step of ``generate()`` alike (the core installs a forward
    pre-hook). Positional arguments have already been bound to their names. With several active
    adapters the calls are chained in activation order.

    A plugin may run the model itself from here (prompt tuning does, to compute the virtual tokens
    once per batch); that inner forward calls ``prepare_inputs`` again, so guard against re-entry.

    Returns (firstresult): the new inputs dict (for example with ``inputs_embeds`` prefixed by
    virtual tokens, ``attention_mask`` extended and ``labels`` padded with -100), or None to leave
    the inputs as they are.

    Example::

        @hookimpl
        def prepare_inputs(model, adapter_name, store, inputs):
            embeds = model.get_input_embeddings()(inputs.pop("input_ids"))
            prompt = store[adapter_name].weight.expand(embeds.shape[0], -1, -1)
            return {**inputs, "inputs_embeds": torch.cat([prompt, embeds], dim=1)}
    """


@hookspec(firstresult=True)
def convert_for_save(model: nn.Module, adapter_name: str, config: PeftConfig, state_dict: Mapping[str, torch.Tensor],
                     initial_config: PeftConfig, initial_state_dict: Mapping[str, torch.Tensor],
                     ) -> tuple[PeftConfig, dict[str, torch.Tensor]] | None:
    """Rewrite an adapter as it is saved, relative to the adapter as it was first saved — Hugging Face PEFT's
    ``save_pretrained(path_initial_model_for_weight_conversion=...)``, which turns a PiSSA/OLoRA adapter
    (trained on a residual base weight) into a plain one for the original base weights.

    When: ``save_pretrained(..., path_initial_model_for_weight_conversion=folder)``, once per adapter saved,
    before anything is written. ``state_dict`` is the adapter's tensors with disk keys (as
    ``state_dict_filter`` returned them); ``initial_config``/``initial_state_dict`` are what ``folder`` holds
    (the same adapter saved right after its creation). The files in ``folder`` are not changed.

    Returns (firstresult): ``(config, state_dict)`` to write instead; or None when the method has no such
    conversion, which makes the save a ConfigError naming the method (nothing is written). Raise a
    ConfigError for an adapter that cannot be converted (the wrong initialisation, a mismatching folder).

    Example::

        @hookimpl
        def convert_for_save(config, state_dict, initial_state_dict):
            delta = {k: v - initial_state_dict[k] for k, v in state_dict.items()}
            return config.replace(init_weights=True), delta
    """


@hookspec(firstresult=True)
def training_loss_term(model: nn.Module, adapter_name: str, config: PeftConfig, outputs: Any) -> torch.Tensor | None:
    """Add a term to the training loss of a forward's output: a regulariser the method trains with.

    When: after every forward of the wrapping model (``model(...)``, not ``generate``) while the wrapping model
    is in training mode, adapters are not disabled, and the output has a tensor ``loss`` (transformers computes
    it from ``labels``); once per adapter that trains now (active and not ``inference_mode``), in activation
    order. ``outputs`` is the base model's output; the parameters are the adapter's own, so the term's gradient
    reaches them. In eval mode nothing is added, so evaluation losses stay the task's loss.

    Returns (firstresult): a scalar tensor, which the core adds to ``outputs.loss`` (out of place, so autograd
    sees it); or None to add nothing. Anything else is a :class:`~peft_core.errors.PluginContractError`.

    Example::

        @hookimpl
        def training_loss_term(model, adapter_name, config):
            weights = [layer.scale[adapter_name] for layer in my_layers(model, adapter_name)]
            return config.decay * sum(w.pow(2).sum() for w in weights)
    """


@hookspec(firstresult=True)
def on_optimizer_step(model: nn.Module, adapter_name: str, config: PeftConfig, global_step: int) -> PeftConfig | None:
    """Act on the adapter once per optimiser step: schedules that read gradients or reshape the adapter as it
    trains (AdaLoRA's rank allocation, which reads each weight's gradient and masks the least important ranks).

    When: ``model.on_optimizer_step(global_step)``, which the training loop calls after ``optimizer.step()`` and
    before the gradients are zeroed, so ``p.grad`` still holds this step's gradients and ``p`` the updated
    values. :class:`~peft_core.integrations.transformers.AdapterTrainer` calls it from a
    ``TrainerCallback.on_optimizer_step``; a plain loop or Accelerate calls it itself. ``global_step`` is the
    0-based index of the step just taken (the Trainer's ``state.global_step`` at that moment). Called for every
    adapter of the model whose method implements it, in the order they were added, active or not: a method
    that only acts on trained adapters checks ``config.inference_mode`` itself. Runs under
    ``torch.no_grad()``.

    Returns (firstresult): the adapter's updated config, an instance of the method's ``config_cls`` made with
    ``config.replace(...)``, which the core keeps from then on (later hooks get it, ``save_pretrained`` writes
    it: AdaLoRA records its ``rank_pattern`` so); or None to keep the config as it is.

    Example::

        @hookimpl
        def on_optimizer_step(model, adapter_name, config, global_step):
            if config.inference_mode or global_step % config.interval:
                return None
            for layer in my_layers(model, adapter_name):
                layer.prune(adapter_name)
            return config.replace(pruned_at=global_step)
    """


@hookspec(firstresult=True)
def prepare_hotswap(model: nn.Module, adapter_name: str, config: PeftConfig,
                    target_rank: int | None) -> PeftConfig | None:
    """Make the adapter hot-swappable under ``torch.compile``: take out of it what a swap would change and a
    compiled graph would be specialised on (tensor shapes that depend on a rank, Python numbers such as a scaling).

    When: ``peft_core.prepare_model_for_compiled_hotswap(model, target_rank=...)``, once per adapter of the model,
    after the first adapter is loaded and before the model is compiled. ``target_rank`` is the largest rank the
    adapters to be swapped in will have (None: keep the shapes). Changes must keep the outputs exactly as they
    were (zero padding, a float held as a tensor of the same value).

    Returns (firstresult): the adapter's config (unchanged, or updated with ``config.replace``), which the core
    keeps; or None when the method has nothing to prepare for this adapter. The core raises a ConfigError when no
    adapter of the model answered.

    Example::

        @hookimpl
        def prepare_hotswap(model, adapter_name, config, target_rank):
            for layer in my_layers(model, adapter_name):
                layer.scale_tensor[adapter_name] = torch.tensor(layer.scale[adapter_name])
            return config
    """


@hookspec(firstresult=True)
def hotswap(model: nn.Module, adapter_name: str, config: PeftConfig, new_config: PeftConfig,
            state_dict: Mapping[str, torch.Tensor]) -> PeftConfig | None:
    """Replace the adapter's weights by another adapter's of the same method, in place: every parameter object
    stays, so a compiled graph runs on without recompiling and an optimiser's references stay valid.

    When: ``peft_core.hotswap_adapter(model, path, adapter_name)``. The core has loaded ``new_config`` (the same
    method as ``config``) and the file's tensors, mapped to in-model names by ``state_dict_load``, and checked that
    they name only tensors this adapter owns; the adapter is not merged. The adapter's ``modules_to_save`` copies
    are not in ``state_dict``: the core swaps them itself, after this hook. The hook checks that the two adapters
    are compatible (raising a ConfigError or CheckpointError that names the difference *before* changing
    anything), then copies the values and updates what depends on the config (a scaling). Tensors the file lacks
    are the method's to handle (LoRA zeroes a layer the new adapter does not target).

    Returns (firstresult): the adapter's config from now on (normally ``new_config``), which the core keeps and
    ``save_pretrained`` writes; None when the method cannot hot-swap (the core then raises a ConfigError naming
    the method).

    Example::

        @hookimpl
        def hotswap(model, adapter_name, config, new_config, state_dict):
            if new_config.kind != config.kind:
                raise ConfigError(f"cannot hot-swap: kind {config.kind!r} vs {new_config.kind!r}")
            params = dict(model.named_parameters(prefix="base_model"))
            with torch.no_grad():
                for key, value in state_dict.items():
                    params[key].copy_(value)
            return new_config
    """
