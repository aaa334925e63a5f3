"""PromptEncoderConfig: Hugging Face PEFT's P-tuning fields, with their meanings."""

from __future__ import annotations

import enum
from typing import Any, ClassVar

import attrs
from peft_core.config import PeftConfig, check

__all__ = ["PromptEncoderConfig", "PromptEncoderReparameterizationType"]


class PromptEncoderReparameterizationType(str, enum.Enum):
    """The network that turns the virtual-token embeddings into the prompt (PEFT's values)."""

    #: Linear-ReLU-Linear-ReLU-Linear, ``token_dim -> encoder_hidden_size -> encoder_hidden_size -> token_dim``.
    MLP = "MLP"
    #: A bidirectional LSTM of ``encoder_num_layers`` layers, then Linear-ReLU-Linear back to ``token_dim``.
    LSTM = "LSTM"

    def __str__(self) -> str:
        return self.value


def _enum_value(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


_SIZE = "Leave it unset to take it from the model's config."


@attrs.frozen(kw_only=True)
class PromptEncoderConfig(PeftConfig):
    """P-tuning (Liu et al., 2021): ``num_virtual_tokens`` virtual tokens whose embeddings are produced by a
    small trained network (the *prompt encoder*, MLP or LSTM) and put in front of the input embeddings.

    The model-describing fields (``token_dim``, ``num_layers``, ``num_attention_heads``,
    ``num_transformer_submodules``) and ``encoder_hidden_size`` (default: ``token_dim``) are filled from the
    model when the adapter is added; the stored and saved config is the completed copy. The adapter file
    holds the encoder's *output* (PEFT's format), so an adapter loaded for inference is a plain table of
    virtual tokens and has no encoder.
    """

    peft_type: ClassVar[str] = "P_TUNING"

    num_virtual_tokens: int | None = attrs.field(default=None, validator=check(
        int, optional=True, low=1, high=1_000_000, fix="It is the number of virtual tokens, e.g. 20."))
    token_dim: int | None = attrs.field(default=None, validator=check(int, optional=True, low=1, fix=_SIZE))
    num_transformer_submodules: int | None = attrs.field(
        default=None, validator=check(int, optional=True, choices=(1, 2),
                                      fix="Use 2 for encoder-decoder models, 1 otherwise, or leave it unset."))
    num_attention_heads: int | None = attrs.field(default=None, validator=check(int, optional=True, low=1,
                                                                                fix=_SIZE))
    num_layers: int | None = attrs.field(default=None, validator=check(int, optional=True, low=1, fix=_SIZE))
    encoder_reparameterization_type: str = attrs.field(
        default="MLP", converter=_enum_value,
        validator=check(str, choices=[m.value for m in PromptEncoderReparameterizationType]))
    encoder_hidden_size: int | None = attrs.field(
        default=None, validator=check(int, optional=True, low=1,
                                      fix="It is the prompt encoder's hidden width; unset: token_dim."))
    # PEFT's MLP always has 3 linear layers and ignores this (with a warning); the LSTM has this many layers
    encoder_num_layers: int = attrs.field(default=2, validator=check(int, low=1))
    # between LSTM layers only (torch's LSTM dropout); the MLP has none
    encoder_dropout: float = attrs.field(default=0.0, validator=check((float, int), low=0.0, high=1.0))
