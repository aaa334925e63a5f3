"""P-tuning against Hugging Face PEFT 0.21 (the oracle): same seeded start (names, shapes, values), logits,
generation, files both ways, training, several adapters, composition with LoRA."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from conftest import (
    clone_state,
    greedy_by_forward,
    max_diff,
    model_inputs,
    state_equal,
    tiny_bert_cls,
    tiny_gpt2,
    tiny_gpt2_lively,
    tiny_llama,
    tiny_t5,
)
from peft_core import CheckpointError, LoraConfig, PeftModel, PromptEncoderConfig, get_peft_model

warnings.filterwarnings("ignore", message=".*will not detect padding tokens.*")
N = 4
CASES = {"llama": (tiny_llama, "CAUSAL_LM", "llama"), "gpt2": (tiny_gpt2, "CAUSAL_LM", "gpt2"),
         "t5": (tiny_t5, "SEQ_2_SEQ_LM", "t5"), "bert": (tiny_bert_cls, "SEQ_CLS", "bert"),
         "gpt2_lively": (tiny_gpt2_lively, "CAUSAL_LM", "gpt2")}


def pair(name: str, kind: str = "MLP", seed: int = 5, **kwargs):
    """(PEFT, ours), each built after the same seed: the starts must be bit-identical."""
    factory, task, _ = CASES[name]
    base_ref, base_ours = factory(), factory()
    torch.manual_seed(seed)
    ref = peft.get_peft_model(base_ref, peft.PromptEncoderConfig(
        task_type=task, num_virtual_tokens=N, encoder_reparameterization_type=kind, **kwargs))
    torch.manual_seed(seed)
    ours = get_peft_model(base_ours, PromptEncoderConfig(
        task_type=task, num_virtual_tokens=N, encoder_reparameterization_type=kind, **kwargs))
    return ref, ours


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
@pytest.mark.parametrize("name", ["llama", "gpt2", "t5", "bert"])
def test_same_start_and_logits_as_peft(name, kind):
    ref, ours = pair(name, kind)
    a, b = ref.prompt_encoder["default"].state_dict(), ours.adapter_modules["default"].state_dict()
    assert list(a) == list(b) and state_equal(a, b)
    x = model_inputs(CASES[name][2])
    with torch.no_grad():
        got, expected = ours(**x).logits, ref(**x).logits
        with ours.disable_adapter():
            base = ours(**x).logits
    assert max_diff(got, expected) <= 1e-5
    assert base.shape != got.shape or max_diff(base, got) > 1e-4


def test_print_trainable_parameters_equals_peft(capsys):
    for kind in ("MLP", "LSTM"):
        ref, ours = pair("llama", kind)
        ref.print_trainable_parameters()
        expected = capsys.readouterr().out
        ours.print_trainable_parameters()
        assert capsys.readouterr().out == expected


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_greedy_generate_matches_peft(kind):
    ref, ours = pair("gpt2_lively", kind)
    x = model_inputs("gpt2")
    expected = greedy_by_forward(ref, x, 5)
    got = ours.generate(**x, max_new_tokens=5, do_sample=False)[:, x["input_ids"].shape[1]:]
    assert torch.equal(got, expected)
    assert torch.equal(ours.generate(**x, max_new_tokens=5, do_sample=False, use_cache=False),
                       ref.generate(**x, max_new_tokens=5, do_sample=False, use_cache=False))


def test_seq2seq_generate_matches_peft():
    ref, ours = pair("t5", "LSTM")
    x = model_inputs("t5")
    x.pop("decoder_input_ids")
    assert torch.equal(ours.generate(**x, max_new_tokens=5, do_sample=False),
                       ref.generate(**x, max_new_tokens=5, do_sample=False))


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_files_load_both_ways(name, tmp_path):
    from safetensors.torch import load_file

    ref, ours = pair(name, "LSTM")
    factory = CASES[name][0]
    x = model_inputs(CASES[name][2])
    with torch.no_grad():
        expected = ours(**x).logits
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "peft")
    a, b = load_file(tmp_path / "ours" / "adapter_model.safetensors"), load_file(tmp_path / "peft" /
                                                                                 "adapter_model.safetensors")
    assert list(a) == ["prompt_embeddings"] and a.keys() == b.keys()
    assert a["prompt_embeddings"].shape == (N * (2 if name == "t5" else 1), 32)
    assert max_diff(a["prompt_embeddings"], b["prompt_embeddings"]) <= 1e-6
    by_peft = peft.PeftModel.from_pretrained(factory(), tmp_path / "ours")
    by_ours = PeftModel.from_pretrained(factory(), tmp_path / "peft")
    assert not any(p.requires_grad for p in by_ours.parameters())
    assert by_ours.adapter_modules["default"].mlp_head is None  # inference: the table, no encoder
    with torch.no_grad():
        assert max_diff(by_peft(**x).logits, expected) <= 1e-5
        assert max_diff(by_ours(**x).logits, expected) <= 1e-5
    with pytest.raises(CheckpointError, match="cannot resume training"):
        PeftModel.from_pretrained(factory(), tmp_path / "peft", is_trainable=True)


def test_training_lowers_loss_and_leaves_base_bit_identical():
    base = tiny_gpt2_lively()
    before = clone_state(base)
    model = get_peft_model(base, PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                                     encoder_reparameterization_type="LSTM",
                                                     encoder_dropout=0.1))
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    ids = torch.tensor([[3, 9, 27, 81, 3, 9, 27, 81]] * 2)
    labels = torch.full_like(ids, 7)
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert state_equal(before, clone_state(base))


def test_several_adapters_add_set_delete():
    ref, ours = pair("llama")
    x = model_inputs("llama")
    ours.add_adapter("lstm", PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=2,
                                                 encoder_reparameterization_type="LSTM"))
    with torch.no_grad():
        first = ours(**x).logits
        ours.set_adapter("lstm")
        second = ours(**x).logits
        assert second.shape[1] == 2 + x["input_ids"].shape[1]
        ours.delete_adapter("lstm")
        assert torch.equal(ours(**x).logits, first)
        assert max_diff(first, ref(**x).logits) <= 1e-5


def test_composes_with_lora():
    model = get_peft_model(tiny_llama(), PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    model.add_adapter("lora", LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"],
                                         init_lora_weights=False))
    model.set_adapter(["default", "lora"])
    x = model_inputs("llama")
    lora_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(task_type="CAUSAL_LM", r=4,
                                                                   target_modules=["q_proj", "v_proj"]))
    peft.set_peft_model_state_dict(lora_model, model.get_adapter_state_dict("lora"))
    ref = peft.get_peft_model(lora_model.merge_and_unload(), peft.PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, inference_mode=True))
    peft.set_peft_model_state_dict(ref, model.get_adapter_state_dict("default"))
    with torch.no_grad():
        assert max_diff(model(**x).logits, ref(**x).logits) <= 1e-5
