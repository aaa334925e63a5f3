"""Hooks the LoRA plugin publishes (through peft-core's ``add_hookspecs``), so that other plugins can extend
LoRA without editing it — documented to the standard of :mod:`peft_core.hookspecs`.

An *extension* of LoRA is a plugin in the ``peft_core.methods`` entry-point group that declares no method
and implements these hooks; it is found like any plugin, and may be installed before or after LoRA. A
quantized-layer package, for instance, teaches LoRA ``bitsandbytes.nn.Linear4bit``::

    # pyproject.toml
    [project.entry-points."peft_core.methods"]
    lora_4bit = "my_package:plugin"

    # my_package/__init__.py
    from peft_core import hookimpl
    from peft_lora import LoraLinear

    class Lora4bit:
        "LoRA on bitsandbytes Linear4bit layers."

        @hookimpl  # declare only the arguments you use: pluggy passes just those
        def lora_make_layer(self, module, runtime):
            if isinstance(module, bnb.nn.Linear4bit):
                return My4bitLoraLayer(module, runtime)
            return None

    plugin = Lora4bit()
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peft_core import hookspec

if TYPE_CHECKING:
    from peft_core.runtime import AdapterRuntime
    from torch import nn

    from .config import LoraConfig
    from .layers import LoraLayer
    from .variant import LoraVariant

__all__: list[str] = []  # the hook functions below are the contract


@hookspec(firstresult=True)
def lora_make_layer(module: nn.Module, path: str, runtime: AdapterRuntime, config: LoraConfig) -> LoraLayer | None:
    """Make the LoRA layer that wraps ``module``, or say this plugin does not handle its type.

    When: LoRA's ``inject``, once for each targeted module that is not a LoRA layer yet (a module already
    wrapped gets the new adapter added to its existing layer), before anything in the model changes: every
    target gets its layer first, so a module no plugin handles raises a TargetError with the model
    untouched. ``path`` is the module's path in the model (for messages); ``config`` the adapter's config.

    Returns (firstresult): a new :class:`peft_lora.LoraLayer` (usually a subclass of one of
    :mod:`peft_lora`'s public layers) whose ``base_layer`` is ``module``, with no adapter yet — LoRA then
    calls its ``add(...)`` and puts it into the model; or None to let the next implementation try.
    Extensions are asked before LoRA's own implementation (``trylast``), which handles ``torch.nn.Linear``,
    transformers' ``Conv1D``, ``torch.nn.Embedding``, ``torch.nn.Conv1d/2d/3d`` (grouped too) and
    ``torch.nn.MultiheadAttention`` with floating-point weights.
    When every implementation returns None, LoRA raises a TargetError naming the module and its type.

    Example::

        @hookimpl
        def lora_make_layer(module, runtime):
            if isinstance(module, torch.nn.Conv1d):
                return LoraConv1d(module, runtime)
            return None
    """


@hookspec(firstresult=True)
def lora_variant(config: LoraConfig, layer: LoraLayer, path: str) -> LoraVariant | None:
    """Choose the variant of LoRA (DoRA, say) that one adapter uses on one layer, or None for plain LoRA.

    When: LoRA's ``inject``, once per targeted layer for the adapter being added, after every layer exists
    and before any adapter is added (so a refusal leaves the model untouched). ``layer`` is the LoRA layer
    (new or existing), ``path`` its path in the model, ``config`` the adapter's config.

    Returns (firstresult): a :class:`peft_lora.variant.LoraVariant`, which the layer stores (its module under
    ``<variant.attr>.<adapter>``, trained and saved with the adapter) and calls in forward and merge; or
    None to let the next implementation answer. LoRA's own implementation runs last and answers
    :class:`peft_lora.dora.Dora` for ``use_dora=True``. Raise a TargetError for a layer the variant
    cannot handle. Extensions claim their adapters by a config field they read (a ``LoraConfig`` subclass
    of their own, or one of LoRA's fields); a variant answering for one of LoRA's *variant fields*
    (``LoraConfig.variant_fields``, ``variant_inits``) names it in its ``claims``, and LoRA refuses a set
    variant field that the chosen variant does not claim (see :mod:`peft_lora.variant`).

    Example::

        @hookimpl
        def lora_variant(config, layer):
            if isinstance(config, MyVariantConfig):
                return MY_VARIANT  # attr, create(layer, name), forward(...), merged_weight(layer, name)
            return None
    """
