"""TRL's ``SFTTrainer`` and ``DPOTrainer`` for peft-core models.

TRL special-cases Hugging Face PEFT's ``PeftModel`` (through ``accelerate.utils.is_peft_model``): it patches its
fused LM head onto the *inner* transformers model, enables input grads under gradient checkpointing, and DPO
takes the policy with its adapters disabled as the reference instead of loading a second model. For any other
model it takes the full-model paths, which fail for a peft-core model (the fused head is patched onto the
wrapper, whose output has no ``last_hidden_state``; DPO tries to load a reference model from the hub).

The trainers here are TRL's, with :class:`~peft_core.integrations.transformers.AdapterTrainerMixin` (adapter-only
checkpoints, resume, best model) and with TRL shown a peft-core model as a PEFT model: while their own methods
run, the TRL module's ``is_peft_model`` also answers yes for a peft-core model, and its ``use_adapter`` uses
peft-core's ``disable_adapter`` / ``set_adapter``, so Hugging Face PEFT need not be installed::

    from peft_core import LoraConfig, get_peft_model
    from peft_core.integrations.trl import SFTTrainer

    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM"))
    SFTTrainer(model=model, args=SFTConfig(...), train_dataset=data).train()

``peft_config=`` may also be a peft-core config: the trainer wraps the model with it first, as TRL does with
PEFT's configs. Nothing is changed for other trainers or models: the names are swapped back when each call
returns.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

try:
    import trl
    import trl.trainer.dpo_trainer as _trl_dpo
    import trl.trainer.sft_trainer as _trl_sft
except ImportError as e:  # pragma: no cover - exercised only without trl
    raise ImportError("peft_core.integrations.trl needs TRL: pip install peft-core[trl]") from e

from ..config import PeftConfig
from ..layers import is_adapter_layer
from ..model import AdaptedModel
from .transformers import AdapterTrainerMixin, _unwrap

__all__ = ["DPOTrainer", "SFTTrainer"]

#: the names of a TRL trainer module that a peft-core view replaces while one of our trainers' methods runs
_SWAPPED = ("is_peft_model", "use_adapter", "BaseTunerLayer", "LoraConfig")
_MISSING = object()
#: per TRL module (by id): its own values of _SWAPPED while a view is held, and how many holds are open
_ORIGINALS: dict[int, dict[str, Any]] = {}
_DEPTH: dict[int, int] = {}


class _NeverMatches:
    """Stands in for the PEFT classes TRL checks with ``isinstance`` where PEFT is not installed."""


def _peft_core_model(model: Any) -> AdaptedModel | None:
    inner = _unwrap(model) if isinstance(model, torch.nn.Module) else None
    return inner if isinstance(inner, AdaptedModel) else None


@contextlib.contextmanager
def _use_adapter(model: Any, adapter_name: str | None) -> Iterator[None]:
    """TRL's ``use_adapter`` for a peft-core model: no name disables the adapters, a name activates that one."""
    adapted = _peft_core_model(model)
    if adapted is None:
        with _ORIGINALS[id(_trl_dpo)]["use_adapter"](model, adapter_name):
            yield
        return
    if adapter_name is None:
        with adapted.disable_adapter():
            yield
        return
    previous = adapted.active_adapter
    adapted.set_adapter(adapter_name)
    try:
        yield
    finally:
        adapted.set_adapter(previous)


@contextlib.contextmanager
def _peft_view(module: types.ModuleType) -> Iterator[None]:
    """While it is held, ``module``'s ``is_peft_model`` answers yes for peft-core models too (and its ``use_adapter``
    handles them). Re-entrant; restores the module's own names when the outermost hold ends."""
    key = id(module)
    if _DEPTH.get(key, 0) == 0:
        saved = {name: module.__dict__.get(name, _MISSING) for name in _SWAPPED}
        _ORIGINALS[key] = saved
        original_is_peft = saved["is_peft_model"]
        if original_is_peft is _MISSING:  # a TRL that stopped importing it: PEFT's own models still count
            from accelerate.utils import is_peft_model as original_is_peft

        def is_peft_model(model: Any) -> bool:
            return _peft_core_model(model) is not None or bool(original_is_peft(model))

        module.is_peft_model = is_peft_model
        if saved["use_adapter"] is not _MISSING:
            module.use_adapter = _use_adapter
        for name in ("BaseTunerLayer", "LoraConfig"):
            if saved[name] is _MISSING:
                setattr(module, name, _NeverMatches)
    _DEPTH[key] = _DEPTH.get(key, 0) + 1
    try:
        yield
    finally:
        _DEPTH[key] -= 1
        if _DEPTH[key] == 0:
            for name, value in _ORIGINALS.pop(key).items():
                if value is _MISSING:
                    module.__dict__.pop(name, None)
                else:
                    setattr(module, name, value)


