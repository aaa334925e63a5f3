"""Hugging Face PEFT's public model classes, as thin task-specific faces of :class:`AdaptedModel`.

The task classes differ only in which task heads they train and save (``modules_to_save``); prompts,
prefixes and LoRA all reach the forward through hooks, so one forward and one ``generate`` serve every
task.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from .config import PeftConfig
from .model import AdaptedModel
from .tasks import TaskType

__all__ = [
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "get_peft_model",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
]


class PeftModel(AdaptedModel):
    """``PeftModel.from_pretrained(model, id)`` picks the task class from the saved ``task_type``."""

    #: Module names trained and saved with every adapter of this task (the task head).
    task_heads: ClassVar[tuple[str, ...]] = ()

    def _prepare_config(self, config: PeftConfig) -> PeftConfig:
        config = super()._prepare_config(config)
        if self.task_heads:
            current = tuple(config.modules_to_save or ())
            extra = tuple(h for h in self.task_heads if h not in current)
            if extra:  # a copy: the user's config object is never mutated
                config = config.replace(modules_to_save=current + extra)
        return config

    @classmethod
    def _class_for(cls, config: PeftConfig) -> type[AdaptedModel]:
        if cls is PeftModel and config.task_type is not None:
            return TASK_MODELS.get(config.task_type, PeftModel)
        return cls


class PeftModelForCausalLM(PeftModel):
    """Causal language models: ``labels`` for the loss, ``generate`` for text."""


class PeftModelForSeq2SeqLM(PeftModel):
    """Encoder-decoder models: ``labels`` for the loss, ``generate`` for text."""


class PeftModelForSequenceClassification(PeftModel):
    task_heads = ("classifier", "score")


class PeftModelForTokenClassification(PeftModel):
    task_heads = ("classifier", "score")


class PeftModelForQuestionAnswering(PeftModel):
    task_heads = ("qa_outputs",)


class PeftModelForFeatureExtraction(PeftModel):
    """Encoders used for embeddings (no head)."""


TASK_MODELS: dict[TaskType, type[PeftModel]] = {
    TaskType.CAUSAL_LM: PeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM,
    TaskType.SEQ_CLS: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
}


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                   mixed: bool = False, autocast_adapter_dtype: bool = True, revision: str | None = None,
                   low_cpu_mem_usage: bool = False) -> PeftModel:
    """Wrap ``model`` (in place) with a new adapter; the class follows ``peft_config.task_type``.

    Hugging Face PEFT's keywords, as there:

    - ``mixed``: PEFT needs a separate ``PeftMixedModel`` to combine adapters of different methods; every
      peft-core model composes them (``add_adapter`` of any method, ``set_adapter([...])``), so True and
      False both give the same model.
    - ``autocast_adapter_dtype`` (True): on a bf16/fp16 model, keep the adapter's new weights in fp32.
      False keeps them in the base model's dtype.
    - ``revision``: recorded in the config (``adapter_config.json``) when it has none.
    - ``low_cpu_mem_usage`` (False): create the adapter's weights on the ``meta`` device; they get memory
      and values from a later load (``load_adapter``, ``set_peft_model_state_dict``).
    """
    if not isinstance(mixed, bool):
        raise TypeError(f"get_peft_model(mixed=...) takes True or False, got {mixed!r}")
    if revision is not None and peft_config.revision is None:
        peft_config = peft_config.replace(revision=revision)
    cls = PeftModel._class_for(peft_config)
    return cls(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,  # type: ignore[return-value]
               low_cpu_mem_usage=low_cpu_mem_usage)


def get_peft_model_state_dict(model: AdaptedModel, state_dict: Any = None, adapter_name: str = "default",
                              unwrap_compiled: bool = False, save_embedding_layers: str | bool = "auto",
                              ) -> dict[str, Any]:
    """The adapter's tensors keyed as Hugging Face PEFT writes them.

    ``unwrap_compiled`` is accepted for PEFT compatibility: a compiled wrapper is unwrapped either way.
    ``save_embedding_layers``: "auto"/False write no base embedding weights (peft-core never changes them);
    True is refused, as by ``save_pretrained`` (save the base model if you resized its vocabulary).
    """
    if save_embedding_layers is True:
        from .errors import ConfigError

        raise ConfigError("get_peft_model_state_dict(save_embedding_layers=True): peft-core adapters never change "
                          "the base model's embedding layers, so there is nothing to add; save the base model itself "
                          "if you resized its vocabulary")
    inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    return inner.get_adapter_state_dict(adapter_name, state_dict)


def set_peft_model_state_dict(model: AdaptedModel, peft_model_state_dict: dict[str, Any],
                              adapter_name: str = "default", ignore_mismatched_sizes: bool = False,
                              low_cpu_mem_usage: bool = False) -> Any:
    """Load PEFT-keyed tensors into an existing adapter (all checked before anything is copied).

    Returns ``(missing_keys, unexpected_keys)`` like ``load_state_dict``, both always empty: unlike
    Hugging Face PEFT, a file with missing or unexpected tensors raises CheckpointError instead.
    ``low_cpu_mem_usage``: accepted as in PEFT; parameters created on ``meta`` are materialised by this load
    either way. ``ignore_mismatched_sizes=True`` (skip tensors of the wrong shape) is refused: a partly
    loaded adapter computes something nobody trained.
    """
    if ignore_mismatched_sizes:
        from .errors import CheckpointError

        raise CheckpointError("set_peft_model_state_dict(ignore_mismatched_sizes=True) is not supported: peft-core "
                              "loads an adapter whole or not at all; fix the shapes (r, target modules) instead")
    from torch.nn.modules.module import _IncompatibleKeys

    inner = getattr(model, "_orig_mod", model)
    inner.load_adapter_state_dict(adapter_name, peft_model_state_dict)
    return _IncompatibleKeys([], [])
