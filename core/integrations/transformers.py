"""The transformers ``Trainer``, taught to checkpoint adapters.

``transformers.Trainer`` trains a peft-core model as it is, but it only checkpoints "its own" model
classes (``PreTrainedModel`` and Hugging Face PEFT's ``PeftModel``) by their ``save_pretrained``; any
other model is written as one full state dict — every frozen base weight included — which safetensors
also refuses for models with tied weights (GPT-2, T5). :class:`AdapterTrainer` is a drop-in subclass
that checkpoints exactly what ``save_pretrained`` writes (adapter files only, PEFT's format) and resumes
from such checkpoints::

    from peft_core.integrations.transformers import AdapterTrainer as Trainer
"""

from __future__ import annotations

import os
from typing import Any

import torch
import transformers

from ..errors import CheckpointError
from ..model import AdaptedModel
from ..serialization import SAFETENSORS_NAME, WEIGHTS_NAME, load_weights

__all__ = ["AdapterTrainer"]

_TRAINING_ARGS_NAME = "training_args.bin"


class AdapterTrainer(transformers.Trainer):
    """``transformers.Trainer`` whose checkpoints of a peft-core model hold only the adapter(s)."""

    #: Read by AdaptedModel: a Trainer with this mark checkpoints adapters, so the stock-Trainer warning is not given.
    _peft_core_adapter_checkpoints = True

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
