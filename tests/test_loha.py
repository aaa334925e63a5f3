"""The built-in LoHa plugin against Hugging Face PEFT 0.21 (an oracle only): logits, seeded init and training
forwards, files both ways, merging, several adapters, dtypes, dropout options and the refusals."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from conftest import MODELS, clone_state, copy_adapter_weights, model_inputs, state_equal
from peft_core import LoHaConfig, PeftModel, get_peft_model
from torch import nn

TASK = {"llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM", "bert": "SEQ_CLS"}
TOL = 1e-5
#: tiny BERT's classifier barely feels q/v alone (LayerNorms, a near-uniform attention): adapt the dense layers too
TARGETS = {"bert": ["query", "value", "dense"]}


def _logits(model: nn.Module, name: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**model_inputs(name)).logits


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _pair(name: str, **kw):
    """PEFT's model with random factors, and ours holding the same factors (copied through the file format)."""
    kw = {"r": 4, "alpha": 16, "init_weights": False, **kw}
    if name in TARGETS:
        kw.setdefault("target_modules", TARGETS[name])
    theirs = peft.get_peft_model(MODELS[name](), peft.LoHaConfig(task_type=TASK[name], **kw))
    ours = get_peft_model(MODELS[name](), LoHaConfig(task_type=TASK[name], **kw))
    copy_adapter_weights(theirs, ours)
    return ours, theirs


@pytest.mark.parametrize("name", list(TASK))
def test_logits_files_and_config_match_peft(name, tmp_path):
    ours, theirs = _pair(name)
    base = _logits(MODELS[name](), name)
    assert _diff(_logits(ours, name), base) > 0.05 * float(base.abs().max())  # the adapter really changes it
    assert _diff(_logits(ours, name), _logits(theirs, name)) <= TOL
    assert set(ours.get_adapter_state_dict("default")) == set(peft.get_peft_model_state_dict(theirs))
    theirs.save_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")
    theirs_cfg = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert set(ours_cfg) == set(theirs_cfg)
    for key in ours_cfg:
        if key == "target_modules":
            assert set(ours_cfg[key]) == set(theirs_cfg[key])
        elif key != "peft_version":
            assert ours_cfg[key] == theirs_cfg[key], key
    loaded = PeftModel.from_pretrained(MODELS[name](), tmp_path / "theirs")
    assert _diff(_logits(loaded, name), _logits(theirs, name)) <= TOL
    back = peft.PeftModel.from_pretrained(MODELS[name](), tmp_path / "ours")
    assert _diff(_logits(back, name), _logits(ours, name)) <= TOL


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_merge_matches_and_unmerge_restores_bits(name):
    ours, theirs = _pair(name)
    before = clone_state(ours.base_model)
    expected = _logits(ours, name)
    ours.merge_adapter()
    assert ours.merged_adapters == ["default"]
    assert _diff(_logits(ours, name), expected) <= TOL
    ours.unmerge_adapter()
    assert state_equal(clone_state(ours.base_model), before)
    merged = ours.merge_and_unload()
    assert not any("hada_" in n for n, _ in merged.named_parameters())
    assert _diff(_logits(merged, name), _logits(theirs.merge_and_unload(), name)) <= TOL
