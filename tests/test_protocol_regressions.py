"""The three failures that the adapter-layer protocol fixed, as a new user met them (each test failed on the
main branch before the protocol): mixed-precision training crashed, a second adapter froze the biases the
first one trained, and a mixed batch through a Conv2d LoRA computed a row with the wrong adapter.

Only names that existed before the protocol are used, so the file runs against the older code too.
"""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import model_inputs, tiny_bert_cls, tiny_llama
from peft_core import LoraConfig, get_peft_model
from torch import nn


def _trainable_biases(model: nn.Module) -> int:
    return sum(p.requires_grad for n, p in model.named_parameters() if n.endswith("bias") and "lora_" not in n)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_trains_under_bf16_autocast_like_peft(dropout):
    torch.manual_seed(0)
    cfg = {"target_modules": ["q_proj", "v_proj"], "lora_dropout": dropout, "init_lora_weights": False}
    ours = get_peft_model(tiny_llama(), LoraConfig(**cfg))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**cfg))
    peft.set_peft_model_state_dict(theirs, ours.get_adapter_state_dict())
    ids = model_inputs("llama")["input_ids"]
    losses = []
    for model in (ours, theirs):
        model.eval()  # same dropout-free numbers on both sides; the train-mode step below runs the dropout path
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses.append(model(input_ids=ids, labels=ids).loss.float())
    assert abs(losses[0].item() - losses[1].item()) < 2e-2
    ours.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ours(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in ours.named_parameters() if p.requires_grad]
    assert len(grads) == 8 and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_adding_an_adapter_keeps_the_active_adapters_biases_trainable():
    ours = get_peft_model(tiny_bert_cls(), LoraConfig(bias="all", target_modules=["query", "value"]))
    theirs = peft.get_peft_model(tiny_bert_cls(), peft.LoraConfig(bias="all", target_modules=["query", "value"]))
    trained = _trainable_biases(ours)
    assert trained == _trainable_biases(theirs) > 10
    ours.add_adapter("other", LoraConfig(target_modules=["query"]))
    theirs.add_adapter("other", peft.LoraConfig(target_modules=["query"]))
    assert _trainable_biases(ours) == _trainable_biases(theirs) == trained  # it was 0 here before
    ours.set_adapter("other")  # the bias-training adapter is no longer active: its biases freeze
    assert _trainable_biases(ours) == 0
    ours.set_adapter("default")
    assert _trainable_biases(ours) == trained
    ours.set_adapter(["default", "other"])
    ours.delete_adapter("other")  # deleting another adapter leaves them alone
    assert _trainable_biases(ours) == trained
    # inference_mode adapters train nothing, their claims included
    frozen = get_peft_model(tiny_bert_cls(), LoraConfig(bias="all", target_modules=["query"], inference_mode=True))
    assert _trainable_biases(frozen) == 0


def test_lora_only_bias_claims_survive_a_second_adapter_on_the_same_layer():
    model = get_peft_model(tiny_bert_cls(), LoraConfig(target_modules=["query"], bias="lora_only"))
    names = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("base_layer.bias")}
    assert len(names) == 2
    model.add_adapter("b", LoraConfig(target_modules=["query", "key"]))  # wraps query again, key anew
    assert {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("base_layer.bias")} == names


def test_conv2d_mixed_batch_rows_use_their_own_adapter():
    model = get_peft_model(ConvNet(), LoraConfig(target_modules=["conv"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(target_modules=["conv"], init_lora_weights=False, r=2))
    model.eval()
    x = torch.randn(3, 3, 6, 6)
    mixed = model(x, adapter_names=["default", "b", "__base__"])
    expected = []
    for i, name in enumerate(["default", "b"]):
        model.set_adapter(name)
        expected.append(model(x[i:i + 1]))
    with model.disable_adapter():
        expected.append(model(x[2:]))
    assert (mixed - torch.cat(expected)).abs().max() < 1e-6


