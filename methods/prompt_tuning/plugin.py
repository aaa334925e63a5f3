"""The prompt-tuning method plugin: the hook implementations that connect PromptEmbedding to peft-core.

How the prompt reaches the model (``prepare_inputs``, called before every forward of the base model):

- decoder-only and encoder-only models: on the first forward of a sequence (empty KV cache) the input
  ids become ``inputs_embeds`` with the virtual tokens in front; the padding mask gets ``n`` leading
  ones, ``labels`` ``n`` leading -100 (token-level tasks), ``token_type_ids`` ``n`` leading zeros, and
  caller-given ``position_ids`` give the virtual tokens ``0..n-1`` and move the rest up by ``n``. Later
  forwards of the same sequence (``generate()`` steps) find the prompt in the cache and only get the
  mask and positions moved;
- encoder-decoder models: a pre-hook on the encoder puts the prompt in front of the encoder's input
  (``generate()`` runs the encoder outside the model's forward); ``prepare_inputs`` extends the mask that
  the decoder's cross-attention uses. The decoder side is unchanged, as in Hugging Face PEFT.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from peft_core import MethodSpec, TaskType, hookimpl
from peft_core.compat import STORE_PREFIX
from peft_core.errors import ConfigError, TargetError
from peft_core.runtime import AdapterRuntime
from peft_core.virtual_tokens import (
    cached_length,
    check_virtual_token_call,
    extend_attention_mask,
    model_sizes,
    shift_position_ids,
)
from torch import nn

from .config import PromptTuningConfig
from .embedding import PromptEmbedding, initial_token_ids

__all__ = ["DISK_KEY", "PromptTuningPlugin", "plugin"]

#: The tensor's name in Hugging Face PEFT's adapter file.
DISK_KEY = "prompt_embeddings"
_TASKS = [TaskType.CAUSAL_LM, TaskType.SEQ_2_SEQ_LM, TaskType.SEQ_CLS, TaskType.TOKEN_CLS,
          TaskType.FEATURE_EXTRACTION]
#: Tasks whose labels are one per sequence, not one per token (never padded).
_SEQUENCE_LABELS = {TaskType.SEQ_CLS}


def _input_embeddings(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TargetError(f"prompt tuning needs the token embedding of {type(model).__name__} "
                          "(model.get_input_embeddings() returning an nn.Embedding-like module with a 2D weight); "
                          "it has none")
    return emb


def _adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    # train the prompt in float32 next to half-precision models (as PEFT does); cast per forward
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _key(adapter_name: str) -> str:
    return f"{STORE_PREFIX}{adapter_name}.embedding.weight"


class PromptTuningPlugin:
    """Prompt tuning (Lester et al., 2021): learned virtual tokens in front of the input."""

    @hookimpl
    def declare_methods(self) -> list[MethodSpec]:
        return [MethodSpec(name="PROMPT_TUNING", config_cls=PromptTuningConfig, task_types=_TASKS, mergeable=False,
                           summary="Prompt tuning: learned virtual-token embeddings in front of the input",
                           disk_model_prefix="base_model.")]

    @hookimpl
    def complete_config(self, model: nn.Module, config: PromptTuningConfig) -> PromptTuningConfig:
        sizes = model_sizes(model)
        changes: dict[str, Any] = {}
        if config.token_dim is None:
            # the prompt sits among the input embeddings: their width is what counts
            dim = sizes.embedding_dim or sizes.hidden_size
            if dim is None:
                raise ConfigError(f"PromptTuningConfig.token_dim: {type(model).__name__} has neither an input "
                                  "embedding nor a hidden_size in its config; set token_dim")
            changes["token_dim"] = dim
        if config.num_layers is None and sizes.num_layers is not None:
            changes["num_layers"] = sizes.num_layers
        if config.num_attention_heads is None and sizes.num_attention_heads is not None:
            changes["num_attention_heads"] = sizes.num_attention_heads
        if config.num_transformer_submodules is None:
            changes["num_transformer_submodules"] = 2 if config.task_type == TaskType.SEQ_2_SEQ_LM else 1
        return config.replace(**changes) if changes else config

    @hookimpl
    def inject(self, model: nn.Module, adapter_name: str, config: PromptTuningConfig, runtime: AdapterRuntime,
               store: nn.ModuleDict) -> list[str]:
        emb = _input_embeddings(model)
        weight = emb.weight
        if weight.shape[1] != config.token_dim:
            raise ConfigError(f"PromptTuningConfig.token_dim={config.token_dim} but the input embeddings of "
                              f"{type(model).__name__} are {weight.shape[1]} wide; leave token_dim unset")
        sizes = model_sizes(model)
        module = PromptEmbedding(adapter_name, config, runtime, sizes.is_encoder_decoder, weight.device,
                                 _adapter_dtype(weight.dtype))
        if not config.inference_mode and not weight.is_meta:  # a loaded adapter overwrites the start anyway
            rows = module.embedding.num_embeddings
            ids = initial_token_ids(config, rows, sizes.vocab_size or weight.shape[0])
            if ids is not None:
                with torch.no_grad():
                    module.embedding.weight.copy_(emb(ids.to(weight.device)).detach())
        if sizes.is_encoder_decoder:
            module.attach_to_encoder(model.get_encoder())
        store[adapter_name] = module
        return []  # no layer of the model is replaced

    @hookimpl
    def state_dict_filter(self, adapter_name: str,
                          state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {DISK_KEY: state_dict[_key(adapter_name)]}

    @hookimpl
    def state_dict_load(self, adapter_name: str,
                        state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # unknown keys pass through so that the core reports them as unexpected
        return {(_key(adapter_name) if k == DISK_KEY else k): v for k, v in state_dict.items()}

    @hookimpl
    def remove(self, adapter_name: str, store: nn.ModuleDict) -> bool:
        module = store[adapter_name] if adapter_name in store else None
        if isinstance(module, PromptEmbedding):
            module.detach_from_encoder()
        return True

    @hookimpl
    def prepare_inputs(self, model: nn.Module, adapter_name: str, config: PromptTuningConfig, store: nn.ModuleDict,
                       inputs: dict[str, Any]) -> dict[str, Any] | None:
        module: PromptEmbedding = store[adapter_name]
        check_virtual_token_call(module, store, module._runtime, "prompt-tuning")
        if module.encoder_decoder:
            return _cross_attention_mask(module, inputs)
        return _prompt_inputs(model, module, config, inputs)


def _cross_attention_mask(module: PromptEmbedding, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """Encoder-decoder models: the encoder hook adds the prompt; the encoder mask (also the decoder's
    cross-attention mask) must cover it too."""
    mask = inputs.get("attention_mask")
    if mask is None:
        return None
    n = module.num_virtual_tokens
    encoded = inputs.get("encoder_outputs")
    if encoded is not None:  # generate() steps: the encoder already ran, prompt included
        total = encoded[0].shape[1]
    else:
        x = inputs.get("input_ids")
        x = inputs.get("inputs_embeds") if x is None else x
        if x is None:
            return None
        total = n + x.shape[1]
    inputs["attention_mask"] = extend_attention_mask(mask, n, total)
    return inputs


def _prompt_inputs(model: nn.Module, module: PromptEmbedding, config: PromptTuningConfig,
                   inputs: dict[str, Any]) -> dict[str, Any] | None:
    n = module.num_virtual_tokens
    ids = inputs.get("input_ids")
    embeds = inputs.get("inputs_embeds")
    x = ids if embeds is None else embeds
    if x is None:
        return None  # nothing to prompt; the model reports the missing input itself
    cache = inputs.get("cache", inputs.get("past_key_values"))
    past = cached_length(cache)
    first = past == 0  # the prompt is not in the cache yet: it enters with this call's tokens
    total = past + x.shape[1] + (n if first else 0)
    mask = inputs.get("attention_mask")
    # a mask over all `total` positions means the caller already counts the virtual tokens
    counted = isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] == total
    if mask is not None:
        inputs["attention_mask"] = extend_attention_mask(mask, n, total)
    if not counted and inputs.get("position_ids") is not None:
        inputs["position_ids"] = shift_position_ids(inputs["position_ids"], n, prepend=first)
    if not first:
        return inputs
    if embeds is None:
        embeds = model.get_input_embeddings()(inputs.pop("input_ids"))
    else:
        inputs.pop("input_ids", None)
    inputs["inputs_embeds"] = module.prepend(embeds)
    batch = embeds.shape[0]
    token_types = inputs.get("token_type_ids")
    if token_types is not None:
        inputs["token_type_ids"] = torch.cat([token_types.new_zeros((batch, n)), token_types], dim=1)
    labels = inputs.get("labels")
    if (isinstance(labels, torch.Tensor) and labels.dim() >= 2 and labels.shape[1] == embeds.shape[1]
            and config.task_type not in _SEQUENCE_LABELS):
        # no loss on the virtual tokens: -100 is the ignore index of transformers' losses
        inputs["labels"] = torch.cat([labels.new_full((batch, n, *labels.shape[2:]), -100), labels], dim=1)
    return inputs


plugin = PromptTuningPlugin()
