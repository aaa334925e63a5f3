"""The LoRA *variant* protocol: what a variant (DoRA, or a third party's) implements so that LoRA's layers
run it for the adapters it claims. LoRA's ``lora_variant`` hook (:mod:`peft_lora.hookspecs`) picks the
variant of each adapter on each layer; the layer then stores the variant's module, declares its
parameters (so the core trains, saves and counts them) and calls it in forward and merge.

Claiming config fields. Some of :class:`~peft_lora.LoraConfig`'s fields ask for a variant when set
(``LoraConfig.variant_fields``: ``use_dora``, ``use_bdlora``, ``kasa_config``, ``velora_config``; and
``init_lora_weights`` at a value of ``LoraConfig.variant_inits``, ``"mica"``). A variant names the fields it
implements in its optional ``claims`` attribute (DoRA: ``frozenset({"use_dora"})``; for ``init_lora_weights``
the claim is the field name). LoRA's ``inject`` checks, before the model changes, that on every targeted layer
the variant chosen claims every such field the config sets (:func:`check_claims`): a field no installed plugin
implements, or two variants set at once, is a :class:`~peft_core.errors.ConfigError` naming the field —
never a silently plain LoRA. A variant that claims ``init_lora_weights`` initialises A and B itself (in
``create``): LoRA leaves them as the layer's factories made them.

Frozen adapter tensors. A variant may keep some of the adapter's own tensors frozen (MiCA's B): its optional
``frozen(layer, name)`` names them (relative to the layer, as ``adapter_parameters`` keys them); the layer then
declares them as ``adapter_state`` (saved, never trained) instead of ``adapter_parameters``, and so do the
buffers of the variant's module (:func:`variant_state`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from peft_core.config import short_repr
from peft_core.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .config import LoraConfig
    from .layers import LoraLayer

__all__ = ["LoraVariant", "check_claims", "requested_variant_fields", "trained_only", "variant_state"]


@runtime_checkable
class LoraVariant(Protocol):
    """A change to how one adapter's A and B act on one layer.

    Optional members (read with ``getattr``; see the module docstring): ``claims: frozenset[str]``, the
    config fields it implements; ``frozen(layer, name) -> Collection[str]``, adapter tensors it keeps frozen.
    """

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


#: Who implements the variant fields LoRA does not (for the "install" hint).
_IMPLEMENTED_BY = {"use_bdlora": "BD-LoRA", "kasa_config": "KaSA", "velora_config": "VeLoRA",
                   "init_lora_weights": "MiCA"}


def requested_variant_fields(config: LoraConfig) -> tuple[str, ...]:
    """The fields of ``config`` that ask for a variant (set: not None/False; ``init_lora_weights`` when its
    value is a variant's)."""
    fields = [f for f in config.variant_fields if getattr(config, f) not in (None, False)]
    if isinstance(config.init_lora_weights, str) and config.init_lora_weights in config.variant_inits:
        fields.append("init_lora_weights")
    return tuple(fields)


def _shown(config: LoraConfig, field: str) -> str:
    return f"{field}={short_repr(getattr(config, field))}"


def check_claims(config: LoraConfig, variants: Mapping[str, LoraVariant | None]) -> None:
    """ConfigError unless, on every layer (``path -> chosen variant``), the variant claims every variant field
    ``config`` sets. Called by LoRA's ``inject`` after choosing the variants and before changing the model."""
    wanted = requested_variant_fields(config)
    if not wanted:
        return  # plain LoRA, or a third party's variant chosen by criteria of its own
    if config.target_parameters:  # LoraParameter layers (nn.Parameter targets) take no variant, as in PEFT
        raise ConfigError(f"LoraConfig.target_parameters cannot be combined with {_shown(config, wanted[0])}: LoRA on "
                          "an nn.Parameter has no variants (nor in Hugging Face PEFT); train those parameters in a "
                          "separate adapter")
    for path, variant in variants.items():
        claimed: Collection[str] = getattr(variant, "claims", frozenset()) if variant is not None else ()
        missing = [f for f in wanted if f not in claimed]
        if not missing:
            continue
        field = missing[0]
        if variant is None:
            who = _IMPLEMENTED_BY.get(field)
            hint = (f" {who} is implemented by peft-core's lora_variants extension: check that it is installed and "
                    "that PEFT_CORE_PLUGINS does not exclude lora_variants" if who else "")
            raise ConfigError(f"LoraConfig.{_shown(config, field)} asks for a LoRA variant that no installed plugin "
                              f"implements (module {path!r} got plain LoRA).{hint}")
        raise ConfigError(f"LoraConfig.{_shown(config, field)} cannot be combined with "
                          f"{', '.join(sorted(f for f in wanted if f in claimed)) or 'the variant chosen'}: module "
                          f"{path!r} got {type(variant).__name__}, which does not implement {field} (each adapter "
                          "has one LoRA variant, as in Hugging Face PEFT); use separate adapters")


def _frozen(layer: LoraLayer, name: str) -> Collection[str]:
    variant = layer.variants.get(name)
    frozen = getattr(variant, "frozen", None)
    return frozen(layer, name) if frozen is not None else ()


def trained_only(layer: LoraLayer, name: str, params: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
    """``params`` (an ``adapter_parameters`` answer) less what ``name``'s variant keeps frozen."""
    frozen = _frozen(layer, name)
    return {k: v for k, v in params.items() if k not in frozen} if frozen else params


def variant_state(layer: LoraLayer, name: str) -> dict[str, Any]:
    """``name``'s frozen tensors on ``layer`` (its ``adapter_state``): what the variant keeps frozen, and the
    buffers of the variant's module (VeLoRA's projection), keyed relative to the layer."""
    variant = layer.variants.get(name)
    if variant is None:
        return {}
    out = {rel: layer.get_parameter(rel) for rel in _frozen(layer, name)}
    module = getattr(layer, variant.attr)[name]
    out.update({f"{variant.attr}.{name}.{k}": b for k, b in module.named_buffers()})
    return out
