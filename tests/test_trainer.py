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


def test_mixin_loads_the_best_adapter_and_gives_lora_gradients_under_checkpointing(tmp_path):
    """AdapterTrainerMixin on a user's own Trainer subclass: load_best_model_at_end loads the best checkpoint's
    adapter, and with gradient_checkpointing=True the LoRA weights still get gradients."""
    from peft_core import LoraConfig, get_peft_model
    from peft_core.integrations.transformers import AdapterTrainerMixin
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class MyTrainer(AdapterTrainerMixin, Trainer):
        pass

    class Probe(TrainerCallback):
        norms: dict[str, float] = {}

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if not self.norms:
                self.norms = {n: float(p.grad.norm()) if p.grad is not None else 0.0
                              for n, p in model.named_parameters() if p.requires_grad}

    model = get_peft_model(tiny_gpt2(), LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False))
    probe = Probe()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, save_steps=2,
                             eval_steps=2, eval_strategy="steps", load_best_model_at_end=True, report_to=[],
                             use_cpu=True, learning_rate=1e-2, seed=0, disable_tqdm=True,
                             gradient_checkpointing=True, metric_for_best_model="loss", greater_is_better=False)
    trainer = MyTrainer(model=model, args=args, train_dataset=Copy(), eval_dataset=Copy(), callbacks=[probe])
    # from construction on (the Trainer's own call, for text models, comes only in train()), the frozen
    # embeddings' output requires grad, so reentrant checkpointing passes gradients to the adapters inside
    assert model.get_input_embeddings()(torch.tensor([[3, 4]])).requires_grad
    trainer.train()
    assert probe.norms and all(v > 0 for v in probe.norms.values())
    best = trainer.state.best_model_checkpoint
    assert best is not None
    from peft_core.serialization import load_weights

    saved = load_weights(os.path.join(best, "adapter_model.safetensors"))
    with torch.no_grad():  # spoil the weights: loading the best checkpoint must bring them back
        for p in model.parameters():
            if p.requires_grad:
                p.zero_()
    trainer._load_best_model()
    now = model.get_adapter_state_dict()
    assert saved.keys() == now.keys()
    for k in saved:
        torch.testing.assert_close(now[k], saved[k])
