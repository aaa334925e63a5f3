"""``AutoPeftModel*``: load the base model named in ``adapter_config.json``, then the adapter."""

from __future__ import annotations

import os
from typing import Any, ClassVar

from .config import PeftConfig
from .errors import ConfigError
from .model import AdaptedModel
from .peft_model import TASK_MODELS, PeftModel
from .tasks import TaskType

__all__ = [
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
]

# transformers auto class for each task type (by name: imported lazily)
_AUTO_NAMES = {
    TaskType.CAUSAL_LM: "AutoModelForCausalLM",
    TaskType.SEQ_2_SEQ_LM: "AutoModelForSeq2SeqLM",
    TaskType.SEQ_CLS: "AutoModelForSequenceClassification",
    TaskType.TOKEN_CLS: "AutoModelForTokenClassification",
    TaskType.QUESTION_ANS: "AutoModelForQuestionAnswering",
    TaskType.FEATURE_EXTRACTION: "AutoModel",
}


class AutoPeftModel:
    """``AutoPeftModel.from_pretrained(id)``: the task (and so the classes) come from the saved config."""

    task_type: ClassVar[TaskType | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(f"{type(self).__name__} is built with {type(self).__name__}.from_pretrained(...)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str], adapter_name: str = "default",
                        is_trainable: bool = False, config: PeftConfig | None = None,
                        revision: str | None = None, low_cpu_mem_usage: bool = False,
                        autocast_adapter_dtype: bool = True, **kwargs: Any) -> AdaptedModel:
        """Load the base model named in the adapter's config (``kwargs`` go to transformers' ``from_pretrained``:
        ``torch_dtype``, ``quantization_config``, ``device_map``...), then the adapter onto it.
        ``low_cpu_mem_usage`` and ``autocast_adapter_dtype`` are about the adapter, as in ``PeftModel``."""
        import transformers

        path = pretrained_model_name_or_path
        hub = {k: kwargs.pop(k) for k in ("subfolder", "cache_dir", "token", "local_files_only") if k in kwargs}
        peft_config = config or PeftConfig.from_pretrained(path, revision=revision, **hub)
        task = cls.task_type or peft_config.task_type
        if cls.task_type is not None and peft_config.task_type not in (None, cls.task_type):
            raise ConfigError(f"{path!s} holds a {peft_config.task_type.value} adapter; load it with "
                              f"AutoPeftModelFor{_SUFFIX[peft_config.task_type]}")
        base_name = peft_config.base_model_name_or_path
        if not base_name:
            raise ConfigError(f"{path!s}: adapter_config.json has no base_model_name_or_path, so the base "
                              "model is unknown; load it yourself and use PeftModel.from_pretrained")
        auto = getattr(transformers, _AUTO_NAMES.get(task, "AutoModel")) if task else transformers.AutoModel
        base = auto.from_pretrained(base_name, revision=peft_config.revision, **kwargs)
        model_cls = TASK_MODELS.get(task, PeftModel) if task else PeftModel
        return model_cls.from_pretrained(base, path, adapter_name=adapter_name, is_trainable=is_trainable,
                                         config=peft_config, revision=revision, low_cpu_mem_usage=low_cpu_mem_usage,
                                         autocast_adapter_dtype=autocast_adapter_dtype, **hub)


_SUFFIX = {TaskType.CAUSAL_LM: "CausalLM", TaskType.SEQ_2_SEQ_LM: "Seq2SeqLM",
           TaskType.SEQ_CLS: "SequenceClassification", TaskType.TOKEN_CLS: "TokenClassification",
           TaskType.QUESTION_ANS: "QuestionAnswering", TaskType.FEATURE_EXTRACTION: "FeatureExtraction"}


class AutoPeftModelForCausalLM(AutoPeftModel):
    task_type = TaskType.CAUSAL_LM


class AutoPeftModelForSeq2SeqLM(AutoPeftModel):
    task_type = TaskType.SEQ_2_SEQ_LM


class AutoPeftModelForSequenceClassification(AutoPeftModel):
    task_type = TaskType.SEQ_CLS


class AutoPeftModelForTokenClassification(AutoPeftModel):
    task_type = TaskType.TOKEN_CLS


class AutoPeftModelForQuestionAnswering(AutoPeftModel):
    task_type = TaskType.QUESTION_ANS


class AutoPeftModelForFeatureExtraction(AutoPeftModel):
    task_type = TaskType.FEATURE_EXTRACTION
