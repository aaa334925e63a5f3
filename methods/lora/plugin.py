"""The LoRA method plugin: the hook implementations that connect LoRA layers to peft-core."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

import pluggy
import torch
from peft_core import MethodSpec, PeftConfig, TaskType, get_registry, hookimpl
from peft_core.compat import DISK_MODEL_PREFIX, MODEL_PREFIX, disk_to_model_key, model_to_disk_key
from peft_core.errors import MergeError, TargetError
from peft_core.merging import check_finite
from peft_core.runtime import AdapterRuntime
from torch import nn

from . import hookspecs, tokens
from .config import LoraConfig
from .dora import DORA_LAYOUT, Dora
from .fused import link_siblings
from .hotswap import prepare as prepare_for_hotswap
from .hotswap import swap, trim_for_save
from .init import check as check_init
from .layers import LoraLayer, builtin_layer, supported_base
from .mha import check_attention_targets
from .operations import add_weighted_adapter
from .parameters import inject_parameters, module_targets, plan_parameters, skip_default_targets
from .replication import replicate_layers
from .targeting import DEFAULT_TARGETS, find_targets, rank_and_alpha
from .variant import LoraVariant, check_claims

__all__ = ["LoraPlugin", "plugin"]

_EMB = re.compile(r"\.(lora_embedding_A|lora_embedding_B)\.([^.]+)$")
_DISK_PARAM = re.compile(r"\.(lora_A|lora_B)\.(weight|bias)$")
_DISK_EMB = re.compile(r"\.(lora_embedding_A|lora_embedding_B)$")
_DORA = Dora()


@functools.cache
def _with_variants(attrs: tuple[str, ...]) -> tuple[re.Pattern[str], re.Pattern[str]]:
    names = "|".join(map(re.escape, ("lora_magnitude_vector", *attrs)))
    return re.compile(rf"\.(lora_A|lora_B|{names})\.([^.]+)\.(weight|bias)$"), re.compile(rf"\.({names})$")


def _variant_keys(model: nn.Module) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """The model-key pattern of A, B and the variants' tensors, and the disk-key pattern of the variants' tensors,
    for the variants in ``model``: a variant module's ``weight`` (DoRA's magnitude, a plugin's KaSA ``lora_diag``)
    is ``<attr>.<adapter>.weight`` in the model and ``<path>.<attr>`` on disk (PEFT's keys)."""
    attrs = {v.attr for m in model.modules() if isinstance(m, LoraLayer) for v in m.variants.values()}
    return _with_variants(tuple(sorted(attrs - {"lora_magnitude_vector"})))


def _refuse_tied_merge(model: nn.Module, layers: list[tuple[str, LoraLayer]], adapter_name: str) -> None:
    """MergeError, before anything is folded, when a layer's base weight is also another module's (tied
    embeddings: BART's shared/encoder/decoder tables and lm_head, GPT-2's wte and lm_head): folding the update
    into it would change those modules too (or fold it twice), so merged would not equal unmerged."""
    holders: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, LoraLayer):
            continue
        for p in module._parameters.values():
            if p is not None:
                holders.setdefault(id(p), []).append(path)
    for path, layer in layers:
        folded = [layer.merge_target]
        if layer.lora_bias.get(adapter_name):
            folded.append(layer.base_layer.bias)
        for p in folded:
            if p is not None and len(set(holders.get(id(p), ()))) > 1:
                others = sorted(set(holders[id(p)]) - {f"{path}.base_layer"})
                raise MergeError(f"adapter {adapter_name!r} cannot be merged: {path!r}'s base weight is tied to "
                                 f"{', '.join(repr(o) for o in others[:3])}, so a merge would change those too; keep "
                                 "it unmerged (or untie the weights first)")


