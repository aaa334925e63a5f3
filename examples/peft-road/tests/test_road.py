"""peft-road's own tests: the plugin registered in-process with the registry's ``plugin()`` context manager.

peft-core's repository also tests this plugin installed for real (``tests/test_third_party.py`` there).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft_core import PeftModel, get_peft_model
from peft_core.errors import ConfigError, TargetError
from peft_core.registry import Registry, reset_registry
from safetensors.torch import load_file
from torch import nn

from peft_road import RoadConfig, RoadLayer, plugin


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[Registry]:
    # Once peft-road is installed (pip install -e .), its entry point already declares ROAD and a second
    # registration would be refused as a duplicate: start from a registry that loads no entry point.
    monkeypatch.setenv("PEFT_CORE_PLUGINS", "none")
    reg = reset_registry()
    with reg.plugin(plugin, name="road"):
        yield reg
    reset_registry()  # lazy: it reads the environment again on first use, after monkeypatch restored it


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(config).eval()


IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("variant", "per_layer"), [("road_1", (16 + 8) * 2), ("road_2", (32 + 16) * 2),
                                                     ("road_4", (64 + 32) * 2)])
def test_identity_at_init_and_peft_layout(registry: Registry, variant: str, per_layer: int) -> None:
    base = tiny_llama()
    with torch.no_grad():
        expected = base(IDS).logits
    model = get_peft_model(base, RoadConfig(task_type="CAUSAL_LM", variant=variant, group_size=8))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, RoadLayer)}
    assert sorted(n.split(".")[-1] for n in layers) == ["q_proj", "q_proj", "v_proj", "v_proj"]  # llama defaults
    assert model.get_nb_trainable_parameters()[0] == 2 * per_layer  # theta and alpha, q (32 out) and v (16 out)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, expected)  # angle 0, scale 1: the base model exactly


def test_save_load_round_trip(registry: Registry, tmp_path: Path) -> None:
    model = get_peft_model(tiny_llama(), RoadConfig(task_type="CAUSAL_LM", group_size=8, init_weights=False))
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert {"base_model.model.model.layers.0.self_attn.q_proj.road_theta",
            "base_model.model.model.layers.0.self_attn.q_proj.road_alpha"} <= set(keys)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["peft_type"], saved["variant"], saved["group_size"]) == ("ROAD", "road_1", 8)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_merge_unmerge_restores_bits(registry: Registry, variant: str) -> None:
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, RoadConfig(target_modules="all-linear", variant=variant, group_size=16,
                                            init_weights=False))
    with torch.no_grad():
        expected = model(IDS).logits
        model.merge_adapter()
        torch.testing.assert_close(model(IDS).logits, expected, rtol=0, atol=1e-5)
        model.unmerge_adapter()
    after = model.unload().state_dict()
    assert all(torch.equal(before[k].view(torch.int32), after[k].view(torch.int32)) for k in before)


def test_bad_targets_and_config_are_named(registry: Registry) -> None:
    with pytest.raises(TargetError, match=r"model\.norm.*LlamaRMSNorm"):
        get_peft_model(tiny_llama(), RoadConfig(target_modules=["model.norm"], group_size=8))
    with pytest.raises(TargetError, match=r"q_proj has out_features=32, not a multiple of RoadConfig.group_size=64"):
        get_peft_model(tiny_llama(), RoadConfig())  # the default group size is for real models
    with pytest.raises(ConfigError, match="group_size=7 must be even"):
        RoadConfig(group_size=7)
    with pytest.raises(ConfigError, match="variant must be one of"):
        RoadConfig(variant="road_3")
