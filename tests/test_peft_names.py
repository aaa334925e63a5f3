"""Every name of Hugging Face PEFT's top level either exists in peft_core or says it is not supported."""

from __future__ import annotations

import warnings

import peft
import peft_core
import pytest
import torch
from conftest import model_inputs, tiny_llama
from peft_core import LoraConfig, get_peft_model

#: PEFT names peft-core provides (a test below checks each one does what PEFT's does).
PROVIDED = {
    "PeftConfig", "PeftModel", "PeftMixedModel", "get_peft_model", "get_peft_model_state_dict",
    "set_peft_model_state_dict", "prepare_model_for_kbit_training", "TaskType", "PeftType", "get_peft_config",
    "inject_adapter_in_model", "load_peft_weights", "cast_mixed_precision_params", "get_layer_status",
    "get_model_status", "PeftError", "PeftWarning", "LoraConfig", "PromptTuningConfig", "PrefixTuningConfig",
    "PromptTuningInit", "PEFT_TYPE_TO_CONFIG_MAPPING",
    *(n for n in peft.__all__ if n.startswith("AutoPeftModel") or n.startswith("PeftModelFor")),
}


@pytest.mark.parametrize("name", sorted(peft.__all__))
def test_each_peft_name_exists_or_says_it_is_not_supported(name):
    if name in PROVIDED:
        assert getattr(peft_core, name) is not None
        assert name in dir(peft_core)
        return
    try:
        value = getattr(peft_core, name)
    except AttributeError as e:
        assert ("not supported" in str(e) or "does not implement" in str(e) or "no per-method tuner" in str(e)), e
        assert name in str(e)
    else:  # provided by an installed plugin (PromptEmbedding, PrefixEncoder...): a real object
        assert value is not None


def test_peft_type_and_task_type_are_str_enums_like_peft():
    assert set(peft_core.PeftType.__members__) <= set(peft.PeftType.__members__)
    assert {"LORA", "PROMPT_TUNING", "PREFIX_TUNING", "IA3", "LOHA"} <= set(peft_core.PeftType.__members__)
    assert peft_core.PeftType.LORA == "LORA" == LoraConfig.peft_type and peft_core.PeftType.LORA.value == "LORA"
    assert peft_core.TaskType.CAUSAL_LM == "CAUSAL_LM" and peft_core.TaskType.CAUSAL_LM.value == "CAUSAL_LM"
    assert set(peft_core.TaskType.__members__) == set(peft.TaskType.__members__)


def test_helpers_do_what_peft_s_do(tmp_path):
    config = peft_core.get_peft_config({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]})
    assert isinstance(config, LoraConfig) and config.r == 4
    base = tiny_llama()
    same = peft_core.inject_adapter_in_model(LoraConfig(target_modules=["q_proj"], init_lora_weights=False), base)
    assert same is base and len([n for n, p in base.named_parameters() if p.requires_grad]) == 4
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(target_modules=["q_proj"]), tiny_llama())
    assert ({n for n, p in base.named_parameters() if p.requires_grad}
            == {n for n, p in theirs.named_parameters() if p.requires_grad})
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    weights = peft_core.load_peft_weights(tmp_path)
    assert weights.keys() == peft.load_peft_weights(str(tmp_path)).keys() == model.get_adapter_state_dict().keys()
    half = tiny_llama()
    get_peft_model(half, LoraConfig(target_modules=["q_proj"]))
    peft_core.cast_mixed_precision_params(half, torch.bfloat16)
    assert {p.dtype for p in half.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in half.parameters() if not p.requires_grad} == {torch.bfloat16}


def test_model_attributes_peft_users_reach_for():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj", "v_proj"]))
    ours = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    assert sorted(ours.targeted_module_names) == sorted(theirs.targeted_module_names)
    assert ours.active_peft_config is ours.peft_config["default"]
    ids = model_inputs("llama")["input_ids"]
    adapted = ours(input_ids=ids).logits
    ours.disable_adapter_layers()
    with ours.disable_adapter():
        pass
    plain = ours(input_ids=ids).logits
    assert not torch.allclose(plain, adapted)
    ours.enable_adapter_layers()
    assert torch.equal(ours(input_ids=ids).logits, adapted)
    layers = ours.get_layer_status()
    their_layers = theirs.get_layer_status()
    # PEFT's paths are in its tuner model (one "model." deeper); ours are paths in the user's model
    assert [s.name for s in layers] == [s.name.removeprefix("model.") for s in their_layers]
    assert all(s.active_adapters == ["default"] and s.available_adapters == ["default"] for s in layers)
    status = ours.get_model_status()
    their_status = theirs.get_model_status()
    assert (status.trainable_params, status.total_params, status.num_adapter_layers) == (
        their_status.trainable_params, their_status.total_params, their_status.num_adapter_layers)
    assert status.peft_types == {"default": "LORA"} and status.active_adapters == ["default"]
