"""The prefix-tuning method plugin: the hook implementations that connect PrefixEncoder to peft-core.

How the prefix reaches the model (``prepare_inputs``, called before every forward of the base model):
on the first forward of a sequence (empty or no KV cache) the prefix is written into the cache — a
``DynamicCache``, or the self-attention half of an ``EncoderDecoderCache`` for encoder-decoder models —
and the padding mask of the attending side (``attention_mask``, or ``decoder_attention_mask``) gets
``n`` leading ones. Caller-given ``position_ids`` move up by ``n``, as the model's own positions count
from the cache length. Later forwards (``generate()`` steps) find the prefix in the cache and only get
the mask and positions moved. The sequence itself is unchanged, so ``labels`` are too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from peft_core import MethodSpec, TaskType, hookimpl
from peft_core.compat import STORE_PREFIX
from peft_core.errors import AdapterError, CheckpointError, ConfigError, TargetError
from peft_core.runtime import AdapterRuntime
from peft_core.virtual_tokens import (
    ModelSizes,
    cache_argument,
    cached_length,
    check_virtual_token_call,
    extend_attention_mask,
    model_sizes,
    pop_cache,
    shift_position_ids,
)
from torch import nn

from .config import PrefixTuningConfig
from .encoder import OWN_CACHE, PrefixEncoder

__all__ = ["DISK_KEY", "PrefixTuningPlugin", "plugin"]

#: The tensor's name in Hugging Face PEFT's adapter file: the prefix table, projected if need be.
DISK_KEY = "prompt_embeddings"


def _key(adapter_name: str) -> str:
    return f"{STORE_PREFIX}{adapter_name}.embedding.weight"


def _adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    # train the prefix in float32 next to half-precision models (as PEFT does); cast per forward
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _model_dtype(model: nn.Module) -> torch.dtype:
    dtype = getattr(model, "dtype", None)  # transformers models: their first floating parameter's dtype
    if isinstance(dtype, torch.dtype):
        return dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _uses_gradient_checkpointing(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _checkpointing_now(model: nn.Module) -> bool:
    """transformers' own flag (renamed in 5.x; the old name warns), without walking the modules."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


