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

Causal LMs take a faster road to the same result when it is exact (see "shared-prompt path" below): the
virtual tokens run once per batch instead of once per row.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from peft_core import MethodSpec, TaskType, hookimpl
from peft_core.compat import STORE_PREFIX
from peft_core.errors import ConfigError, TargetError
from peft_core.runtime import AdapterRuntime
from peft_core.virtual_tokens import (
    cache_argument,
    cached_length,
    check_virtual_token_call,
    extend_attention_mask,
    model_sizes,
    pop_cache,
    shift_position_ids,
)
from torch import nn

from .config import PromptTuningConfig
from .embedding import OWN_CACHE, PromptEmbedding, initial_token_ids

__all__ = ["DISK_KEY", "PromptTuningPlugin", "attach_prompt", "plugin"]

#: The tensor's name in Hugging Face PEFT's adapter file.
DISK_KEY = "prompt_embeddings"
_TASKS = [TaskType.CAUSAL_LM, TaskType.SEQ_2_SEQ_LM, TaskType.SEQ_CLS, TaskType.TOKEN_CLS,
          TaskType.FEATURE_EXTRACTION]
#: Tasks whose labels are one per sequence, not one per token (never padded).
_SEQUENCE_LABELS = {TaskType.SEQ_CLS}
#: True while the shared-prompt path runs the model on the virtual tokens: that inner call is left alone.
_IN_PROMPT_PASS: contextvars.ContextVar[bool] = contextvars.ContextVar("peft_prompt_pass", default=False)


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


def attach_prompt(model: nn.Module, module: PromptEmbedding) -> None:
    """Install ``module``'s hooks on ``model``: the encoder pre-hook of encoder-decoder models, or the output
    hook of the shared-prompt path where the model can take it. For subclasses of :class:`PromptEmbedding`
    built by other plugins (P-tuning); ``remove`` of this plugin takes the hooks off again."""
    if model_sizes(model).is_encoder_decoder:
        module.attach_to_encoder(model.get_encoder())
    elif _shareable_model(model):
        module.attach_output_hook(model)


class PromptTuningPlugin:
    """Prompt tuning (Lester et al., 2021): learned virtual tokens in front of the input."""

    @hookimpl
    def declare_methods(self) -> list[MethodSpec]:
        return [MethodSpec(name="PROMPT_TUNING", config_cls=PromptTuningConfig, task_types=_TASKS, mergeable=False,
                           summary="Prompt tuning: learned virtual-token embeddings in front of the input",
                           disk_model_prefix="base_model.")]

    @hookimpl
    def complete_config(self, model: nn.Module, config: PromptTuningConfig) -> PromptTuningConfig:
        if config.num_virtual_tokens is None:
            raise ConfigError("PromptTuningConfig.num_virtual_tokens is not set: give it before get_peft_model "
                              "(it is the number of virtual tokens, "
                              "e.g. PromptTuningConfig(num_virtual_tokens=20, ...) "
                              "or config.replace(num_virtual_tokens=20))")
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
        attach_prompt(model, module)
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
            module.detach_output_hook()
        return True

    @hookimpl
    def prepare_inputs(self, model: nn.Module, adapter_name: str, config: PromptTuningConfig, store: nn.ModuleDict,
                       inputs: dict[str, Any]) -> dict[str, Any] | None:
        # (a compiled graph never runs the prompt pass, see _shared_prompt_inputs, and cannot read a ContextVar)
        if not torch.compiler.is_compiling() and _IN_PROMPT_PASS.get():
            return None
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
    if inputs.get("use_cache") is False and getattr(cache, OWN_CACHE, False):
        pop_cache(inputs)  # our own cache from the previous non-caching call: start afresh
        cache = None
    past = cached_length(cache)
    first = past == 0  # the prompt is not in the cache yet: it enters with this call's tokens
    # compiled graphs take the plain path: the prompt pass flags itself in a ContextVar, which Dynamo cannot trace
    if first and not torch.compiler.is_compiling() and module._output_hook is not None:
        shared = _shared_prompt_inputs(model, module, inputs, cache)
        if shared is not None:
            return shared
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


# ---------------------------------------------------------------------------------- shared-prompt path
# In a causal decoder-only model the virtual tokens (positions 0..n-1, in front of everything) attend
# only to each other, so their hidden states, keys and values are the same in every row of a batch.
# Hugging Face PEFT computes them once per row. Here, on the first forward of a sequence, the model runs
# once on the first n-1 virtual tokens with batch 1; their keys and values, expanded over the batch, go
# into the KV cache, and the batch runs on [last virtual token, own tokens] with labels [-100, labels]:
# exactly the loss terms of the plain path (the last virtual token predicts the first label). The
# virtual positions' logits, also from the batch-1 pass, are put back in front of the output's
# (PromptEmbedding._output_post_hook), so outputs keep their shape. Work saved: (batch - 1) * (n - 1)
# token positions through every layer, forward and backward.
#
# Only where it is exact: no active dropout (it would draw one mask for all rows), no gradient
# checkpointing (it recomputes the cache), a plain DynamicCache, no token_type_ids, no per-layer outputs
# requested. Anything else takes the plain path.


