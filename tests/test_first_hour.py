"""Issue 17's remaining first-hour items: PEFT's str enums, ``peft_version`` written, prompt configs built
before their size is known, and an API that describes itself (every public method documented)."""

from __future__ import annotations

import inspect
import json
import pydoc

import packaging.version
import peft
import peft_core as pc
import pytest
import torch
from conftest import model_inputs, tiny_gpt2


def test_peft_type_is_a_str_enum_like_peft() -> None:
    config = pc.LoraConfig(r=4)
    assert isinstance(config.peft_type, pc.PeftType)
    assert config.peft_type is pc.PeftType.LORA and config.peft_type.value == "LORA"
    assert config.peft_type == "LORA" and f"{config.peft_type}" == "LORA"
    assert json.loads(config.to_json_string())["peft_type"] == "LORA"
    assert pc.PromptTuningConfig(num_virtual_tokens=2).peft_type is pc.PeftType.PROMPT_TUNING
    assert isinstance(pc.TaskType.CAUSAL_LM, str) and pc.TaskType.CAUSAL_LM.value == "CAUSAL_LM"


def test_peft_version_is_written_and_parses_as_peft_reads_it(tmp_path) -> None:
    model = pc.get_peft_model(tiny_gpt2(), pc.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["c_attn"]))
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())["peft_version"]
    assert written is not None
    # PEFT splits off "@commit" and parses the rest (OFT picks its file layout from it)
    parsed = packaging.version.Version(written.partition("@")[0])
    assert parsed.release[:2] == (0, 21) and parsed.local is not None and parsed.local.startswith("peftcore")
    assert peft.PeftConfig.from_pretrained(str(tmp_path)).peft_version == written
    # a loaded file keeps the version it was written with
    assert pc.PeftConfig.from_dict({"peft_type": "LORA", "peft_version": "0.13.0"}).peft_version == "0.13.0"


@pytest.mark.parametrize("config_cls", ["PromptTuningConfig", "PrefixTuningConfig"])
def test_prompt_configs_build_without_num_virtual_tokens_and_get_peft_model_asks_for_it(config_cls: str) -> None:
    cls = getattr(pc, config_cls)
    config = cls(task_type="CAUSAL_LM")  # PEFT's code builds it first and fills fields later
    assert config.num_virtual_tokens is None
    base = tiny_gpt2()
    before = [name for name, _ in base.named_modules()]
    with pytest.raises(pc.ConfigError, match=rf"{config_cls}.num_virtual_tokens is not set.*replace"):
        pc.get_peft_model(base, config)
    assert [name for name, _ in base.named_modules()] == before  # the model is untouched
    model = pc.get_peft_model(base, config.replace(num_virtual_tokens=3))
    assert model(**model_inputs("gpt2")).logits.shape[1] >= 7
    with pytest.raises(pc.ConfigError, match="num_virtual_tokens must be >= 1"):
        cls(num_virtual_tokens=0)


def _public_members(cls: type) -> list[str]:
    names = []
    for klass in cls.__mro__:
        if klass is object or klass.__module__.startswith("torch"):
            continue
        for name, value in vars(klass).items():
            if name.startswith("_") or name in names:
                continue
            if inspect.isfunction(value) or isinstance(value, (classmethod, staticmethod, property)):
                names.append(name)
    return names


def test_every_public_method_of_the_model_and_the_configs_is_documented() -> None:
    classes = [pc.AdaptedModel, pc.PeftModel, pc.PeftConfig, pc.LoraConfig, pc.PromptTuningConfig,
               pc.PrefixTuningConfig]
    missing = [f"{cls.__name__}.{name}" for cls in classes for name in _public_members(cls)
               if not inspect.getdoc(getattr(cls, name))]
    assert not missing, f"public methods without a docstring: {missing}"
    assert _public_members(pc.AdaptedModel)  # the scan sees the class's methods at all
    undocumented = [name for name in pc.__all__ if not inspect.getdoc(getattr(pc, name))]
    assert not undocumented


def test_help_on_model_methods_shows_their_own_docs_and_signatures() -> None:
    model = pc.get_peft_model(tiny_gpt2(), pc.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["c_attn"]))
    for name in ["forward", "generate", "get_base_model", "print_trainable_parameters", "save_pretrained"]:
        assert inspect.getdoc(getattr(model, name)), name
    op = model.add_weighted_adapter  # an operation LoRA publishes, reached through the model
    text = pydoc.render_doc(op)
    assert "partial" not in text and "combination_type" in text
    assert inspect.getdoc(op) and "adapters" in str(inspect.signature(op))
    assert "input_ids" in str(inspect.signature(model.forward))
    assert "adapter_names" in (inspect.getdoc(model.forward) or "")
    with torch.no_grad():
        assert torch.equal(model.forward(**model_inputs("gpt2")).logits, model(**model_inputs("gpt2")).logits)


def test_load_errors_name_the_keys_the_user_passed() -> None:
    model = pc.get_peft_model(tiny_gpt2(), pc.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["c_attn"]))
    tensors = pc.get_peft_model_state_dict(model)
    typo = {k.replace("c_attn", "c_atn"): v for k, v in tensors.items()}
    with pytest.raises(pc.CheckpointError) as info:
        pc.set_peft_model_state_dict(model, typo)
    assert next(iter(typo)) in str(info.value) and ".default." not in str(info.value)
    short = {k: v[:1] for k, v in tensors.items()}
    with pytest.raises(pc.CheckpointError, match="shape mismatch") as info:
        pc.set_peft_model_state_dict(model, short)
    assert next(iter(short)) in str(info.value) and ".default." not in str(info.value)


def test_a_regex_target_modules_with_layers_to_transform_is_refused_as_peft_does() -> None:
    with pytest.raises(ValueError):
        peft.LoraConfig(target_modules=r".*q_proj", layers_to_transform=[0])
    with pytest.raises(pc.ConfigError, match="layers_to_transform cannot be combined with a regex"):
        pc.LoraConfig(target_modules=r".*q_proj", layers_to_transform=[0])
    assert pc.LoraConfig(target_modules=["q_proj"], layers_to_transform=[0]).layers_to_transform == (0,)