class PrefixTuningPlugin:
    """Prefix tuning (Li & Liang, 2021): learned keys and values in front of every attention layer's."""

    @hookimpl
    def declare_methods(self) -> list[MethodSpec]:
        return [MethodSpec(name="PREFIX_TUNING", config_cls=PrefixTuningConfig, task_types=list(TaskType),
                           mergeable=False,
                           summary="Prefix tuning: learned keys/values in front of every attention layer's, via the KV "
                                   "cache",
                           disk_model_prefix="base_model.")]

    @hookimpl
    def complete_config(self, model: nn.Module, config: PrefixTuningConfig) -> PrefixTuningConfig:
        if config.num_virtual_tokens is None:
            raise ConfigError("PrefixTuningConfig.num_virtual_tokens is not set: give it before get_peft_model "
                              "(it is the number of virtual key/value positions, "
                              "e.g. PrefixTuningConfig(num_virtual_tokens=20, ...) or "
                              "config.replace(num_virtual_tokens=20))")
        sizes = model_sizes(model)
        changes: dict[str, Any] = {}
        name = type(model).__name__
        if config.num_layers is None:
            # encoder-decoder models: the prefix feeds the decoder's self-attention, so its layers count
            layers = sizes.num_decoder_layers or sizes.num_layers
            if layers is None:
                raise ConfigError(f"PrefixTuningConfig.num_layers: {name}'s config has no num_hidden_layers/"
                                  "num_layers/n_layer; set num_layers to the number of attention layers")
            changes["num_layers"] = layers
        if config.token_dim is None or config.num_attention_heads is None:
            heads = config.num_attention_heads or sizes.num_attention_heads
            hidden = sizes.hidden_size
            if heads is None or (config.token_dim is None and hidden is None):
                raise ConfigError(f"PrefixTuningConfig.token_dim/num_attention_heads: {name}'s config does not give "
                                  "hidden_size and num_attention_heads; set both (token_dim = heads * head_dim of "
                                  "the keys)")
            if config.token_dim is None and config.num_attention_heads is None:
                # keys are kv_heads * head_dim wide: grouped-query attention has fewer key-value heads than
                # query heads (PEFT's rule); head_dim from the config when it says, else hidden / heads
                head_dim = sizes.head_dim or hidden // heads
                heads = sizes.num_key_value_heads or heads
                changes["token_dim"] = head_dim * heads
                changes["num_attention_heads"] = heads
            elif config.token_dim is None:
                changes["token_dim"] = hidden
            else:
                changes["num_attention_heads"] = heads
        if config.encoder_hidden_size is None:
            changes["encoder_hidden_size"] = changes.get("token_dim", config.token_dim)
        if config.num_transformer_submodules is None:
            changes["num_transformer_submodules"] = 2 if config.task_type == TaskType.SEQ_2_SEQ_LM else 1
        return config.replace(**changes) if changes else config

    @hookimpl
    def inject(self, model: nn.Module, adapter_name: str, config: PrefixTuningConfig, runtime: AdapterRuntime,
               store: nn.ModuleDict) -> list[str]:
        name = type(model).__name__
        if cache_argument(model) is None:
            raise TargetError(f"{name}.forward takes no `cache` (or `past_key_values`) argument; prefix tuning "
                              "delivers its prefix through the KV cache, so it needs a model that accepts one")
        if config.token_dim % config.num_attention_heads:
            raise ConfigError(f"PrefixTuningConfig.token_dim={config.token_dim} is not a multiple of "
                              f"num_attention_heads={config.num_attention_heads}; token_dim is heads * head_dim")
        sizes = model_sizes(model)
        _check_against_model(config, sizes, name)
        if _uses_gradient_checkpointing(model):
            raise ConfigError(f"{name} has gradient checkpointing on; prefix tuning passes its prefix in the KV "
                              "cache, which checkpointing's recomputation would extend twice. Call "
                              "model.gradient_checkpointing_disable() first")
        reference = next((p for p in model.parameters() if p.is_floating_point()), None)
        device = reference.device if reference is not None else torch.device("cpu")
        dtype = _adapter_dtype(reference.dtype) if reference is not None else torch.float32
        store[adapter_name] = PrefixEncoder(adapter_name, config, runtime, sizes.is_encoder_decoder, device, dtype)
        return []  # no layer of the model is replaced

    @hookimpl
    def state_dict_filter(self, adapter_name: str, store: nn.ModuleDict,
                          state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        module: PrefixEncoder = store[adapter_name]
        if module.transform is None:
            return {DISK_KEY: state_dict[_key(adapter_name)]}
        with torch.no_grad():  # PEFT's file holds the MLP's output, not the MLP
            return {DISK_KEY: module.table().detach()}

    @hookimpl
    def state_dict_load(self, adapter_name: str, store: nn.ModuleDict,
                        state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        module: PrefixEncoder = store[adapter_name]
        if module.transform is not None and DISK_KEY in state_dict:
            raise CheckpointError(
                f"adapter {adapter_name!r}: the file holds the projected prefix ({DISK_KEY}); the MLP of "
                "prefix_projection that produced it is not saved (PEFT's format), so it cannot be trained further "
                "as an MLP. Load it with is_trainable=False, or pass a config with prefix_projection=False to "
                "train the prefix table itself")
        return {(_key(adapter_name) if k == DISK_KEY else k): v for k, v in state_dict.items()}

    @hookimpl
    def remove(self) -> bool:
        return True  # nothing outside the store, which the core drops

    @hookimpl
    def prepare_inputs(self, model: nn.Module, adapter_name: str, store: nn.ModuleDict,
                       inputs: dict[str, Any]) -> dict[str, Any] | None:
        module: PrefixEncoder = store[adapter_name]
        check_virtual_token_call(module, store, module._runtime, "prefix-tuning")
        if model.training and _checkpointing_now(model):
            raise AdapterError(f"{type(model).__name__} trains with gradient checkpointing, which recomputes the "
                               "KV cache that carries the prefix; call model.gradient_checkpointing_disable()")
        n = module.num_virtual_tokens
        if module.encoder_decoder:
            mask_key, position_key = "decoder_attention_mask", "decoder_position_ids"
            # the decoder's length; transformers builds decoder_input_ids from labels when they are missing
            x = next((inputs.get(k) for k in ("decoder_input_ids", "decoder_inputs_embeds", "labels")
                      if inputs.get(k) is not None), None)
        else:
            mask_key, position_key = "attention_mask", "position_ids"
            x = inputs.get("input_ids")
            x = inputs.get("inputs_embeds") if x is None else x
        if x is None:
            return None  # nothing to attend with; the model reports the missing input itself
        cache = pop_cache(inputs)
        if inputs.get("use_cache") is False and getattr(cache, OWN_CACHE, False):
            cache = None  # our own cache from the previous non-caching call: start afresh
        past = cached_length(cache)
        if past == 0:  # the first forward of a sequence: the prefix enters the cache now
            cache = module.fill(cache, model, x.shape[0], _model_dtype(model))
            past = n
        inputs[cache_argument(model) or "cache"] = cache
        total = past + x.shape[1]
        mask = inputs.get(mask_key)
        if mask is not None:
            inputs[mask_key] = extend_attention_mask(mask, n, total, mask_key)
        # a mask over all `total` positions means the caller already counts the virtual positions
        counted = isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] == total
        if not counted and inputs.get(position_key) is not None:
            inputs[position_key] = shift_position_ids(inputs[position_key], n, prepend=False)
        return inputs


def _check_against_model(config: PrefixTuningConfig, sizes: ModelSizes, name: str) -> None:
    """Catch a prefix whose shape the model's attention cannot take, with a message instead of a
    shape error deep in an attention layer."""
    layers = sizes.num_decoder_layers or sizes.num_layers
    if layers is not None and config.num_layers != layers:
        raise ConfigError(f"PrefixTuningConfig.num_layers={config.num_layers} but {name} has {layers} attention "
                          "layers (decoder layers for encoder-decoder models); leave num_layers unset")
    heads = sizes.num_key_value_heads or sizes.num_attention_heads
    head_dim = sizes.head_dim
    if head_dim is None and sizes.hidden_size and sizes.num_attention_heads:
        head_dim = sizes.hidden_size // sizes.num_attention_heads
    if heads is None or head_dim is None:
        return
    got = (config.num_attention_heads, config.token_dim // config.num_attention_heads)
    if got != (heads, head_dim):
        raise ConfigError(f"PrefixTuningConfig gives {got[0]} heads of width {got[1]} (num_attention_heads="
                          f"{config.num_attention_heads}, token_dim={config.token_dim}) but {name}'s keys have "
                          f"{heads} heads of width {head_dim}; leave token_dim and num_attention_heads unset")


plugin = PrefixTuningPlugin()
