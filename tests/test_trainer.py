"""Training with the transformers Trainer: adapter-only checkpoints, and resuming from them."""

from __future__ import annotations

import os

import torch
from conftest import tiny_gpt2
from torch.utils.data import Dataset


class Copy(Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = (torch.arange(2, 18) + i) % 120 + 2
        return {"input_ids": ids, "labels": ids}


def _trainer(output_dir, max_steps: int):
    from peft_core import LoraConfig, get_peft_model
    from peft_core.integrations.transformers import AdapterTrainer
    from transformers import TrainingArguments

    model = get_peft_model(tiny_gpt2(), LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False))
    args = TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=max_steps,
                             save_steps=2, report_to=[], use_cpu=True, learning_rate=1e-2, seed=0,
                             dataloader_num_workers=0, logging_steps=1, disable_tqdm=True)
    return model, AdapterTrainer(model=model, args=args, train_dataset=Copy())


def adapter(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.get_adapter_state_dict().items()}


def test_checkpoints_hold_only_the_adapter_and_resume(tmp_path):
    model, trainer = _trainer(tmp_path / "run", 4)
    before = adapter(model)
    trainer.train()
    trained = adapter(model)
    assert any(not torch.equal(before[k], trained[k]) for k in trained)
    ckpt = tmp_path / "run" / "checkpoint-2"
    files = set(os.listdir(ckpt))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}
    assert os.path.getsize(ckpt / "adapter_model.safetensors") < 64 * 1024  # adapter only: no base weights

    resumed_model, resumed = _trainer(tmp_path / "run", 4)
    resumed.train(resume_from_checkpoint=str(ckpt))
    again = adapter(resumed_model)
    for k in trained:
        torch.testing.assert_close(again[k], trained[k], rtol=1e-4, atol=1e-5)


def test_plain_signature_keeps_dataset_columns():
    """The Trainer keeps the dataset columns the base model's forward takes (it inspects model.forward)."""
    import inspect

    from peft_core import LoraConfig, get_peft_model

    model = get_peft_model(tiny_gpt2(), LoraConfig(task_type="CAUSAL_LM"))
    params = inspect.signature(model.forward).parameters
    assert {"input_ids", "attention_mask", "labels", "adapter_names"} <= set(params)


def test_the_stock_trainer_is_warned_about_at_construction_not_at_the_first_checkpoint(tmp_path):
    """transformers.Trainer knows only PreTrainedModel and PEFT's PeftModel: given a peft-core model it saves the whole
    state dict, which fails on GPT-2's tied embeddings at the first checkpoint. The user hears it before training."""
    import warnings

    import pytest
    from peft_core import LoraConfig, get_peft_model
    from peft_core.integrations.transformers import AdapterTrainer
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_gpt2(), LoraConfig(task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, disable_tqdm=True)
    with pytest.warns(UserWarning, match=r"Trainer .*does not know peft-core models.*AdapterTrainer"):
        Trainer(model=model, args=args, train_dataset=Copy())

    class MyTrainer(AdapterTrainer):  # a user's subclass of the integration is not warned about
        pass

    for cls in (AdapterTrainer, MyTrainer):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*does not know peft-core models")
            cls(model=model, args=args, train_dataset=Copy())
    # the attribute the Trainer reads is the base model's, as before
    assert model.is_distributed_loading_by_transformers is False
