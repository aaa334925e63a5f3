"""peft-ia3's own tests: the plugin registered in-process with the registry's ``plugin()`` context manager.

peft-core's repository also tests this plugin installed for real (``tests/test_third_party.py`` there).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft_core import PeftModel, get_peft_model
from peft_core.errors import TargetError
from peft_core.registry import Registry, reset_registry
from safetensors.torch import load_file
from torch import nn

from peft_ia3 import IA3Config, IA3Layer, plugin


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[Registry]:
    # Once peft-ia3 is installed (pip install -e .), its entry point already declares IA3 and a second
    # registration would be refused as a duplicate: start from a registry that loads no entry point.
    monkeypatch.setenv("PEFT_CORE_PLUGINS", "none")
    reg = reset_registry()
    with reg.plugin(plugin, name="ia3"):
        yield reg
    reset_registry()  # lazy: it reads the environment again on first use, after monkeypatch restored it


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(config).eval()


IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def test_identity_at_init_and_peft_layout(registry: Registry) -> None:
    base = tiny_llama()
    with torch.no_grad():
        expected = base(IDS).logits
    model = get_peft_model(base, IA3Config(task_type="CAUSAL_LM"))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, IA3Layer)}
    assert sorted(n.split(".")[-1] for n in layers) == ["down_proj", "down_proj", "k_proj", "k_proj",
                                                         "v_proj", "v_proj"]
    assert model.get_nb_trainable_parameters()[0] == 2 * (16 + 16 + 64)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, expected)  # vectors of ones: the base model exactly


def test_save_load_round_trip(registry: Registry, tmp_path: Path) -> None:
    model = get_peft_model(tiny_llama(), IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False))
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.mlp.down_proj.ia3_l" in keys
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "IA3"
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_merge_unmerge_restores_bits(registry: Registry) -> None:
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, IA3Config(init_ia3_weights=False))
    with torch.no_grad():
        expected = model(IDS).logits
        model.merge_adapter()
        torch.testing.assert_close(model(IDS).logits, expected, rtol=0, atol=1e-5)
        model.unmerge_adapter()
    after = model.unload().state_dict()
    assert all(torch.equal(before[k].view(torch.int32), after[k].view(torch.int32)) for k in before)


def test_unsupported_target_is_named(registry: Registry) -> None:
    with pytest.raises(TargetError, match=r"model\.norm.*LlamaRMSNorm"):
        get_peft_model(tiny_llama(), IA3Config(target_modules=["model.norm"], feedforward_modules=[]))
