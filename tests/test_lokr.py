"""The built-in LoKr plugin against Hugging Face PEFT 0.21 (an oracle only): factor shapes and seeded init, logits,
files both ways, merge, several adapters, dropout in training, training, and the refusals."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from conftest import MODELS, clone_state, model_inputs, state_equal
from peft_core import LoKrConfig, PeftModel, TargetError, get_peft_model
from torch import nn

TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM", "bert": "SEQ_CLS"}


def _logits(model: nn.Module, name: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**model_inputs(name)).logits


def _pair(name: str, seed: int = 5, **kw):
    """PEFT's model and ours from the same seed; ours then gets PEFT's adapter tensors through the file format."""
    kw.setdefault("init_weights", False)  # random factors: the adapter really changes the outputs
    torch.manual_seed(seed)
    ref = peft.get_peft_model(MODELS[name](), peft.LoKrConfig(task_type=TASK[name], **kw))
    torch.manual_seed(seed)
    ours = get_peft_model(MODELS[name](), LoKrConfig(task_type=TASK[name], **kw))
    theirs = peft.get_peft_model_state_dict(ref)
    mine = ours.get_adapter_state_dict("default")
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)  # same seed: PEFT's init, draw for draw
    ours.load_adapter_state_dict("default", {k: v.clone() for k, v in theirs.items()})
    return ref, ours


CASES = [
    ("llama", {}),
    ("llama", {"r": 2, "alpha": 3, "target_modules": "all-linear", "decompose_both": True}),
    ("t5", {"r": 1, "target_modules": ["q", "v", "wi", "wo"], "decompose_factor": 4}),
    ("bert", {"r": 3, "target_modules": ["query", "value", "dense"], "rank_pattern": {"value": 1},
              "alpha_pattern": {"dense": 5}}),
]


@pytest.mark.parametrize(("name", "kw"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_logits_files_and_config_match_peft(name, kw, tmp_path):
    ref, ours = _pair(name, **kw)
    expected = _logits(ref, name)
    with ref.disable_adapter():
        base = _logits(ref, name)
    assert (expected - base).abs().max() > 1e-3  # the adapter does change the outputs
    assert torch.allclose(_logits(ours, name), expected, atol=1e-5)
    ref.save_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")
    theirs_cfg = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert ours_cfg["peft_type"] == "LOKR"
    for key in set(theirs_cfg) - {"peft_version", "auto_mapping", "inference_mode"}:
        if key == "target_modules" and ours_cfg[key] == "all-linear":  # PEFT writes what it expanded it to
            adapted = [p for p, m in ours.get_base_model().named_modules() if hasattr(m, "lokr_w1")]
            assert sorted(theirs_cfg[key]) == sorted(adapted)
        elif key == "target_modules":
            assert sorted(ours_cfg[key]) == sorted(theirs_cfg[key])
        else:
            assert ours_cfg[key] == theirs_cfg[key], key
    loaded = PeftModel.from_pretrained(MODELS[name](), tmp_path / "theirs")
    assert torch.allclose(_logits(loaded, name), expected, atol=1e-5)
    back = peft.PeftModel.from_pretrained(MODELS[name](), tmp_path / "ours")
    assert torch.allclose(_logits(back, name), expected, atol=1e-5)


def test_gpt2_conv1d_is_refused_like_peft():
    with pytest.raises(TypeError, match="Conv1D"):
        peft.get_peft_model(MODELS["gpt2"](), peft.LoKrConfig(task_type="CAUSAL_LM"))
    model = MODELS["gpt2"]()
    before = clone_state(model)
    with pytest.raises(TargetError, match=r"c_attn.*Conv1D.*exclude_modules"):
        get_peft_model(model, LoKrConfig(task_type="CAUSAL_LM"))
    assert state_equal(clone_state(model), before)
    assert not any("lokr" in n for n, _ in model.named_modules())