def _layers(model: nn.Module, adapter_name: str) -> list[tuple[str, LoraLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.r]


def _unsupported(module: nn.Module, path: str) -> TargetError:
    kind = f"{type(module).__module__}.{type(module).__name__}"
    hint = "Target its linear sub-layers instead, or install a plugin that teaches LoRA this layer type."
    library = type(module).__module__.split(".")[0]
    weight = getattr(module, "weight", None)
    if library == "bitsandbytes" or type(weight).__module__.split(".")[0] == "torchao":
        extra = "bnb" if library == "bitsandbytes" else "torchao"
        hint = ("Quantized layers are taught to LoRA by the lora_quantized extension: "
                f"pip install 'peft-core[{extra}]' (or check that PEFT_CORE_PLUGINS does not exclude lora_quantized).")
    elif isinstance(module, nn.Linear):
        hint = ("Its weight is not a plain floating-point tensor (a quantized layer?): install the plugin that "
                "teaches LoRA this layer type.")
    return TargetError(f"module {path!r} is a {kind}, which no installed plugin teaches LoRA to adapt (built in: "
                       f"torch.nn.Linear, transformers Conv1D, torch.nn.Embedding, torch.nn.Conv1d/2d/3d, "
                       f"torch.nn.MultiheadAttention). {hint}")


def _keep_off_fast_paths(model: nn.Module, layers: Mapping[str, LoraLayer]) -> None:
    """A LoRA layer inside an ``nn.TransformerEncoderLayer`` gets a no-op forward pre-hook: in eval without grad,
    torch runs that block through a fused kernel that reads ``linear1.weight``/``linear2.weight`` (the base
    weights) directly and would skip the adapter silently; the kernel is not used while any submodule has hooks."""
    # one walk for the blocks' paths (not a get_submodule walk per ancestor of every layer: loading an adapter
    # spent more here than in creating its layers); "" is the model itself
    blocks = [name for name, m in model.named_modules() if isinstance(m, nn.TransformerEncoderLayer)]
    if not blocks:
        return
    for path, layer in layers.items():
        if layer.__dict__.get("_fast_path_guard") is not None:
            continue
        if any(not b or path.startswith(b + ".") for b in blocks):
            layer.__dict__["_fast_path_guard"] = layer.register_forward_pre_hook(_no_op_pre_hook)


def _no_op_pre_hook(module: nn.Module, args: tuple[object, ...]) -> None:
    return None


class LoraPlugin:
    """LoRA (Hu et al., 2021) and DoRA on Linear, Conv1D, Embedding, Conv1d/2d/3d, MultiheadAttention layers and on
    nn.Parameters (target_parameters), with trainable tokens."""

    @hookimpl
    def declare_methods(self) -> list[MethodSpec]:
        return [MethodSpec(name="LORA", config_cls=LoraConfig, task_types=list(TaskType), mergeable=True,
                           summary="Low-rank adaptation: trains A (r x in) and B (out x r) beside frozen layers",
                           operations={"add_weighted_adapter": add_weighted_adapter})]

    @hookimpl
    def add_hookspecs(self, pluginmanager: pluggy.PluginManager) -> None:
        pluginmanager.add_hookspecs(hookspecs)

    @hookimpl(trylast=True)  # extensions that know a layer type better answer first
    def lora_make_layer(self, module: nn.Module, runtime: AdapterRuntime) -> LoraLayer | None:
        return builtin_layer(module, runtime)

    @hookimpl(trylast=True)  # a third party's variant answers first for the adapters it claims
    def lora_variant(self, config: LoraConfig, layer: LoraLayer, path: str) -> LoraVariant | None:
        if not config.use_dora:
            return None
        if not layer.supports_dora or not all(callable(getattr(layer, m, None)) for m in DORA_LAYOUT):
            why = ("its base weight is packed/quantized and the layer does not say it supports DoRA"
                   if not layer.supports_dora else "it does not implement peft_lora.dora.DoraLayout")
            raise TargetError(f"use_dora=True: module {path!r} is a {type(layer).__name__}, which has no DoRA ({why}); "
                              "exclude it with exclude_modules or train it without DoRA")
        if getattr(layer.base_layer, "groups", 1) != 1:
            raise TargetError(f"use_dora=True: module {path!r} is a grouped convolution "
                              f"(groups={layer.base_layer.groups}), which DoRA does not support (nor does Hugging "
                              "Face PEFT); exclude it with exclude_modules")
        return _DORA

    @hookimpl
    def complete_config(self, model: nn.Module, config: LoraConfig) -> LoraConfig | None:
        """Write what the adapter really targets, as Hugging Face PEFT does, so that PEFT loads the file
        without guessing or warning: ``target_modules=None`` becomes the architecture's default names (PEFT's
        defaults differ for some architectures, and it has none for others), and ``fan_in_fan_out`` says
        how the targeted layers store their weights (True for GPT-2's Conv1D, False for nn.Linear; this
        plugin reads the layout from the layer type, so the flag only matters to PEFT)."""
        changes: dict[str, object] = {}
        if config.target_modules is None and not skip_default_targets(model, config):
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            if model_type in DEFAULT_TARGETS:
                changes["target_modules"] = DEFAULT_TARGETS[model_type]
        try:
            targets = find_targets(model, config.replace(**changes) if changes else config)
        except TargetError:
            targets = []  # inject reports it, with the model left untouched
        kinds = {supported_base(model.get_submodule(t)) for t in targets} & {"linear", "conv1d"}
        if len(kinds) == 1 and config.fan_in_fan_out != (kinds == {"conv1d"}):
            changes["fan_in_fan_out"] = kinds == {"conv1d"}
        return config.replace(**changes) if changes else None

    @hookimpl
    def inject(self, model: nn.Module, adapter_name: str, config: LoraConfig,
               runtime: AdapterRuntime) -> list[str]:
        if not config.layer_replication:
            return self._inject(model, adapter_name, config, runtime)
        # the stack is rebuilt first (the targets are the copies' layers); the core's snapshot undoes the module
        # changes of a failure, and the config values changed here are put back by hand
        hf_config = getattr(model, "config", None)
        saved = {k: getattr(hf_config, k) for k in ("num_hidden_layers", "layer_types") if hasattr(hf_config, k)}
        try:
            replicate_layers(model, config.layer_replication)
            return self._inject(model, adapter_name, config, runtime)
        except BaseException:
            for k, v in saved.items():
                setattr(hf_config, k, v)
            raise

    def _inject(self, model: nn.Module, adapter_name: str, config: LoraConfig,
                runtime: AdapterRuntime) -> list[str]:
        targets = module_targets(model, config)
        check_attention_targets(model, targets, config.lora_dropout)  # warnings only (PEFT accepts these silently)
        # target_parameters: checked before anything changes, injected after the modules (PEFT's order)
        planned = plan_parameters(model, adapter_name, config, targets)
        token_plans = tokens.plan_trainable_tokens(model, config, targets)  # checked before any change
        # a layer for every target before changing anything: an unsupported one leaves the model untouched
        make = get_registry().hook.lora_make_layer
        layers: dict[str, LoraLayer] = {}
        variants: dict[str, LoraVariant | None] = {}
        for path in targets:
            module = model.get_submodule(path)
            layer = module if isinstance(module, LoraLayer) else make(module=module, path=path, runtime=runtime,
                                                                      config=config)
            if layer is None:
                raise _unsupported(module, path)
            if not isinstance(layer, LoraLayer) or (layer is not module and layer.base_layer is not module):
                raise TargetError(f"lora_make_layer returned {type(layer).__name__} for {path!r}; the hook contract "
                                  "expects a peft_lora.LoraLayer whose base_layer is the module")
            layers[path] = layer
            variants[path] = get_registry().hook.lora_variant(config=config, layer=layer, path=path)
            if config.lora_bias and not layer.supports_lora_bias:
                raise TargetError(f"lora_bias=True: module {path!r} is a {type(layer).__name__}, whose lora_B cannot "
                                  "carry a bias (an nn.Embedding; PEFT refuses it too): exclude it from "
                                  "target_modules, or train without lora_bias")
            if "init_lora_weights" not in getattr(variants[path], "claims", ()):  # else the variant initialises
                check_init(layer, config.init_lora_weights, rank_and_alpha(config, path)[0])
        check_claims(config, variants)  # a variant field no chosen variant implements: refused, model untouched
        for path, layer in layers.items():
            r, alpha = rank_and_alpha(config, path)
            layer.add(adapter_name, r, alpha, config.lora_dropout, config.use_rslora, config.init_lora_weights,
                      trains_bias=config.bias != "none", variant=variants[path], lora_bias=config.lora_bias)
            if model.get_submodule(path) is not layer:
                model.set_submodule(path, layer)
        _keep_off_fast_paths(model, layers)
        link_siblings(model)
        if planned:
            targets += [p for p in inject_parameters(model, adapter_name, config, runtime, planned) if p not in targets]
        tokens.apply_trainable_tokens(model, adapter_name, token_plans, runtime)
        return targets

    @hookimpl
    def trained_base_parameters(self, model: nn.Module, config: LoraConfig) -> list[str] | None:
        """``bias="all"`` trains every bias of the model (``"lora_only"``: the adapted layers' biases, which
        the layers declare themselves)."""
        if config.bias != "all":
            return None
        return [n for n, _ in model.named_parameters() if n.endswith("bias") and ".lora_" not in n
                and ".modules_to_save." not in n and ".original_module." not in n]

    @hookimpl
    def state_dict_filter(self, model: nn.Module, adapter_name: str, config: LoraConfig,
                          state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        param_key = _variant_keys(model)[0]
        out: dict[str, torch.Tensor] = {}
        lora_paths = set()
        for key, value in state_dict.items():
            if not key.startswith(MODEL_PREFIX):
                continue
            m = param_key.search(key) or _EMB.search(key)
            if m is None:
                continue
            if m.group(2) != adapter_name:
                continue
            stem = key[: m.start()]
            lora_paths.add(stem)
            # on disk the adapter name is dropped, and so is a variant's ".weight" (DoRA's: PEFT's historical key)
            keep_suffix = m.re is param_key and m.group(1) in ("lora_A", "lora_B")
            if m.re is param_key and not keep_suffix and m.group(3) != "weight":
                continue  # a variant module's tensors other than its weight have no key in PEFT's format
            suffix = f".{m.group(1)}.{m.group(3)}" if keep_suffix else f".{m.group(1)}"
            out[model_to_disk_key(stem + suffix)] = trim_for_save(model, adapter_name, config, key, value)
        if config.bias != "none":
            for key, value in state_dict.items():
                if not key.startswith(MODEL_PREFIX) or not key.endswith("bias") or ".lora_" in key:
                    continue
                if ".modules_to_save." in key or ".original_module." in key:
                    continue
                if config.bias == "all" or key[: -len(".base_layer.bias")] in lora_paths:
                    out[model_to_disk_key(key)] = value
        out.update(tokens.token_state_dict(adapter_name, state_dict))
        return out

    @hookimpl
    def prepare_hotswap(self, model: nn.Module, adapter_name: str, config: LoraConfig,
                        target_rank: int | None) -> LoraConfig | None:
        # the config keeps the adapter's true rank: the padding is trimmed when saving
        return config if prepare_for_hotswap(model, adapter_name, target_rank) else None

    @hookimpl
    def hotswap(self, model: nn.Module, adapter_name: str, config: LoraConfig, new_config: LoraConfig,
                state_dict: Mapping[str, torch.Tensor]) -> LoraConfig:
        return swap(model, adapter_name, config, new_config, state_dict)

    @hookimpl
    def state_dict_load(self, model: nn.Module, adapter_name: str,
                        state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        disk_variant = _variant_keys(model)[1]  # inject made the adapter's layers: their variants are known
        out: dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            model_key = disk_to_model_key(key)
            if key.startswith(DISK_MODEL_PREFIX):
                m = _DISK_PARAM.search(model_key)
                if m is not None:
                    model_key = f"{model_key[: m.start()]}.{m.group(1)}.{adapter_name}.{m.group(2)}"
                else:
                    m = _DISK_EMB.search(model_key)
                    if m is not None:
                        model_key = f"{model_key[: m.start()]}.{m.group(1)}.{adapter_name}"
                    m = disk_variant.search(model_key)
                    if m is not None:
                        model_key = f"{model_key[: m.start()]}.{m.group(1)}.{adapter_name}.weight"
            if ".modules_to_save." in model_key:
                # PEFT's bias="all" files repeat a modules_to_save copy's bias as <path>.modules_to_save.bias
                # (adapter name stripped); the core has taken the copy's own keys out already
                model_key = model_key.replace(".modules_to_save.", f".modules_to_save.{adapter_name}.", 1)
            out[model_key] = value
        return tokens.map_token_keys(out, adapter_name)

    @hookimpl
    def convert_for_save(self, adapter_name: str, config: LoraConfig, state_dict: Mapping[str, torch.Tensor],
                         initial_config: PeftConfig, initial_state_dict: Mapping[str, torch.Tensor],
                         ) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
        """A PiSSA/OLoRA adapter as a plain LoRA for the *original* base weights: trained on ``W_res = W - s B0 A0``,
        it computes ``W_res + s B A = W + s (B A - B0 A0)``, which is the LoRA ``A' = [A; A0]``, ``B' = [B, -B0]``
        of rank 2r, with alpha doubled (x sqrt 2 under rsLoRA) so the scaling is unchanged (as PEFT writes it)."""
        from .conversion import to_plain_lora

        return to_plain_lora(adapter_name, config, state_dict, initial_config, initial_state_dict)

    @hookimpl
    def merge(self, model: nn.Module, adapter_name: str, config: LoraConfig, safe: bool) -> bool:
        if config.layer_replication:
            raise MergeError(f"adapter {adapter_name!r} uses layer_replication: its layers' copies share their base "
                             "weights, so a merge into one would reach every copy (PEFT refuses too); keep it unmerged")
        token_sources = tokens.check_token_merge(model, adapter_name, safe)  # raises before anything is folded
        layers = _layers(model, adapter_name)
        _refuse_tied_merge(model, layers, adapter_name)
        if safe:  # check everything before folding anything
            for path, layer in layers:
                check_finite(layer.merged_weight(adapter_name), adapter_name, path)
        done = []
        try:
            for _, layer in layers:
                if adapter_name not in layer._restore:  # not merged yet: this call folds it
                    layer.merge(adapter_name, safe=False)
                    done.append(layer)
        except BaseException:  # e.g. a layer on the meta device midway: unfold what was folded, exactly
            for layer in reversed(done):
                layer.unmerge(adapter_name)
            raise
        try:  # trainable tokens never share a weight with a LoRA layer (refused at inject): the order is free
            tokens.merge_tokens(token_sources, adapter_name)
        except BaseException:
            self.unmerge(model, adapter_name)
            raise
        return True

    @hookimpl
    def unmerge(self, model: nn.Module, adapter_name: str) -> bool:
        tokens.unmerge_tokens(model, adapter_name)
        for _, layer in _layers(model, adapter_name):
            layer.unmerge(adapter_name)
        return True

    @hookimpl
    def remove(self, model: nn.Module, adapter_name: str) -> bool:
        # innermost first: an emptied LoraParameter nested in another is unwrapped at its own path
        for path, layer in reversed(_layers(model, adapter_name)):
            layer.forget_merge(adapter_name)
            layer.drop(adapter_name)
            if not layer.r:
                model.set_submodule(path, layer.base_layer)
        tokens.remove_tokens(model, adapter_name)
        return True




plugin = LoraPlugin()
