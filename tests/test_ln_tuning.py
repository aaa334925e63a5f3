"""The built-in LN-tuning plugin against Hugging Face PEFT 0.21 (an oracle only): logits, files both ways, merge,
several adapters, training, and the refusals."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from conftest import MODELS, clone_state, model_inputs, state_equal
from peft_core import AdapterError, LNTuningConfig, MergeError, PeftModel, TargetError, get_peft_model
from torch import nn

TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM", "bert": "SEQ_CLS"}
TARGETS = {"bert": ["LayerNorm"]}  # PEFT has no LN-tuning defaults for BERT


def _logits(model: nn.Module, name: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**model_inputs(name)).logits


def _perturb(model: nn.Module, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "ln_tuning_layers" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _pair(name: str):
    kw = {"target_modules": TARGETS[name]} if name in TARGETS else {}
    ref = peft.get_peft_model(MODELS[name](), peft.LNTuningConfig(task_type=TASK[name], **kw))
    _perturb(ref)
    ours = get_peft_model(MODELS[name](), LNTuningConfig(task_type=TASK[name], **kw))
    ours.load_adapter_state_dict("default", {k: v.clone() for k, v in peft.get_peft_model_state_dict(ref).items()})
    return ref, ours


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5", "bert"])
def test_logits_files_and_config_match_peft(name, tmp_path):
    ref, ours = _pair(name)
    assert torch.allclose(_logits(ref, name), _logits(ours, name), atol=1e-5)
    assert not torch.allclose(_logits(ours, name), _logits(MODELS[name](), name), atol=1e-3)
    assert set(ours.get_adapter_state_dict("default")) == set(peft.get_peft_model_state_dict(ref))
    ref.save_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")
    theirs_cfg = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert set(ours_cfg["target_modules"]) == set(theirs_cfg["target_modules"])
    loaded = PeftModel.from_pretrained(MODELS[name](), tmp_path / "theirs")
    assert torch.allclose(_logits(loaded, name), _logits(ref, name), atol=1e-5)
    back = peft.PeftModel.from_pretrained(MODELS[name](), tmp_path / "ours")
    assert torch.allclose(_logits(back, name), _logits(ours, name), atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_merge_unmerge_exact_and_disable(name):
    _, ours = _pair(name)
    before = clone_state(ours.base_model)
    expected = _logits(ours, name)
    with ours.disable_adapter():
        assert torch.allclose(_logits(ours, name), _logits(MODELS[name](), name), atol=1e-6)
    ours.merge_adapter()
    assert torch.equal(_logits(ours, name), expected)
    ours.unmerge_adapter()
    assert state_equal(clone_state(ours.base_model), before)
    merged = ours.merge_and_unload()
    assert not any("ln_tuning" in n for n, _ in merged.named_parameters())
    assert torch.equal(_logits(merged, name), expected)


def test_several_adapters_one_at_a_time():
    _, ours = _pair("llama")
    ours.add_adapter("b", LNTuningConfig(task_type="CAUSAL_LM"))
    ours.set_adapter("b")
    assert torch.allclose(_logits(ours, "llama"), _logits(MODELS["llama"](), "llama"), atol=1e-6)
    ours.set_adapter(["default", "b"])
    with pytest.raises(AdapterError, match="one adapter at a time"):
        _logits(ours, "llama")
    ours.set_adapter("default")
    ours.merge_adapter()
    with pytest.raises(MergeError):
        ours.merge_adapter(["b"])
    ours.unmerge_adapter()
    ours.delete_adapter("b")
    assert list(ours.peft_config) == ["default"]
    with pytest.raises(AdapterError):
        ours(**model_inputs("llama"), adapter_names=["default", "__base__"])


def test_training_lowers_loss_base_untouched_and_print_matches_peft(capsys):
    peft.get_peft_model(MODELS["llama"](), peft.LNTuningConfig(task_type="CAUSAL_LM")).print_trainable_parameters()
    theirs = capsys.readouterr().out
    ours = get_peft_model(MODELS["llama"](), LNTuningConfig(task_type="CAUSAL_LM"))
    ours.print_trainable_parameters()
    assert capsys.readouterr().out == theirs
    base = {k: v for k, v in clone_state(ours.base_model).items() if "ln_tuning_layers" not in k}
    inputs = model_inputs("llama")
    opt = torch.optim.Adam([p for p in ours.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(8):
        loss = ours(**inputs, labels=inputs["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert state_equal({k: v for k, v in clone_state(ours.base_model).items() if "ln_tuning_layers" not in k}, base)


def test_bf16_model_fp32_copies_autocast_and_exact_unmerge():
    ours = get_peft_model(MODELS["llama"]().to(torch.bfloat16), LNTuningConfig(task_type="CAUSAL_LM"))
    assert all(p.dtype == torch.float32 for n, p in ours.named_parameters() if "ln_tuning_layers" in n)
    inputs = model_inputs("llama")
    out = ours(**inputs, labels=inputs["input_ids"])
    assert out.logits.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.requires_grad)
    _perturb(ours)
    before = clone_state(ours.base_model)
    ours.merge_adapter()
    ours.unmerge_adapter()
    assert state_equal(clone_state(ours.base_model), before)


def test_unknown_architecture_needs_targets():
    model = MODELS["bert"]()
    with pytest.raises(TargetError, match="target_modules"):
        get_peft_model(model, LNTuningConfig())
    assert not any("ln_tuning" in n for n, _ in model.named_modules())
