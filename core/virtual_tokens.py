"""Helpers for methods that put *virtual tokens* in front of the sequence: prompt tuning, prefix
tuning, and any third-party method of that family.

Method-agnostic: nothing here knows a method. It reads a transformers model's sizes from its config,
and adjusts the keyword inputs of a forward so that ``n`` virtual tokens sit at positions ``0..n-1``
ahead of the caller's tokens:

- the 2D ``attention_mask`` gets ``n`` leading ones (:func:`extend_attention_mask`);
- ``position_ids`` given by the caller count the caller's tokens only, so they move up by ``n``
  (:func:`shift_position_ids`); without them the model counts from the cache length, which already
  includes the virtual tokens;
- the KV cache is found under the name the model's forward uses (:func:`cache_argument`).

Convention shared by such methods: the module a plugin keeps in ``store[adapter_name]`` has an int
attribute ``num_virtual_tokens``. :func:`check_virtual_token_call` relies on it to refuse two such
adapters at once: each takes "the cache is empty" for "the first forward of a sequence", which the
other one's virtual tokens make false.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import Any

import attrs
import torch
from torch import nn

from .errors import AdapterError
from .runtime import AdapterRuntime

__all__ = [
    "CACHE_ARGUMENTS",
    "ModelSizes",
    "active_virtual_token_adapters",
    "cache_argument",
    "cached_length",
    "check_virtual_token_call",
    "extend_attention_mask",
    "keyword_inputs",
    "model_sizes",
    "pop_cache",
    "shift_position_ids",
]

#: Names of the KV-cache argument: ``cache`` since transformers 5.x, ``past_key_values`` before (still
#: accepted as a deprecated alias by transformers' own models).
CACHE_ARGUMENTS = ("cache", "past_key_values")


def _first_int(config: Any, names: Sequence[str]) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


@attrs.frozen
class ModelSizes:
    """What a virtual-token method needs to know about a transformers model (None: not found)."""

    #: ``num_hidden_layers`` (for encoder-decoder models, the encoder's; Hugging Face PEFT's value).
    num_layers: int | None
    #: Decoder layers of an encoder-decoder model (``num_decoder_layers``/``decoder_layers``), else None.
    num_decoder_layers: int | None
    #: Width of the model's hidden states (``hidden_size``/``n_embd``/``d_model``).
    hidden_size: int | None
    #: Width of the input embeddings (differs from ``hidden_size`` in a few models, e.g. OPT-350m).
    embedding_dim: int | None
    num_attention_heads: int | None
    #: Key/value heads of grouped-query attention; None when the config does not say.
    num_key_value_heads: int | None
    #: Per-head width when the config states it (``head_dim``, T5's ``d_kv``).
    head_dim: int | None
    is_encoder_decoder: bool
    vocab_size: int | None


def model_sizes(model: nn.Module) -> ModelSizes:
    """Read :class:`ModelSizes` from ``model.config`` (the text config of multimodal models).

    Attribute aliases of transformers configs apply (GPT-2's ``n_embd`` answers to ``hidden_size``).
    """
    config = getattr(model, "config", None)
    text = config
    if config is not None and hasattr(config, "get_text_config"):
        text = config.get_text_config(decoder=True)
    is_enc_dec = bool(getattr(config, "is_encoder_decoder", False))
    embedding_dim = None
    get_emb = getattr(model, "get_input_embeddings", None)
    if callable(get_emb):
        try:
            emb = get_emb()
        except (NotImplementedError, AttributeError):  # models without a token embedding
            emb = None
        weight = getattr(emb, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            embedding_dim = int(weight.shape[1])
    return ModelSizes(
        num_layers=_first_int(text, ("num_hidden_layers", "num_layers", "n_layer")),
        num_decoder_layers=_first_int(text, ("num_decoder_layers", "decoder_layers")) if is_enc_dec else None,
        hidden_size=_first_int(text, ("hidden_size", "n_embd", "d_model")),
        embedding_dim=embedding_dim,
        num_attention_heads=_first_int(text, ("num_attention_heads", "n_head", "num_heads",
                                              "encoder_attention_heads")),
        num_key_value_heads=_first_int(text, ("num_key_value_heads",)),
        head_dim=_first_int(text, ("head_dim", "d_kv")),
        is_encoder_decoder=is_enc_dec,
        vocab_size=_first_int(text, ("vocab_size",)),
    )


@functools.lru_cache(maxsize=128)
def _signature(cls: type) -> tuple[tuple[str, ...], frozenset[str], bool]:
    """(positional parameter names, all parameter names, accepts **kwargs) of ``cls.forward``."""
    params = [p for p in inspect.signature(cls.forward).parameters.values() if p.name != "self"]
    positional = tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    return positional, frozenset(p.name for p in params), any(p.kind is p.VAR_KEYWORD for p in params)


def keyword_inputs(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The inputs of a ``module.forward`` call as one keyword dict (for forward pre-hooks)."""
    if not args:
        return dict(kwargs)
    names = _signature(type(module))[0]
    if len(args) > len(names):
        raise TypeError(f"{type(module).__name__}.forward got {len(args)} positional arguments")
    return {**dict(zip(names, args)), **kwargs}


def cache_argument(model: nn.Module) -> str | None:
    """The keyword under which ``model.forward`` takes a KV cache, or None if it takes none.

    A forward that only passes ``**kwargs`` on to its backbone (``BertForSequenceClassification``) gets
    transformers 5's name, ``cache``.
    """
    _, names, var_kw = _signature(type(model))
    for name in CACHE_ARGUMENTS:
        if name in names:
            return name
    return CACHE_ARGUMENTS[0] if var_kw else None


def pop_cache(inputs: dict[str, Any]) -> Any:
    """Remove and return the KV cache from ``inputs``, under either of its names (or None)."""
    found = None
    for name in CACHE_ARGUMENTS:
        value = inputs.pop(name, None)
        if value is not None:
            if found is not None:
                raise AdapterError("both `cache` and `past_key_values` were given; pass the cache once, as "
                                   "`cache` (transformers 5's name)")
            found = value
    return found


def cached_length(cache: Any) -> int:
    """How many positions a transformers ``Cache`` already holds (0 for None)."""
    if cache is None:
        return 0
    get = getattr(cache, "get_seq_length", None)
    if get is None:
        raise AdapterError(f"the KV cache is a {type(cache).__name__}; virtual-token adapters need a "
                           "transformers Cache (DynamicCache, EncoderDecoderCache), as transformers 5 returns")
    return int(get())


def extend_attention_mask(mask: torch.Tensor | None, num_virtual: int, total: int,
                          name: str = "attention_mask") -> torch.Tensor | None:
    """Put ``num_virtual`` ones in front of a 2D padding mask that covers the caller's positions only.

    ``total`` is the number of key positions the model attends to in this call (cache + new tokens,
    virtual ones included). A mask of that length already counts the virtual tokens and comes back
    unchanged; one ``num_virtual`` shorter is extended; any other length is an error.
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        what = f"a {mask.dim()}D tensor" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise AdapterError(f"{name} is {what}; with virtual tokens (prompt/prefix tuning) pass the 2D padding "
                           "mask (batch, length) that the tokenizer returns, and let the model build its own "
                           "4D mask")
    length = mask.shape[1]
    if length == total:
        return mask
    if length != total - num_virtual:
        raise AdapterError(f"{name} has length {length}, but this call attends to {total} positions "
                           f"({total - num_virtual} of yours after {num_virtual} virtual tokens); pass a mask "
                           f"covering your own tokens (length {total - num_virtual}), cache included")
    return torch.cat([mask.new_ones((mask.shape[0], num_virtual)), mask], dim=1)


def shift_position_ids(position_ids: torch.Tensor | None, num_virtual: int, *,
                       prepend: bool) -> torch.Tensor | None:
    """Move the caller's ``position_ids`` up by ``num_virtual``; with ``prepend`` also put the virtual
    tokens' own positions ``0..num_virtual-1`` in front (when they enter the sequence as embeddings)."""
    if position_ids is None:
        return None
    shifted = position_ids + num_virtual
    if not prepend:
        return shifted
    virtual = torch.arange(num_virtual, dtype=position_ids.dtype, device=position_ids.device)
    return torch.cat([virtual.expand(*position_ids.shape[:-1], num_virtual), shifted], dim=-1)


def active_virtual_token_adapters(runtime: AdapterRuntime, store: nn.ModuleDict) -> list[str]:
    """Active adapters whose ``store`` module declares ``num_virtual_tokens`` (see the module docstring)."""
    if runtime.disabled:
        return []
    return [n for n in runtime.active if n in store and isinstance(getattr(store[n], "num_virtual_tokens", None), int)]


def check_virtual_token_call(module: nn.Module, store: nn.ModuleDict, runtime: AdapterRuntime, kind: str) -> None:
    """Refuse what sequence-level virtual tokens cannot do: per-row routing (``adapter_names``), and a
    second active virtual-token adapter. ``module`` is the caller's ``store`` entry, ``kind`` its method
    in words (for the message)."""
    name = next((n for n in store if store[n] is module), "?")
    if runtime.routing() is not None:
        raise AdapterError(f"adapter_names (mixed-batch inference) cannot route {kind} adapters per row: every "
                           "row gets the same virtual tokens. Run the rows of each adapter as their own batch")
    others = [n for n in active_virtual_token_adapters(runtime, store) if store[n] is not module]
    if others:
        raise AdapterError(f"{kind} adapter {name!r} is active together with {others}, which also add virtual "
                           "tokens; activate one prompt or prefix adapter at a time (LoRA adapters can be "
                           "active alongside it)")
