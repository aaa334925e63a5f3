"""PrefixTuningConfig: Hugging Face PEFT's prefix-tuning fields, with their meanings."""

from __future__ import annotations

from typing import ClassVar

import attrs
from peft_core.config import PeftConfig, check

__all__ = ["PrefixTuningConfig"]

_SIZE = "Leave it unset to take it from the model's config."


@attrs.frozen(kw_only=True)
class PrefixTuningConfig(PeftConfig):
    """Prefix tuning (Li & Liang, 2021): ``num_virtual_tokens`` learned key/value pairs in front of every
    attention layer's keys and values, delivered through the model's KV cache.

    ``token_dim`` is the width of one layer's keys (``num_attention_heads`` heads of
    ``token_dim // num_attention_heads``); for grouped-query attention these are the *key-value* heads,
    as Hugging Face PEFT computes them. ``token_dim``, ``num_layers``, ``num_attention_heads``,
    ``num_transformer_submodules`` and ``encoder_hidden_size`` are filled from the model when the adapter
    is added (the stored and saved config is the completed copy).

    With ``prefix_projection`` the prefix is produced by a two-layer MLP (``token_dim ->
    encoder_hidden_size -> num_layers * 2 * token_dim``) while training; the adapter file holds its
    output, and an adapter loaded for inference is that output, a plain table (PEFT's format).
    """

    peft_type: ClassVar[str] = "PREFIX_TUNING"

    # Optional at construction, as in PEFT (code built for it fills fields after constructing); required by
    # get_peft_model, which says so (see complete_config).
    num_virtual_tokens: int | None = attrs.field(default=None, validator=check(
        int, optional=True, low=1, high=1_000_000, fix="It is the number of virtual key/value positions, e.g. 20."))
    token_dim: int | None = attrs.field(default=None, validator=check(int, optional=True, low=1, fix=_SIZE))
    num_transformer_submodules: int | None = attrs.field(
        default=None, validator=check(int, optional=True, choices=(1, 2),
                                      fix="Use 2 for encoder-decoder models, 1 otherwise, or leave it unset."))
    num_attention_heads: int | None = attrs.field(default=None, validator=check(int, optional=True, low=1,
                                                                                fix=_SIZE))
    num_layers: int | None = attrs.field(default=None, validator=check(int, optional=True, low=1, fix=_SIZE))
    encoder_hidden_size: int | None = attrs.field(
        default=None, validator=check(int, optional=True, low=1,
                                      fix="It is the MLP's hidden width with prefix_projection; unset: token_dim."))
    prefix_projection: bool = attrs.field(default=False, validator=check(bool))
    init_weights: str | None = attrs.field(
        default=None, validator=check(str, optional=True, choices=("zero",),
                                      fix="Use None (random) or 'zero' (a prefix of zeros)."))
