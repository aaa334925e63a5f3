"""The transformers ``Trainer``, taught to checkpoint adapters.

``transformers.Trainer`` trains a peft-core model as it is, but it only checkpoints "its own" model
classes (``PreTrainedModel`` and Hugging Face PEFT's ``PeftModel``) by their ``save_pretrained``; any
other model is written as one full state dict — every frozen base weight included — which safetensors
also refuses for models with tied weights (GPT-2, T5). :class:`AdapterTrainer` is a drop-in subclass
that checkpoints exactly what ``save_pretrained`` writes (adapter files only, PEFT's format) and resumes
from such checkpoints::

    from peft_core.integrations.transformers import AdapterTrainer as Trainer

It also drives the adapters' training-step schedules: after each optimiser step (before the gradients are
zeroed) it calls ``model.on_optimizer_step(state.global_step)`` through a ``TrainerCallback``, so AdaLoRA's
rank allocation runs during ``train()`` without the user calling anything.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import transformers

from ..errors import CheckpointError
from ..model import AdaptedModel
from ..serialization import SAFETENSORS_NAME, WEIGHTS_NAME, load_weights

__all__ = ["AdapterTrainer", "AdapterTrainerMixin", "OptimizerStepCallback"]

_TRAINING_ARGS_NAME = "training_args.bin"


class OptimizerStepCallback(transformers.TrainerCallback):
    """Calls ``model.on_optimizer_step(state.global_step)`` after each optimiser step, before ``zero_grad``.

    transformers fires ``on_optimizer_step`` right after ``optimizer.step()``, while the gradients are still
    there, and increments ``state.global_step`` only after zeroing them: the index passed is the 0-based index
    of the step just taken, as in a plain loop. :class:`AdapterTrainer` adds it; a stock ``Trainer`` can too
    (``callbacks=[OptimizerStepCallback()]``)."""

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: torch.nn.Module | None = None,
                          **kwargs: Any) -> None:
        inner = _unwrap(model)
        if isinstance(inner, AdaptedModel):
            inner.on_optimizer_step(state.global_step)


def _unwrap(model: torch.nn.Module | None) -> torch.nn.Module | None:
    """The model inside DDP/DataParallel-style wrappers (``.module``) and torch.compile (``._orig_mod``)."""
    seen = 0
    while model is not None and not isinstance(model, AdaptedModel) and seen < 8:
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        seen += 1
    return model


class AdapterTrainerMixin:
    """Teaches any ``transformers.Trainer`` subclass (TRL's trainers included) what it does for PEFT's
    ``PeftModel``, for a peft-core model: checkpoints hold only the adapter(s) (what ``save_pretrained``
    writes), ``resume_from_checkpoint`` and ``load_best_model_at_end`` load them back, the adapters'
    ``on_optimizer_step`` schedules run (:class:`OptimizerStepCallback`), and under
    ``gradient_checkpointing=True`` the embeddings' output requires grad, so that a frozen, checkpointed
    base still passes gradients to the adapters. Put it first in the bases::

        class MyTrainer(AdapterTrainerMixin, SomeTrainer): ...

    For any other model every override hands over to the Trainer's own behaviour."""

    #: Read by AdaptedModel: a Trainer with this mark checkpoints adapters, so the stock-Trainer warning is not given.
    _peft_core_adapter_checkpoints = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_callback(OptimizerStepCallback())
        adapted = self._adapted()
        if adapted is not None and self.args.label_names is None:
            # the Trainer reads the label names off the model class's forward (unwrapping only PEFT's PeftModel);
            # peft-core's wrapper forwards generic arguments, so ask the base model's class. Without them
            # evaluation reports no eval_loss, and load_best_model_at_end has no metric to pick by.
            from transformers.utils import find_labels

            self.label_names = find_labels(type(adapted.get_base_model()))
        checkpointing = getattr(self.args, "activation_checkpointing", None) or self.args.gradient_checkpointing
        if adapted is not None and checkpointing:
            # transformers only does this for its own PEFT integration; without it the checkpointed blocks see
            # inputs that need no grad and, with the base frozen, the adapters inside them get none
            adapted.enable_input_require_grads()

    def _adapted(self, model: torch.nn.Module | None = None) -> AdaptedModel | None:
        inner = self.accelerator.unwrap_model(model if model is not None else self.model)
        return inner if isinstance(inner, AdaptedModel) else None

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        adapted = self._adapted()
        if adapted is None:
            super()._save(output_dir, state_dict)
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        # every rank calls save_pretrained: FSDP-sharded adapters are gathered collectively; only the
        # saving rank writes
        adapted.save_pretrained(output_dir, is_main_process=self.args.should_save)
        if not self.args.should_save:
            return
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, _TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        adapted = self._adapted(model)
        if adapted is None:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        found = 0
        for name in adapted.peft_config:
            folder = resume_from_checkpoint if name == "default" else os.path.join(resume_from_checkpoint, name)
            for filename in (SAFETENSORS_NAME, WEIGHTS_NAME):
                path = os.path.join(folder, filename)
                if os.path.isfile(path):
                    adapted.load_adapter_state_dict(name, load_weights(path), source=path)
                    found += 1
                    break
        if not found:
            raise CheckpointError(f"{resume_from_checkpoint}: no adapter files for {list(adapted.peft_config)}; "
                                  "was it written by AdapterTrainer (or save_pretrained)?")

    def _load_best_model(self) -> None:
        if self._adapted() is None or self.state.best_model_checkpoint is None:
            super()._load_best_model()
            return
        self._load_from_checkpoint(self.state.best_model_checkpoint)


class AdapterTrainer(AdapterTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` with :class:`AdapterTrainerMixin`: checkpoints of a peft-core model hold only the
    adapter(s), and the adapters' ``on_optimizer_step`` schedules run (:class:`OptimizerStepCallback`)."""
