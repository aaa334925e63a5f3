"""PromptTuningConfig: Hugging Face PEFT's prompt-tuning fields, with their meanings."""

from __future__ import annotations

import enum
from typing import Any, ClassVar

import attrs
from peft_core.config import PeftConfig, check
from peft_core.errors import ConfigError

__all__ = ["PromptTuningConfig", "PromptTuningInit"]


class PromptTuningInit(str, enum.Enum):
    """How the virtual-token embeddings start (the values PEFT writes to ``adapter_config.json``)."""

    #: Normal(0, 1) noise, like a fresh ``nn.Embedding``.
    RANDOM = "RANDOM"
    #: The model's embeddings of ``prompt_tuning_init_text``, tokenized and repeated/cut to length.
    TEXT = "TEXT"
    #: The model's embeddings of tokens drawn uniformly from its vocabulary.
    SAMPLE_VOCAB = "SAMPLE_VOCAB"

    def __str__(self) -> str:
        return self.value


def _init_value(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


_SIZE = "Leave it unset to take it from the model's config."


@attrs.frozen(kw_only=True)
class PromptTuningConfig(PeftConfig):
    """Prompt tuning (Lester et al., 2021): ``num_virtual_tokens`` learned embeddings are put in front of
    the input embeddings; the model itself stays frozen.

    ``token_dim``, ``num_layers``, ``num_attention_heads`` and ``num_transformer_submodules`` describe the
    model and are filled from its config when the adapter is added (the stored and saved config is the
    completed copy; yours is never changed). For encoder-decoder models (``num_transformer_submodules=2``)
    the prompt goes in front of the encoder's input; PEFT's file keeps a second, unused block of rows,
    which this plugin keeps too so files load both ways.
    """

    peft_type: ClassVar[str] = "PROMPT_TUNING"

    # Optional at construction, as in PEFT (code built for it fills fields after constructing); required by
    # get_peft_model, which says so (see complete_config).
    num_virtual_tokens: int | None = attrs.field(default=None, validator=check(
        int, optional=True, low=1, high=1_000_000, fix="It is the number of virtual tokens, e.g. 20."))
    token_dim: int | None = attrs.field(default=None, validator=check(int, optional=True, low=1, fix=_SIZE))
    num_transformer_submodules: int | None = attrs.field(
        default=None, validator=check(int, optional=True, choices=(1, 2),
                                      fix="Use 2 for encoder-decoder models, 1 otherwise, or leave it unset."))
    num_attention_heads: int | None = attrs.field(default=None, validator=check(int, optional=True, low=1,
                                                                                fix=_SIZE))
    num_layers: int | None = attrs.field(default=None, validator=check(int, optional=True, low=1, fix=_SIZE))
    prompt_tuning_init: str = attrs.field(
        default="RANDOM", converter=_init_value,
        validator=check(str, choices=[m.value for m in PromptTuningInit]))
    prompt_tuning_init_text: str | None = attrs.field(default=None, validator=check(str, optional=True))
    tokenizer_name_or_path: str | None = attrs.field(default=None, validator=check(str, optional=True))
    tokenizer_kwargs: dict[str, Any] | None = attrs.field(default=None, validator=check(dict, optional=True))

    def __attrs_post_init__(self) -> None:
        if self.prompt_tuning_init == "TEXT":
            if not self.tokenizer_name_or_path:
                raise ConfigError("PromptTuningConfig: prompt_tuning_init='TEXT' needs tokenizer_name_or_path (a "
                                  "local tokenizer folder or a Hub id) to tokenize prompt_tuning_init_text")
            if not self.prompt_tuning_init_text:
                raise ConfigError("PromptTuningConfig: prompt_tuning_init='TEXT' needs prompt_tuning_init_text, "
                                  "the text whose embeddings start the prompt")
        elif self.tokenizer_kwargs:
            raise ConfigError(f"PromptTuningConfig.tokenizer_kwargs is only used with prompt_tuning_init='TEXT' "
                              f"(got prompt_tuning_init={self.prompt_tuning_init!r}); drop it or use 'TEXT'")
