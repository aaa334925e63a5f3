"""The built-in (IA)^3 plugin against Hugging Face PEFT 0.21 (an oracle only): logits, files both ways, merge,
several adapters, add_weighted_adapter, training, and the refusals."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from conftest import MODELS, clone_state, model_inputs, state_equal
from peft_core import AdapterError, IA3Config, PeftModel, TargetError, get_peft_model
from torch import nn

TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM", "bert": "SEQ_CLS"}


def _logits(model: nn.Module, name: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**model_inputs(name)).logits


def _pair(name: str, **kw):
    ref = peft.get_peft_model(MODELS[name](), peft.IA3Config(task_type=TASK[name], init_ia3_weights=False, **kw))
    ours = get_peft_model(MODELS[name](), IA3Config(task_type=TASK[name], **kw))
    ours.load_adapter_state_dict("default", {k: v.clone() for k, v in
                                             peft.get_peft_model_state_dict(ref).items()})
    return ref, ours


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5", "bert"])
def test_logits_files_and_config_match_peft(name, tmp_path):
    ref, ours = _pair(name)
    assert torch.allclose(_logits(ref, name), _logits(ours, name), atol=1e-5)
    assert set(ours.get_adapter_state_dict("default")) == set(peft.get_peft_model_state_dict(ref))
    ref.save_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")
    theirs_cfg = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for key in ("target_modules", "feedforward_modules"):
        assert set(ours_cfg[key]) == set(theirs_cfg[key]), key
    assert ours_cfg["fan_in_fan_out"] == theirs_cfg["fan_in_fan_out"]
    loaded = PeftModel.from_pretrained(MODELS[name](), tmp_path / "theirs")
    assert torch.allclose(_logits(loaded, name), _logits(ref, name), atol=1e-5)
    back = peft.PeftModel.from_pretrained(MODELS[name](), tmp_path / "ours")
    assert torch.allclose(_logits(back, name), _logits(ours, name), atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_merge_is_exact_and_unmerge_restores_bits(name):
    _, ours = _pair(name)
    before = clone_state(ours.base_model)
    expected = _logits(ours, name)
    ours.merge_adapter()
    assert torch.allclose(_logits(ours, name), expected, atol=1e-5)
    ours.unmerge_adapter()
    assert state_equal(clone_state(ours.base_model), before)
    merged = ours.merge_and_unload()
    assert not any("ia3" in n for n, _ in merged.named_parameters())
    assert torch.allclose(_logits(merged, name), expected, atol=1e-5)


def test_bf16_merge_unmerge_exact_and_fp32_vectors():
    model = MODELS["llama"]().to(torch.bfloat16)
    ours = get_peft_model(model, IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False))
    assert all(p.dtype == torch.float32 for n, p in ours.named_parameters() if "ia3_l" in n)
    before = clone_state(ours.base_model)
    ours.merge_adapter()
    ours.unmerge_adapter()
    assert state_equal(clone_state(ours.base_model), before)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(**model_inputs("llama"), labels=model_inputs("llama")["input_ids"])
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.requires_grad)


def test_training_lowers_loss_and_keeps_base_bits():
    ours = get_peft_model(MODELS["llama"](), IA3Config(task_type="CAUSAL_LM"))
    base = {k: v for k, v in clone_state(ours.base_model).items() if "ia3_l" not in k}
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
    now = {k: v for k, v in clone_state(ours.base_model).items() if "ia3_l" not in k}
    assert state_equal(now, base)


def test_print_trainable_parameters_matches_peft(capsys):
    peft.get_peft_model(MODELS["llama"](), peft.IA3Config(task_type="CAUSAL_LM")).print_trainable_parameters()
    theirs = capsys.readouterr().out
    get_peft_model(MODELS["llama"](), IA3Config(task_type="CAUSAL_LM")).print_trainable_parameters()
    assert capsys.readouterr().out == theirs


def test_several_adapters_and_add_weighted_adapter_match_peft():
    ref, ours = _pair("llama")
    torch.manual_seed(3)
    ref.add_adapter("b", peft.IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False))
    ours.add_adapter("b", IA3Config(task_type="CAUSAL_LM"))
    theirs_b = peft.get_peft_model_state_dict(ref, adapter_name="b")
    ours.load_adapter_state_dict("b", {k: v.clone() for k, v in theirs_b.items()})
    ref.base_model.set_adapter(["default", "b"])
    ours.set_adapter(["default", "b"])
    assert torch.allclose(_logits(ref, "llama"), _logits(ours, "llama"), atol=1e-5)
    ref.add_weighted_adapter(["default", "b"], [0.3, 0.7], "mix")
    ours.add_weighted_adapter(["default", "b"], [0.3, 0.7], "mix")
    ref.set_adapter("mix")
    ours.set_adapter("mix")
    assert torch.allclose(_logits(ref, "llama"), _logits(ours, "llama"), atol=1e-5)
    ours.delete_adapter("b")
    assert "b" not in ours.peft_config and ours.active_adapters == ["mix"]


def test_mixed_batch_is_refused_and_bad_targets_leave_model_untouched():
    _, ours = _pair("llama")
    with pytest.raises(AdapterError):
        ours(**model_inputs("llama"), adapter_names=["default", "__base__"])
    model = MODELS["llama"]()
    before = clone_state(model)
    with pytest.raises(TargetError):
        get_peft_model(model, IA3Config(target_modules=["embed_tokens"]))
    assert state_equal(clone_state(model), before)
    assert not any("ia3" in n for n, _ in model.named_modules())


def test_conv_layers_match_peft():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 6, 3)
            self.gconv = nn.Conv2d(6, 6, 3, groups=2)
            self.conv3 = nn.Conv3d(2, 3, 1)

        def forward(self, x, y):
            return self.gconv(self.conv(x)).sum() + self.conv3(y).sum()

    torch.manual_seed(0)
    x, y = torch.randn(2, 4, 8, 8), torch.randn(1, 2, 3, 3, 3)
    kw = {"target_modules": ["conv", "gconv", "conv3"], "feedforward_modules": ["gconv"]}
    torch.manual_seed(1)
    ref = peft.get_peft_model(Net(), peft.IA3Config(init_ia3_weights=False, **kw))
    torch.manual_seed(1)
    ours = get_peft_model(Net(), IA3Config(**kw))
    ours.load_adapter_state_dict("default", {k: v.clone() for k, v in peft.get_peft_model_state_dict(ref).items()})
    with torch.no_grad():
        expected = ref(x, y)
        assert torch.allclose(ours(x, y), expected, atol=1e-4)
        before = clone_state(ours.base_model)
        ours.merge_adapter()
        assert torch.allclose(ours(x, y), expected, atol=1e-4)
        ours.unmerge_adapter()
        assert state_equal(clone_state(ours.base_model), before)


def test_feedforward_must_be_subset():
    with pytest.raises(ValueError, match="subset"):
        IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])


def test_add_weighted_adapter_goes_to_the_method_of_the_named_adapters():
    """LoRA and IA3 both offer add_weighted_adapter; on a model holding both, the adapters named pick the method."""
    from peft_core import LoraConfig

    model = get_peft_model(MODELS["llama"](), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("lora2", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("ia", IA3Config(target_modules=["k_proj"], feedforward_modules=[], init_ia3_weights=False))
    model.add_adapter("ia2", IA3Config(target_modules=["k_proj"], feedforward_modules=[], init_ia3_weights=False))
    model.add_weighted_adapter(["default", "lora2"], [0.5, 0.5], "lora_mix", combination_type="linear")
    model.add_weighted_adapter(["ia", "ia2"], [0.5, 0.5], "ia_mix")
    assert type(model.peft_config["lora_mix"]).__name__ == "LoraConfig"
    assert type(model.peft_config["ia_mix"]).__name__ == "IA3Config"
    with pytest.raises(AdapterError, match="several methods"):
        model.add_weighted_adapter(["default", "ia"], [0.5, 0.5], "both")
    assert "both" not in model.peft_config