def _in_view(module: types.ModuleType) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def inner(*args: Any, **kwargs: Any) -> Any:
            with _peft_view(module):
                return method(*args, **kwargs)
        return inner
    return wrap


def _wrap_with_peft_core(model: Any, peft_config: Any) -> tuple[Any, Any]:
    """A peft-core ``peft_config`` wraps the model here (TRL only knows PEFT's configs); PEFT's pass through."""
    if isinstance(peft_config, PeftConfig):
        if _peft_core_model(model) is not None:
            raise ValueError("got a peft-core model and a peft_config: pass one of them (the model already has "
                             "its adapter)")
        if isinstance(model, str):
            raise TypeError("with a peft-core peft_config, pass the base model itself, not its name")
        from ..peft_model import get_peft_model

        model, peft_config = get_peft_model(model, peft_config), None
    adapted = _peft_core_model(model)
    if adapted is not None and is_adapter_layer(adapted.get_base_model().get_output_embeddings()):
        # TRL's fused head multiplies by lm_head.weight itself (its own check knows only PEFT's layers): an adapter
        # there would neither count in the loss nor train
        raise ValueError("an adapter on the LM head (lm_head) is not supported by TRL's trainers: they compute the "
                         "log-probabilities from lm_head.weight directly; remove it from target_modules")
    return model, peft_config


class SFTTrainer(AdapterTrainerMixin, trl.SFTTrainer):
    """TRL's ``SFTTrainer`` for peft-core models: TRL's PEFT paths (fused LM head on the inner model, input grads
    under gradient checkpointing) and adapter-only checkpoints."""

    def __init__(self, model: Any, *args: Any, peft_config: Any = None, **kwargs: Any) -> None:
        model, peft_config = _wrap_with_peft_core(model, peft_config)
        with _peft_view(_trl_sft):
            super().__init__(model, *args, peft_config=peft_config, **kwargs)


class DPOTrainer(AdapterTrainerMixin, trl.DPOTrainer):
    """TRL's ``DPOTrainer`` for peft-core models: without ``ref_model``, the reference is the policy with its
    adapters disabled (``model.disable_adapter()``), as TRL does for a model it wraps from a PEFT config; no second
    model or adapter is held."""

    def __init__(self, model: Any, ref_model: Any = None, *args: Any, peft_config: Any = None,
                 **kwargs: Any) -> None:
        model, peft_config = _wrap_with_peft_core(model, peft_config)
        adapted = _peft_core_model(model)
        had_ref = adapted is not None and "ref" in adapted.peft_config
        if had_ref:
            raise ValueError("the model already has an adapter named 'ref'; TRL adds its own reference adapter under "
                             "that name: rename it")
        # TRL copies a pre-wrapped PEFT model's adapter into a frozen "ref" adapter and uses it as the reference;
        # peft-core's reference is the base itself (disable_adapter), as for a model TRL wraps from a peft_config,
        # so that copy is dropped as soon as TRL has made it: before any precomputed reference, and for training
        self._peft_core_drop_ref = adapted is not None and ref_model is None
        with _peft_view(_trl_dpo):
            super().__init__(model, ref_model, *args, peft_config=peft_config, **kwargs)
        self._drop_trl_ref_adapter()

    def _drop_trl_ref_adapter(self) -> None:
        adapted = _peft_core_model(self.model)
        if self._peft_core_drop_ref and adapted is not None and "ref" in adapted.peft_config:
            adapted.delete_adapter("ref")
        self._peft_core_drop_ref = False

    @_in_view(_trl_dpo)
    def _precompute_ref_logps(self, *args: Any, **kwargs: Any) -> Any:
        self._drop_trl_ref_adapter()
        return super()._precompute_ref_logps(*args, **kwargs)

    compute_ref_log_probs = _in_view(_trl_dpo)(trl.DPOTrainer.compute_ref_log_probs)
    _compute_loss = _in_view(_trl_dpo)(trl.DPOTrainer._compute_loss)
    evaluate = _in_view(_trl_dpo)(trl.DPOTrainer.evaluate)
