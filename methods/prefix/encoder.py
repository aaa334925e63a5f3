"""PrefixEncoder: the learned key/value prefix of one prefix-tuning adapter, and how it fills a KV cache."""

from __future__ import annotations

from typing import Any

import torch
from peft_core.runtime import AdapterRuntime
from torch import nn

from .config import PrefixTuningConfig

__all__ = ["OWN_CACHE", "PrefixEncoder", "layer_rows"]

#: Attribute set on the caches this plugin creates. A forward with ``use_cache=False`` still returns the
#: cache it was given, and transformers' ``generate(use_cache=False)`` passes it back into the next step
#: with the whole sequence again; such a cache is stale and must not be continued.
OWN_CACHE = "_peft_prefix_own_cache"


def layer_rows(num_layers: int, num_transformer_submodules: int) -> tuple[tuple[int, int], ...]:
    """For each cache layer, the (key, value) rows of the ``(num_layers * 2, ...)`` prefix table.

    Decoder-only and encoder-only models: layer ``i`` reads rows ``2i`` and ``2i+1``. Encoder-decoder
    models (``num_transformer_submodules=2``): Hugging Face PEFT doubles the table along the row axis and
    cuts it in groups of four (self key, self value, cross key, cross value), then drops the cross part;
    decoder layer ``i`` so reads rows ``4i mod 2L`` and ``4i+1 mod 2L``. Reproduced so that adapter files
    mean the same thing in both libraries.
    """
    rows = 2 * num_layers
    if num_transformer_submodules == 2:
        return tuple(((4 * i) % rows, (4 * i + 1) % rows) for i in range(num_layers))
    return tuple((2 * i, 2 * i + 1) for i in range(num_layers))


class PrefixEncoder(nn.Module):
    """The prefix as a ``(num_virtual_tokens, num_layers * 2 * token_dim)`` table.

    Trained with ``prefix_projection`` (and not in inference mode), the table is computed: ``embedding``
    is ``(n, token_dim)`` and ``transform`` the MLP that widens it. Otherwise ``embedding`` *is* the
    table, which is also what PEFT's adapter file stores under ``prompt_embeddings``.
    """

    def __init__(self, adapter_name: str, config: PrefixTuningConfig, runtime: AdapterRuntime,
                 encoder_decoder: bool, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        n, dim, layers = config.num_virtual_tokens, config.token_dim, config.num_layers
        width = layers * 2 * dim
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.transform: nn.Sequential | None
        if config.prefix_projection and not config.inference_mode:
            hidden = config.encoder_hidden_size or dim
            self.embedding = nn.Embedding(n, dim, **factory)
            self.transform = nn.Sequential(nn.Linear(dim, hidden, **factory), nn.Tanh(),
                                           nn.Linear(hidden, width, **factory))
            last: torch.Tensor | None = self.transform[-1].weight
        else:
            self.embedding = nn.Embedding(n, width, **factory)
            self.transform = None
            last = self.embedding.weight
        if config.init_weights == "zero":  # a prefix of zeros: the output starts as a no-op (PEFT's option)
            with torch.no_grad():
                last.zero_()
                if self.transform is not None:
                    self.transform[-1].bias.zero_()
        self.num_virtual_tokens: int = n
        self.num_heads = config.num_attention_heads
        self.head_dim = dim // config.num_attention_heads
        self.rows = layer_rows(layers, config.num_transformer_submodules or 1)
        self.adapter_name = adapter_name
        self.encoder_decoder = encoder_decoder
        self._runtime = runtime  # a plain attribute: the runtime belongs to the wrapping model

    def table(self) -> torch.Tensor:
        """The prefix, ``(num_virtual_tokens, num_layers * 2 * token_dim)``.

        The MLP runs once per call on the ``n`` virtual tokens, never once per batch row.
        """
        weight = self.embedding.weight
        return weight if self.transform is None else self.transform(weight)

    def key_values(self, dtype: torch.dtype) -> torch.Tensor:
        """The table as ``(num_layers * 2, heads, n, head_dim)``: a view, nothing copied."""
        flat = self.table().to(dtype)
        return flat.view(self.num_virtual_tokens, -1, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

    def fill(self, cache: Any, model: nn.Module, batch: int, dtype: torch.dtype) -> Any:
        """Put the prefix into ``cache`` (an empty transformers Cache), or into a new one when None.

        Each layer's keys and values are views of the one table expanded over the batch; the cache makes
        the only copy when it stores them.
        """
        from transformers import DynamicCache, EncoderDecoderCache

        if cache is None:
            config = getattr(model, "config", None)
            cache = DynamicCache(config=config)
            if self.encoder_decoder:  # the cross-attention half stays empty: the decoder fills it from the encoder
                cache = EncoderDecoderCache(cache, DynamicCache(config=config))
            setattr(cache, OWN_CACHE, True)
        target = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        kv = self.key_values(dtype)
        shape = (batch, self.num_heads, self.num_virtual_tokens, self.head_dim)
        for layer, (k, v) in enumerate(self.rows):
            target.update(kv[k].expand(shape), kv[v].expand(shape), layer)
        return cache

    def extra_repr(self) -> str:
        return (f"adapter={self.adapter_name!r}, num_virtual_tokens={self.num_virtual_tokens}, "
                f"layers={len(self.rows)}, heads={self.num_heads}, head_dim={self.head_dim}")
