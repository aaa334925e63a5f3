"""PromptEncoder: P-tuning's virtual tokens, computed by an MLP or LSTM from a trained embedding table."""

from __future__ import annotations

import torch
from peft_core.runtime import AdapterRuntime
from peft_prompt_tuning import PromptEmbedding
from torch import nn

from .config import PromptEncoderConfig

__all__ = ["PromptEncoder"]


class PromptEncoder(PromptEmbedding):
    """A :class:`~peft_prompt_tuning.PromptEmbedding` whose prompt is ``encoder(embedding.weight)``.

    Submodule names, shapes and creation order are Hugging Face PEFT's (``embedding``, then ``lstm_head``,
    then ``mlp_head``), so parameter names match and a seeded start draws the same numbers. In inference
    mode (an adapter loaded from a file) there is no encoder: ``embedding`` then holds the encoder's saved
    output, which is the prompt itself.

    The encoder runs on all ``num_virtual_tokens * num_transformer_submodules`` rows at batch 1, once per
    forward, and the first ``num_virtual_tokens`` rows are the prompt: the LSTM is bidirectional, so every
    row of its output depends on all rows (PEFT's rows, kept for its file, too).
    """

    def __init__(self, adapter_name: str, config: PromptEncoderConfig, runtime: AdapterRuntime,
                 encoder_decoder: bool, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(adapter_name, config, runtime, encoder_decoder, device, dtype)  # type: ignore[arg-type]
        dim, hidden = config.token_dim, config.encoder_hidden_size or config.token_dim
        factory = {"device": device, "dtype": dtype}
        self.encoder_type: str = config.encoder_reparameterization_type
        self.lstm_head: nn.LSTM | None = None
        self.mlp_head: nn.Sequential | None = None
        if config.inference_mode:
            return
        if self.encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(input_size=dim, hidden_size=hidden, num_layers=config.encoder_num_layers,
                                     dropout=config.encoder_dropout if config.encoder_num_layers > 1 else 0.0,
                                     bidirectional=True, batch_first=True, **factory)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden, **factory), nn.ReLU(),
                                          nn.Linear(2 * hidden, dim, **factory))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden, **factory), nn.ReLU(),
                                          nn.Linear(hidden, hidden, **factory), nn.ReLU(),
                                          nn.Linear(hidden, dim, **factory))

    @property
    def has_encoder(self) -> bool:
        return self.mlp_head is not None

    def encoded(self) -> torch.Tensor:
        """All ``(num_virtual_tokens * num_transformer_submodules, token_dim)`` rows of the prompt."""
        rows = self.embedding.weight
        if self.mlp_head is None:
            return rows
        if self.lstm_head is not None:
            rows = self.lstm_head(rows.unsqueeze(0))[0].squeeze(0)
        return self.mlp_head(rows)

    def prompt(self) -> torch.Tensor:
        return self.encoded()[: self.num_virtual_tokens]

    def extra_repr(self) -> str:
        kind = self.encoder_type if self.has_encoder else "none (inference: the saved prompt)"
        return f"{super().extra_repr()}, encoder={kind}"