def _shareable_model(model: nn.Module) -> bool:
    """Generative decoder-only transformers models (causal attention) that take a KV cache."""
    can_generate = getattr(model, "can_generate", None)
    try:
        generative = bool(can_generate()) if callable(can_generate) else False
    except Exception:  # a model whose check itself fails is not one to optimise
        generative = False
    return generative and getattr(model, "config", None) is not None and cache_argument(model) is not None


@functools.lru_cache(maxsize=128)
def _takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


_DROPOUT_FIELDS = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob", "hidden_dropout",
                   "resid_pdrop", "embd_pdrop", "dropout")


def _random_in_training(model: nn.Module) -> bool:
    """Dropout or gradient checkpointing active in this (training) forward."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # the old name warns
        if hasattr(type(model), name):
            if getattr(model, name):
                return True
            break
    config = model.config
    if any(isinstance(getattr(config, f, None), float) and getattr(config, f) > 0 for f in _DROPOUT_FIELDS):
        return True
    return any(isinstance(m, nn.Dropout) and m.p > 0 and m.training for m in model.modules())


def _shared_prompt_inputs(model: nn.Module, module: PromptEmbedding, inputs: dict[str, Any],
                          cache: Any) -> dict[str, Any] | None:
    """The inputs for the shared-prompt path, or None where it does not apply (see above)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    n = module.num_virtual_tokens
    ids, embeds = inputs.get("input_ids"), inputs.get("inputs_embeds")
    x = ids if embeds is None else embeds
    batch, length = x.shape[0], x.shape[1]
    keep = inputs.get("logits_to_keep", 0)
    labels, mask, positions = inputs.get("labels"), inputs.get("attention_mask"), inputs.get("position_ids")
    if (n < 2 or batch < 2 or inputs.get("output_attentions") or inputs.get("output_hidden_states")
            or inputs.get("return_dict") is False or inputs.get("token_type_ids") is not None
            or not isinstance(keep, int) or isinstance(keep, bool)
            or (labels is not None and not (isinstance(labels, torch.Tensor) and labels.dim() == 2
                                            and labels.shape[1] == length))
            or (mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2
                                          and mask.shape[1] == length))
            or (positions is not None and positions.dim() != 2)
            or (model.training and _random_in_training(model))):
        return None
    target = cache if cache is not None else DynamicCache(config=model.config)
    if type(target) is not DynamicCache or any(type(layer) is not DynamicLayer for layer in target.layers):
        return None  # sliding-window, static, quantized... caches: the plain path
    if embeds is None:
        embeds = model.get_input_embeddings()(ids)
    prompt = module.prompt().to(embeds.dtype)
    # logits of virtual positions the caller will see: all of them, or those logits_to_keep reaches
    need = n - 1 if keep == 0 else max(0, keep - (length + 1))
    small = DynamicCache(config=model.config)
    cache_arg = cache_argument(model) or "cache"
    call: dict[str, Any] = {"inputs_embeds": prompt[: n - 1].unsqueeze(0), cache_arg: small, "use_cache": True}
    if _takes_logits_to_keep(type(model)):
        call["logits_to_keep"] = max(need, 1)
    token = _IN_PROMPT_PASS.set(True)
    try:
        out = model(**call)
    finally:
        _IN_PROMPT_PASS.reset(token)
    layers = small.layers
    if not layers or any(layer.keys is None or layer.keys.shape[-2] != n - 1 for layer in layers):
        return None  # a layer without its own cache (KV sharing...): the plain path
    for i, layer in enumerate(layers):
        target.update(layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1), i)
    if cache is None:
        setattr(target, OWN_CACHE, True)
    main = torch.cat([prompt[n - 1:].unsqueeze(0).expand(batch, -1, -1), embeds], dim=1)
    pop_cache(inputs)
    inputs.pop("input_ids", None)
    inputs.update({"inputs_embeds": main, cache_arg: target})
    if mask is not None:
        inputs["attention_mask"] = extend_attention_mask(mask, n, n + length)
    if positions is not None:
        inputs["position_ids"] = shift_position_ids(positions, n, prepend=True)[..., n - 1:]
    if labels is not None:
        inputs["labels"] = torch.cat([labels.new_full((batch, 1), -100), labels], dim=1)
    if need:
        module.expect_output(main, out.logits[:, -need:])
    return inputs


plugin = PromptTuningPlugin()
