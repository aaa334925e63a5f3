"""AdaptionPromptConfig: Hugging Face PEFT's fields for LLaMA-Adapter, with their meanings."""

from __future__ import annotations

from typing import ClassVar

import attrs
from peft_core.config import PeftConfig, check

__all__ = ["AdaptionPromptConfig"]


@attrs.frozen(kw_only=True)
class AdaptionPromptConfig(PeftConfig):
    """LLaMA-Adapter (Zhang et al., 2023): learned prompts attended by the top attention layers.

    - ``target_modules``: the *name* of the attention sub-module of each decoder block (one name, not a
      list: ``"self_attn"`` for llama/mistral, ``"attn"`` for gpt2). Every module whose path ends with
      ``"." + target_modules`` is a candidate. Leave it unset to take the model type's default.
    - ``adapter_len``: the number of learned prompt tokens per adapted layer.
    - ``adapter_layers``: how many attention modules to adapt, counted from the top (the last ones).

    ``adapter_len`` and ``adapter_layers`` are optional here, as in PEFT (code written for it sets them
    after constructing), but ``get_peft_model`` refuses a config without them.
    """

    peft_type: ClassVar[str] = "ADAPTION_PROMPT"

    target_modules: str | None = attrs.field(default=None, validator=check(
        str, optional=True, fix='Give the attention sub-module name, e.g. "self_attn", or leave it unset.'))
    adapter_len: int | None = attrs.field(default=None, validator=check(
        int, optional=True, low=1, fix="It is the number of prompt tokens per layer, e.g. 10."))
    adapter_layers: int | None = attrs.field(default=None, validator=check(
        int, optional=True, low=1, fix="It is the number of top attention layers to adapt, e.g. 30."))

    @property
    def is_adaption_prompt(self) -> bool:
        """PEFT's marker property, kept for code that branches on it."""
        return True
