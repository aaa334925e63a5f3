"""Which modules an LN-tuning adapter copies: Hugging Face PEFT 0.21's rules and its default table
(``TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING``)."""

from __future__ import annotations

from collections.abc import Mapping

from peft_core.errors import TargetError
from peft_core.layers import is_adapter_layer
from peft_core.targeting import find_targets as _find_targets
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import LNTuningConfig

__all__ = ["DEFAULT_TARGETS", "find_targets"]

_DECODER_NORMS = ("input_layernorm", "post_attention_layernorm", "norm")
_GEMMA2_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm", "norm")

#: ``target_modules=None``: the modules PEFT's LN tuning copies, per ``model.config.model_type``.
DEFAULT_TARGETS: Mapping[str, tuple[str, ...]] = {
    "llama": _DECODER_NORMS, "bloom": ("input_layernorm", "post_attention_layernorm", "ln_f"),
    "llava": ("multi_modal_projector", "input_layernorm", "post_attention_layernorm", "norm", "embed_tokens",
              "lm_head"),
    "t5": ("layer_norm", "final_layer_norm"), "mt5": ("layer_norm", "final_layer_norm"),
    "bart": ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"), "gpt2": ("ln_1", "ln_2", "ln_f"),
    "blip-2": ("layernorm", "LayerNorm", "final_layer_norm", "self_attn_layer_norm"), "gptj": ("ln_1", "ln_f"),
    "falcon": ("input_layernorm", "post_attention_layernorm", "ln_f"), "mistral": _DECODER_NORMS,
    "phi": ("input_layernorm", "final_layernorm"), "gemma": _DECODER_NORMS, "gemma2": _GEMMA2_NORMS,
    "gemma3_text": _GEMMA2_NORMS, "qwen2": ("post_attention_layernorm",), "qwen3": ("post_attention_layernorm",),
}


def _norm_like(module: nn.Module) -> bool:
    """For messages: the layers LN tuning is meant for (LayerNorm, RMSNorm, T5LayerNorm...)."""
    return "norm" in type(module).__name__.lower()


def _linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def find_targets(model: nn.Module, config: LNTuningConfig) -> list[str]:
    """The paths to copy, by PEFT's targeting rules (any module type, as in PEFT, as long as it has parameters)."""
    from .layer import LNTuningLayer

    paths = _find_targets(model, config.target_modules, adaptable=_norm_like, linear=_linear,
                          exclude_modules=config.exclude_modules, modules_to_save=config.modules_to_save,
                          default_targets=DEFAULT_TARGETS, method="LN_TUNING")
    for path in paths:
        module = model.get_submodule(path)
        if isinstance(module, LNTuningLayer):
            continue
        if is_adapter_layer(module):
            raise TargetError(f"LN_TUNING target {path!r} is already adapted by another method's layer "
                              f"({type(module).__name__}); exclude it with exclude_modules or target other modules")
        if next(module.parameters(), None) is None:
            raise TargetError(f"LN_TUNING target {path!r} ({type(module).__name__}) has no parameters to train; "
                              "narrow target_modules or add it to exclude_modules")
    return paths
