"""The P-tuning method plugin: PromptEncoder's hooks into peft-core.

P-tuning reaches the model exactly as prompt tuning does (Hugging Face PEFT runs both through the same
code): the prompt goes in front of the input embeddings (of the encoder, for encoder-decoder models), the
mask, positions, ``token_type_ids`` and token-level labels move with it. So this plugin reuses the
prompt-tuning plugin's input handling (``PromptTuningPlugin.prepare_inputs`` and ``remove``, through its
public names) and differs in what the prompt is (:class:`PromptEncoder`) and in what the file holds.

The file (PEFT's format) holds ``prompt_embeddings``: the encoder's output for all rows, not the encoder.
An adapter loaded for inference is that table. Loaded with ``is_trainable=True`` it is refused: PEFT
would run a freshly initialised encoder over the saved output, a silently different prompt.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from peft_core import MethodSpec, TaskType, hookimpl
from peft_core.compat import STORE_PREFIX
from peft_core.errors import CheckpointError, ConfigError, TargetError
from peft_core.runtime import AdapterRuntime
from peft_core.virtual_tokens import model_sizes
from peft_prompt_tuning import PromptTuningPlugin, attach_prompt
from torch import nn

from .config import PromptEncoderConfig
from .encoder import PromptEncoder

__all__ = ["DISK_KEY", "PTuningPlugin", "plugin"]

#: The tensor's name in Hugging Face PEFT's adapter file: the encoder's output, all rows.
DISK_KEY = "prompt_embeddings"
_TASKS = [TaskType.CAUSAL_LM, TaskType.SEQ_2_SEQ_LM, TaskType.SEQ_CLS, TaskType.TOKEN_CLS,
          TaskType.FEATURE_EXTRACTION]


def _key(adapter_name: str) -> str:
    return f"{STORE_PREFIX}{adapter_name}.embedding.weight"


def _adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    # the encoder trains in float32 next to half-precision models (as PEFT's does); the prompt is cast per forward
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class PTuningPlugin(PromptTuningPlugin):
    """P-tuning (Liu et al., 2021): virtual tokens produced by a trained MLP/LSTM prompt encoder.

    ``prepare_inputs`` and ``remove`` are prompt tuning's, inherited: they only read the store module
    through :class:`~peft_prompt_tuning.PromptEmbedding`'s interface, which :class:`PromptEncoder` keeps.
    """

    @hookimpl
    def declare_methods(self) -> list[MethodSpec]:
        return [MethodSpec(name="P_TUNING", config_cls=PromptEncoderConfig, task_types=_TASKS, mergeable=False,
                           summary="P-tuning: virtual tokens from a trained MLP/LSTM prompt encoder, in front of "
                                   "the input",
                           disk_model_prefix="base_model.")]

    @hookimpl
    def complete_config(self, model: nn.Module, config: PromptEncoderConfig) -> PromptEncoderConfig:
        if config.num_virtual_tokens is None:
            raise ConfigError("PromptEncoderConfig.num_virtual_tokens is not set: give it before get_peft_model, "
                              "e.g. PromptEncoderConfig(num_virtual_tokens=20, ...) or "
                              "config.replace(num_virtual_tokens=20)")
        sizes = model_sizes(model)
        changes: dict[str, Any] = {}
        token_dim = config.token_dim
        if token_dim is None:
            token_dim = sizes.embedding_dim or sizes.hidden_size
            if token_dim is None:
                raise ConfigError(f"PromptEncoderConfig.token_dim: {type(model).__name__} has neither an input "
                                  "embedding nor a hidden_size in its config; set token_dim")
            changes["token_dim"] = token_dim
        if config.num_layers is None and sizes.num_layers is not None:
            changes["num_layers"] = sizes.num_layers
        if config.num_attention_heads is None and sizes.num_attention_heads is not None:
            changes["num_attention_heads"] = sizes.num_attention_heads
        if config.num_transformer_submodules is None:
            changes["num_transformer_submodules"] = 2 if config.task_type == TaskType.SEQ_2_SEQ_LM else 1
        if config.encoder_hidden_size is None:
            changes["encoder_hidden_size"] = token_dim  # PEFT's default
        return config.replace(**changes) if changes else config

    @hookimpl
    def inject(self, model: nn.Module, adapter_name: str, config: PromptEncoderConfig, runtime: AdapterRuntime,
               store: nn.ModuleDict) -> list[str]:
        get = getattr(model, "get_input_embeddings", None)
        weight = getattr(get() if callable(get) else None, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise TargetError(f"P-tuning needs the token embedding of {type(model).__name__} "
                              "(model.get_input_embeddings() returning an nn.Embedding-like module with a 2D "
                              "weight); it has none")
        if weight.shape[1] != config.token_dim:
            raise ConfigError(f"PromptEncoderConfig.token_dim={config.token_dim} but the input embeddings of "
                              f"{type(model).__name__} are {weight.shape[1]} wide; leave token_dim unset")
        if (config.encoder_reparameterization_type == "MLP" and config.encoder_num_layers != 2
                and not config.inference_mode):
            # PEFT accepts the field and ignores it; so do we (its files must load), but say so
            warnings.warn(f"PromptEncoderConfig.encoder_num_layers={config.encoder_num_layers} is ignored by the "
                          "MLP encoder, which always has 3 linear layers (as in PEFT); use "
                          "encoder_reparameterization_type='LSTM' for a layer count", UserWarning, stacklevel=2)
        module = PromptEncoder(adapter_name, config, runtime, model_sizes(model).is_encoder_decoder, weight.device,
                               _adapter_dtype(weight.dtype))
        attach_prompt(model, module)
        store[adapter_name] = module
        return []  # no layer of the model is replaced

    @hookimpl
    def state_dict_filter(self, adapter_name: str, store: nn.ModuleDict,
                          state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        module: PromptEncoder = store[adapter_name]
        if not module.has_encoder:
            return {DISK_KEY: state_dict[_key(adapter_name)]}
        was_training = module.training
        module.eval()  # the saved prompt is the deterministic one: no LSTM dropout in it
        try:
            with torch.no_grad():
                return {DISK_KEY: module.encoded().detach()}
        finally:
            module.train(was_training)

    @hookimpl
    def state_dict_load(self, adapter_name: str, store: nn.ModuleDict,
                        state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        module: PromptEncoder = store[adapter_name]
        if module.has_encoder and DISK_KEY in state_dict:
            raise CheckpointError(
                f"adapter {adapter_name!r}: the file holds the prompt encoder's output ({DISK_KEY}), not the "
                "encoder (PEFT's format), so P-tuning cannot resume training from it (PEFT would run a new, random "
                "encoder over it). Load it with is_trainable=False to use it; to train further, start a new "
                "adapter, or load the table as prompt tuning (PromptTuningConfig) to train the prompt directly")
        return {(_key(adapter_name) if k == DISK_KEY else k): v for k, v in state_dict.items()}


plugin = PTuningPlugin()
