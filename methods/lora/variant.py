"""The LoRA *variant* protocol: what a variant (DoRA, or a third party's) implements so that LoRA's layers
run it for the adapters it claims. LoRA's ``lora_variant`` hook (:mod:`peft_lora.hookspecs`) picks the
variant of each adapter on each layer; the layer then stores the variant's module, declares its
parameters (so the core trains, saves and counts them) and calls it in forward and merge."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .layers import LoraLayer

__all__ = ["LoraVariant"]


@runtime_checkable
class LoraVariant(Protocol):
    """A change to how one adapter's A and B act on one layer."""

    #: The layer attribute (an ``nn.ModuleDict`` by adapter name) holding the variant's per-adapter module;
    #: its parameters are the adapter's, named ``<attr>.<adapter>.<param>`` (DoRA: ``lora_magnitude_vector``).
    attr: str

    def create(self, layer: LoraLayer, name: str) -> nn.Module:
        """The per-adapter module, built after A and B are initialised (DoRA reads ``W + s B A``)."""
        ...

    def forward(self, layer: LoraLayer, name: str, x: torch.Tensor, result: torch.Tensor, base: torch.Tensor,
                p: float) -> torch.Tensor:
        """``result`` with this adapter applied. ``base`` is the base layer's own output for ``x`` without its
        bias (before any adapter); ``p`` the dropout rate to apply (0 in eval)."""
        ...

    def merged_weight(self, layer: LoraLayer, name: str) -> torch.Tensor:
        """The base weight with this adapter folded in (fp32, the base weight's layout); merging writes it
        with :func:`peft_core.merging.replace_exactly`, so unmerging restores the exact bits."""
        ...
