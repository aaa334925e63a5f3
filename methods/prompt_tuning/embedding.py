"""PromptEmbedding: the learned virtual tokens of one prompt-tuning adapter, and how they enter a forward."""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from peft_core.errors import ConfigError
from peft_core.runtime import AdapterRuntime
from peft_core.virtual_tokens import extend_attention_mask, keyword_inputs
from torch import nn

from .config import PromptTuningConfig

__all__ = ["OWN_CACHE", "PromptEmbedding", "initial_token_ids"]

#: Attribute set on the caches this plugin creates. A forward with ``use_cache=False`` still returns the
#: cache it was given, and ``generate(use_cache=False)`` passes it back with the whole sequence again;
#: such a cache is stale and must not be continued.
OWN_CACHE = "_peft_prompt_own_cache"


class PromptEmbedding(nn.Module):
    """``embedding.weight`` holds ``num_virtual_tokens * num_transformer_submodules`` rows of ``token_dim``.

    Only the first ``num_virtual_tokens`` rows are used: they go in front of the input embeddings (of the
    encoder, for encoder-decoder models). The other rows exist because Hugging Face PEFT's file has them.
    """

    def __init__(self, adapter_name: str, config: PromptTuningConfig, runtime: AdapterRuntime,
                 encoder_decoder: bool, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        rows = config.num_virtual_tokens * (config.num_transformer_submodules or 1)
        self.embedding = nn.Embedding(rows, config.token_dim, device=device, dtype=dtype)
        self.num_virtual_tokens: int = config.num_virtual_tokens
        self.adapter_name = adapter_name
        self.encoder_decoder = encoder_decoder
        # plain attributes, not submodules: the runtime belongs to the wrapping model
        self._runtime = runtime
        self._encoder_hook: Any = None
        self._output_hook: Any = None
        # logits of the virtual positions waiting to be put in front of one call's output (shared-prompt
        # path): id(inputs_embeds of that call) -> (weak reference to that tensor, logits)
        self._pending: dict[int, tuple[weakref.ref[torch.Tensor], torch.Tensor]] = {}

    def prompt(self) -> torch.Tensor:
        """The ``(num_virtual_tokens, token_dim)`` block that goes in front of the input, in the adapter's dtype.

        Subclasses that compute the prompt (P-tuning's encoder) override this; every path of this plugin
        (plain, encoder hook, shared-prompt) reads the prompt only through it, once per forward.
        """
        return self.embedding.weight[: self.num_virtual_tokens]

    def prepend(self, embeds: torch.Tensor) -> torch.Tensor:
        """``embeds`` (batch, length, dim) with the virtual tokens in front, in ``embeds``' dtype.

        One (n, dim) block expanded over the batch: no per-row copy of the prompt before the concatenation.
        """
        prompt = self.prompt().to(embeds.dtype)
        return torch.cat([prompt.unsqueeze(0).expand(embeds.shape[0], -1, -1), embeds], dim=1)

    # ------------------------------------------------------------------ encoder-decoder models
    def attach_to_encoder(self, encoder: nn.Module) -> None:
        """Prompt the encoder wherever it is called from: the model's forward, and ``generate()``, which
        runs the encoder once on its own before any forward of the whole model."""
        self._encoder_hook = encoder.register_forward_pre_hook(self._encoder_pre_hook, with_kwargs=True)

    def detach_from_encoder(self) -> None:
        if self._encoder_hook is not None:
            self._encoder_hook.remove()
            self._encoder_hook = None

    def _encoder_pre_hook(self, encoder: nn.Module, args: tuple[Any, ...],
                          kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        runtime = self._runtime
        if runtime.disabled or self.adapter_name not in runtime.active:
            return None
        inputs = keyword_inputs(encoder, args, kwargs)
        ids = inputs.pop("input_ids", None)
        embeds = inputs.get("inputs_embeds")
        if embeds is None:
            if ids is None:
                return None  # let the encoder report the missing input itself
            embeds = encoder.get_input_embeddings()(ids)
        inputs["inputs_embeds"] = self.prepend(embeds)
        n = self.num_virtual_tokens
        # the model's forward has already extended the mask (it also serves cross-attention); generate() has not
        inputs["attention_mask"] = extend_attention_mask(inputs.get("attention_mask"), n, n + embeds.shape[1])
        return (), inputs

    # ------------------------------------------------------------------ shared-prompt path (see plugin.py)
    def attach_output_hook(self, model: nn.Module) -> None:
        self._output_hook = model.register_forward_hook(self._output_post_hook, with_kwargs=True)

    def detach_output_hook(self) -> None:
        if self._output_hook is not None:
            self._output_hook.remove()
            self._output_hook = None

    def expect_output(self, embeds: torch.Tensor, virtual_logits: torch.Tensor) -> None:
        """Put ``virtual_logits`` (1, k, vocab) in front of the logits of the call whose input is ``embeds``."""
        for key in [k for k, (ref, _) in self._pending.items() if ref() is None]:  # calls that raised
            del self._pending[key]
        self._pending[id(embeds)] = (weakref.ref(embeds), virtual_logits)

    def _output_post_hook(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                          output: Any) -> Any:
        if torch.compiler.is_compiling():
            return None  # compiled graphs take the plain path (the prompt pass needs a ContextVar): none pending
        embeds = kwargs.get("inputs_embeds")
        entry = self._pending.pop(id(embeds), None) if embeds is not None else None
        if entry is None or entry[0]() is not embeds:
            return None
        logits = getattr(output, "logits", None)
        if not isinstance(logits, torch.Tensor):
            return None
        virtual = entry[1].to(logits.dtype).expand(logits.shape[0], -1, -1)
        output.logits = torch.cat([virtual, logits], dim=1)
        return output

    def extra_repr(self) -> str:
        return f"adapter={self.adapter_name!r}, num_virtual_tokens={self.num_virtual_tokens}"


def initial_token_ids(config: PromptTuningConfig, rows: int, vocab_size: int) -> torch.Tensor | None:
    """Token ids whose embeddings start the prompt (TEXT and SAMPLE_VOCAB), or None for RANDOM."""
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        return torch.randint(0, vocab_size, (rows,), dtype=torch.long)
    if config.prompt_tuning_init != "TEXT":
        return None
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    # an adapter config must never make us run code from a tokenizer repository
    kwargs.pop("trust_remote_code", None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    except Exception as e:
        raise ConfigError(f"PromptTuningConfig.tokenizer_name_or_path={config.tokenizer_name_or_path!r}: no tokenizer "
                          f"could be loaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                          "Give a local folder with the tokenizer's files (works offline), or a Hub id while "
                          "online") from None
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ConfigError(f"PromptTuningConfig.prompt_tuning_init_text={config.prompt_tuning_init_text!r} "
                          "tokenizes to no tokens; give a non-empty text")
    too_big = [i for i in ids if not 0 <= i < vocab_size]
    if too_big:
        raise ConfigError(f"PromptTuningConfig.tokenizer_name_or_path={config.tokenizer_name_or_path!r} gives "
                          f"token ids {too_big[:5]} outside the model's vocabulary (size {vocab_size}); use the "
                          "model's own tokenizer")
    # repeat the text to fill every row, then cut (PEFT's rule, so TEXT-initialised prompts are the same)
    ids = (ids * math.ceil(rows / len(ids)))[:rows]
    return torch.tensor(ids, dtype=torch.long)
