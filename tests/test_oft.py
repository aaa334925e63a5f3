"""The built-in OFT plugin against Hugging Face PEFT 0.21 (an oracle only): logits with every rotation option,
files both ways, merging (exact unmerge), several adapters, training, counts, dtypes and the refusals."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from conftest import MODELS, clone_state, max_diff, model_inputs, state_equal
from peft_core import (
    AdapterError,
    CheckpointError,
    ConfigError,
    MergeError,
    OFTConfig,
    PeftModel,
    TargetError,
    get_peft_model,
)
from safetensors.torch import load_file
from torch import nn

TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM", "bert": "SEQ_CLS"}
# GPT-2's attention and MLP are transformers Conv1D layers, which PEFT's OFT refuses: its position embedding
# (an nn.Embedding that is not tied to the output layer) is what both libraries can rotate there
TARGETS = {"gpt2": ["wpe"]}
TOL = 1e-5


def _logits(model: nn.Module, name: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**model_inputs(name)).logits


def _kw(name: str, **kw) -> dict:
    kw.setdefault("oft_block_size", 8)
    if name in TARGETS:
        kw.setdefault("target_modules", TARGETS[name])
    return {"task_type": TASK[name], **kw}


def _copy(theirs: nn.Module, ours: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    sd = peft.get_peft_model_state_dict(theirs, adapter_name=adapter)
    ours.load_adapter_state_dict(adapter, {k: v.clone() for k, v in sd.items()})
    return sd


def _pair(name: str, **kw):
    """PEFT's model with random (non-identity) rotations, and ours holding the same tensors."""
    kw = _kw(name, **kw)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(MODELS[name](), peft.OFTConfig(init_weights=False, **kw))
    with torch.no_grad():  # larger angles than PEFT's N(0, 0.1) test init, so that every model's logits move
        for n, p in theirs.named_parameters():
            if "_R." in n:
                p.normal_(0.0, 0.3)
    ours = get_peft_model(MODELS[name](), OFTConfig(init_weights=False, **kw))
    _copy(theirs, ours)
    return ours, theirs


def _same_config(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs)
    for key in ours:
        if key == "peft_version":
            continue
        if key in ("target_modules", "exclude_modules") and isinstance(theirs[key], list):
            assert set(ours[key]) == set(theirs[key]), key
        else:
            assert ours[key] == theirs[key], key


# ---------------------------------------------------------------- same tensors, same outputs; files both ways
@pytest.mark.parametrize("name", list(TASK))
def test_logits_and_files_match_peft(name, tmp_path):
    ours, theirs = _pair(name)
    expected = _logits(theirs, name)
    assert max_diff(_logits(ours, name), expected) <= TOL
    with theirs.disable_adapter():
        base = _logits(theirs, name)
    assert max_diff(expected, base) > 10 * TOL  # the random rotations really change the output
    with ours.disable_adapter():
        assert max_diff(_logits(ours, name), base) == 0
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    a = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    b = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    # PEFT adds the base embedding weight of a targeted embedding (save_embedding_layers="auto"); peft-core
    # never changes base weights, so it writes only the adapter's tensors
    b = {k: v for k, v in b.items() if not k.endswith(".base_layer.weight")}
    assert a.keys() == b.keys() and any(k.endswith("_R.weight") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    _same_config(json.loads((tmp_path / "ours" / "adapter_config.json").read_text()),
                 json.loads((tmp_path / "theirs" / "adapter_config.json").read_text()))
    loaded = PeftModel.from_pretrained(MODELS[name](), tmp_path / "theirs")
    assert max_diff(_logits(loaded, name), expected) <= TOL
    back = peft.PeftModel.from_pretrained(MODELS[name](), tmp_path / "ours")
    assert max_diff(_logits(back, name), expected) <= TOL


@pytest.mark.parametrize("kw", [
    {"use_cayley_neumann": False},
    {"num_cayley_neumann_terms": 2},
    {"num_cayley_neumann_terms": 8},
    {"coft": True, "eps": 0.05},
    {"block_share": True},
    {"r": 4, "oft_block_size": 0},
    {"oft_block_size": 12},  # does not divide 32 or 64: moved to the nearest divisor per layer, as PEFT
    {"target_modules": ["embed_tokens", "q_proj", "down_proj"], "block_share": True},
    {"target_modules": "all-linear", "exclude_modules": ["o_proj", "up_proj"]},
    {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
    {"fan_in_fan_out": True},
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_options_match_peft(kw):
    ours, theirs = _pair("llama", **kw)
    assert max_diff(_logits(ours, "llama"), _logits(theirs, "llama")) <= TOL
    ours_sd = ours.get_adapter_state_dict("default")
    theirs_sd = {k: v for k, v in peft.get_peft_model_state_dict(theirs).items()
                 if not k.endswith(".base_layer.weight")}
    assert ours_sd.keys() == theirs_sd.keys()
    assert all(ours_sd[k].shape == theirs_sd[k].shape for k in ours_sd)


@pytest.mark.parametrize("kw", [{}, {"coft": True, "eps": 0.05}, {"block_share": True, "use_cayley_neumann": False},
                                {"target_modules": ["embed_tokens", "o_proj"]}], ids=["plain", "coft", "shared", "emb"])
def test_loss_and_gradients_match_peft(kw):
    ours, theirs = _pair("llama", **kw)
    x = model_inputs("llama")
    losses = [m(**x, labels=x["input_ids"]).loss for m in (ours, theirs)]
    assert abs(float(losses[0]) - float(losses[1])) <= TOL
    for loss in losses:
        loss.backward()
    ours_g = {n.removeprefix("base_model."): p.grad for n, p in ours.named_parameters() if p.requires_grad}
    theirs_g = {n.removeprefix("base_model.model.").replace(".default.weight", ".default"): p.grad
                for n, p in theirs.named_parameters() if p.requires_grad}
    assert ours_g.keys() == theirs_g.keys() and ours_g
    assert all(max_diff(ours_g[k], theirs_g[k]) <= TOL for k in ours_g)


def test_coft_projects_the_parameter_in_place_as_peft():
    ours, theirs = _pair("llama", coft=True, eps=0.05)
    _logits(ours, "llama"), _logits(theirs, "llama")
    a = ours.get_adapter_state_dict("default")
    b = peft.get_peft_model_state_dict(theirs)
    key = next(iter(a))
    assert max_diff(a[key], b[key]) <= 1e-7
    # every block's skew matrix is inside the ball of radius eps / sqrt(blocks); N(0, 0.1) draws were outside
    q = a[key]
    assert float((2 * q.pow(2).sum(-1)).sqrt().max()) <= 0.05 / q.shape[0] ** 0.5 + 1e-6


# ---------------------------------------------------------------- merging
@pytest.mark.parametrize("name", ["llama", "gpt2", "t5", "bert"])
def test_merge_matches_forward_and_unmerge_restores_bits(name):
    ours, _ = _pair(name, **({"target_modules": ["wpe"]} if name == "gpt2" else
                             {"target_modules": ["embed_tokens", "q_proj", "o_proj", "gate_proj"]}
                             if name == "llama" else {}))
    before = clone_state(ours.base_model)
    expected = _logits(ours, name)
    ours.merge_adapter()
    assert max_diff(_logits(ours, name), expected) <= TOL
    ours.unmerge_adapter()
    assert state_equal(clone_state(ours.base_model), before)
    merged = ours.merge_and_unload()
    assert not any("oft_" in n for n, _ in merged.named_parameters())
    assert max_diff(_logits(merged, name), expected) <= TOL


def test_print_trainable_parameters_matches_peft(capsys):
    for kw in ({}, {"block_share": True, "target_modules": ["embed_tokens", "v_proj"]}):
        ours, theirs = _pair("llama", **kw)
        theirs.print_trainable_parameters()
        expected = capsys.readouterr().out
        ours.print_trainable_parameters()
        assert capsys.readouterr().out == expected


def test_mixed_batch_is_refused_as_peft_lacks_it():
    ours, theirs = _pair("llama")
    x = model_inputs("llama")
    with torch.no_grad():  # PEFT ignores adapter_names: its "__base__" row is rotated all the same
        assert torch.equal(theirs(**x, adapter_names=["default", "__base__"]).logits, theirs(**x).logits)
    with pytest.raises(AdapterError, match=r"OFTLayer.*set_adapter"):
        ours(**x, adapter_names=["default", "__base__"])


def test_bad_targets_raise_and_leave_the_model_untouched():
    model = MODELS["gpt2"]()
    before = clone_state(model)
    with pytest.raises(TargetError, match=r"c_attn.*Conv1D.*exclude_modules"):
        get_peft_model(model, OFTConfig(target_modules=["c_attn", "wpe"]))
    assert state_equal(clone_state(model), before)
    assert not any("oft" in n for n, _ in model.named_modules())
    with pytest.raises(ConfigError, match="not both"):
        OFTConfig(r=4, oft_block_size=8)
    with pytest.raises(ConfigError, match="non-zero"):
        OFTConfig(r=0, oft_block_size=0)
    with pytest.raises(ConfigError, match=r"layers_pattern.*layers_to_transform"):
        OFTConfig(layers_pattern="layers")
    with pytest.raises(ConfigError, match="bias"):
        OFTConfig(bias="lora_only")


# ---------------------------------------------------------------- Conv2d
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(8, 4, 1, stride=2, padding=1)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.odd = nn.Conv2d(6, 6, (1, 3))
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.odd(self.conv(self.pw(x))).mean((2, 3)))


def _conv_pair(targets: list[str]):
    torch.manual_seed(1)
    theirs = peft.get_peft_model(_Net(), peft.OFTConfig(target_modules=targets, oft_block_size=4, init_weights=False))
    torch.manual_seed(1)
    ours = get_peft_model(_Net(), OFTConfig(target_modules=targets, oft_block_size=4))
    _copy(theirs, ours)
    return ours, theirs


def test_pointwise_conv_matches_peft_and_merges_exactly():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 9)
    ours, theirs = _conv_pair(["pw", "fc"])
    with torch.no_grad():
        expected = theirs(x)
        assert max_diff(ours(x), expected) <= TOL
        before = clone_state(ours.base_model)
        ours.merge_adapter()
        assert max_diff(ours(x), expected) <= TOL
        ours.unmerge_adapter()
        assert state_equal(clone_state(ours.base_model), before)


def test_kxk_conv_computes_peft_s_merged_layer():
    """PEFT's unmerged forward of a 3x3 convolution sums overlapping rotated patches (at the identity init it is not
    even the base layer); its merged weight ``W R^T`` is the rotation OFT defines, and what this plugin computes."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 9)
    ours, theirs = _conv_pair(["conv"])
    with torch.no_grad():
        theirs.merge_adapter()
        assert max_diff(ours(x), theirs(x)) <= TOL
        ours.merge_adapter()
        assert max_diff(ours(x), theirs(x)) <= TOL
    fresh = get_peft_model(_Net(), OFTConfig(target_modules=["conv"], oft_block_size=4))
    with torch.no_grad():
        out = fresh(x)
        with fresh.disable_adapter():
            assert torch.equal(fresh(x), out)  # identity init: the base layer exactly


def test_non_square_kernels_are_refused():
    model = _Net()
    with pytest.raises(TargetError, match=r"'odd'.*non-square"):
        get_peft_model(model, OFTConfig(target_modules=["conv", "odd"], oft_block_size=4))
    assert not any("oft" in n for n, _ in model.named_modules())


# ---------------------------------------------------------------- several adapters
def _base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors under their plain names (wrapped or not)."""
    return {k.replace(".base_layer", ""): v for k, v in clone_state(model.base_model).items() if "_R." not in k}


def test_several_adapters_compose_as_peft():
    ours, theirs = _pair("llama", target_modules=["q_proj", "v_proj", "embed_tokens"])
    torch.manual_seed(5)
    cfg = {"task_type": "CAUSAL_LM", "oft_block_size": 4, "target_modules": ["q_proj", "down_proj", "embed_tokens"]}
    theirs.add_adapter("b", peft.OFTConfig(init_weights=False, **cfg))
    ours.add_adapter("b", OFTConfig(**cfg))
    _copy(theirs, ours, "b")
    for active in (["b"], ["default", "b"], ["b", "default"]):
        theirs.base_model.set_adapter(active)
        ours.set_adapter(active)
        assert max_diff(_logits(ours, "llama"), _logits(theirs, "llama")) <= TOL, active
    # merged, two adapters act as they do unmerged (PEFT's merge stacks them in the opposite order)
    ours.set_adapter(["default", "b"])
    expected = _logits(ours, "llama")
    before = clone_state(ours.base_model)
    ours.merge_adapter()
    assert ours.merged_adapters == ["default", "b"]
    assert max_diff(_logits(ours, "llama"), expected) <= TOL
    ours.delete_adapter("default")  # merged under "b": the core unmerges "b", then "default", then merges "b" again
    assert list(ours.peft_config) == ["b"] and ours.active_adapters == ["b"] and ours.merged_adapters == ["b"]
    assert not any(".default" in n for n, _ in ours.named_parameters())
    theirs.delete_adapter("default")
    theirs.base_model.set_adapter("b")
    assert max_diff(_logits(ours, "llama"), _logits(theirs, "llama")) <= TOL
    ours.unmerge_adapter()
    assert state_equal(_base_weights(ours), {k.replace(".base_layer", ""): v for k, v in before.items()
                                             if "_R." not in k})


# ---------------------------------------------------------------- training, dtypes, dropout
def test_training_lowers_loss_and_keeps_base_bits():
    ours = get_peft_model(MODELS["llama"](), OFTConfig(task_type="CAUSAL_LM", oft_block_size=8,
                                                     target_modules="all-linear"))
    base = {k: v for k, v in clone_state(ours.base_model).items() if "oft_R" not in k}
    inputs = model_inputs("llama")
    trainable = [p for p in ours.parameters() if p.requires_grad]
    assert trainable and all(p.shape[-1] == 28 for p in trainable)
    opt = torch.optim.Adam(trainable, lr=0.05)
    losses = []
    for _ in range(6):
        loss = ours(**inputs, labels=inputs["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3
    now = {k: v for k, v in clone_state(ours.base_model).items() if "oft_R" not in k}
    assert state_equal(now, base)


def test_bf16_model_and_autocast_match_peft():
    kw = _kw("llama", target_modules=["q_proj", "v_proj", "embed_tokens"], use_cayley_neumann=False)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(MODELS["llama"]().to(torch.bfloat16), peft.OFTConfig(init_weights=False, **kw))
    ours = get_peft_model(MODELS["llama"]().to(torch.bfloat16), OFTConfig(**kw))
    _copy(theirs, ours)
    params = [p for n, p in ours.named_parameters() if "_R." in n]
    assert params and all(p.dtype == torch.float32 for p in params)  # autocast_adapter_dtype, as PEFT
    out, ref = _logits(ours, "llama"), _logits(theirs, "llama")
    assert out.dtype == torch.bfloat16 and max_diff(out, ref) <= 1e-3
    before = clone_state(ours.base_model)
    ours.merge_adapter()
    assert max_diff(_logits(ours, "llama"), out) <= 0.05  # the merged weights are rounded to bf16 once
    ours.unmerge_adapter()
    assert state_equal(clone_state(ours.base_model), before)
    # an fp32 model under torch.autocast(cpu, bf16), as Trainer(bf16=True) runs it
    fp32 = get_peft_model(MODELS["llama"](), OFTConfig(**kw))
    theirs32 = peft.get_peft_model(MODELS["llama"](), peft.OFTConfig(**kw))
    peft.set_peft_model_state_dict(theirs32, _copy(theirs, fp32))
    inputs = model_inputs("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fp32(**inputs, labels=inputs["input_ids"]).loss
        with torch.no_grad():
            theirs_loss = theirs32(**inputs, labels=inputs["input_ids"]).loss
    assert abs(float(loss) - float(theirs_loss)) <= 1e-4
    loss.backward()
    grads = [p.grad for p in fp32.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_module_dropout_has_no_effect_as_in_peft():
    """PEFT 0.21 builds its block dropout and never calls it: training-mode outputs equal evaluation ones."""
    ours, theirs = _pair("llama", module_dropout=0.5)
    ours.train(), theirs.train()
    x = model_inputs("llama")
    with torch.no_grad():
        trained, reference = ours(**x).logits, theirs(**x).logits
    ours.eval()
    assert max_diff(trained, reference) <= TOL and torch.equal(trained, _logits(ours, "llama"))


# ---------------------------------------------------------------- biases, configs and files of other PEFT versions
@pytest.mark.parametrize("bias", ["all", "oft_only"])
def test_bias_options_match_peft(bias, tmp_path, capsys):
    ours, theirs = _pair("bert", bias=bias)
    theirs.print_trainable_parameters()
    expected = capsys.readouterr().out
    ours.print_trainable_parameters()
    assert capsys.readouterr().out == expected
    trained = {n.removeprefix("base_model.") for n, p in ours.named_parameters() if p.requires_grad}
    assert trained == {n.removeprefix("base_model.model.").replace("_R.default.weight", "_R.default")
                       for n, p in theirs.named_parameters() if p.requires_grad}
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    a = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    b = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    # PEFT's bias="all" also repeats the classifier copy's bias (.modules_to_save.bias, .original_module.bias)
    assert a.keys() == {k for k in b if ".modules_to_save." not in k and ".original_module." not in k}
    assert any(k.endswith(".base_layer.bias") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    loaded = PeftModel.from_pretrained(MODELS["bert"](), tmp_path / "theirs")
    assert max_diff(_logits(loaded, "bert"), _logits(theirs, "bert")) <= TOL
    back = peft.PeftModel.from_pretrained(MODELS["bert"](), tmp_path / "ours")
    assert max_diff(_logits(back, "bert"), _logits(ours, "bert")) <= TOL


def test_files_of_older_peft_are_refused_or_warned():
    with pytest.raises(ConfigError, match=r"0\.14"):  # PEFT < 0.14 wrote no oft_block_size
        OFTConfig.from_dict({"peft_type": "OFT", "r": 8, "target_modules": ["q_proj"]})
    with pytest.warns(UserWarning, match=r"before PEFT 0\.18"):
        OFTConfig.from_dict({"peft_type": "OFT", "peft_version": "0.17.1", "use_cayley_neumann": True})
    ours, _ = _pair("llama")
    key = "base_model.model.model.layers.0.self_attn.q_proj.oft_r"
    with pytest.raises(CheckpointError, match=r"0\.15"):
        ours.load_adapter_state_dict("default", {key: torch.zeros(4, 8, 8)})


def test_targets_that_match_nothing_name_the_fix():
    model = MODELS["llama"]()
    with pytest.raises(TargetError, match="nope"):
        get_peft_model(model, OFTConfig(target_modules=["nope"]))
    assert not any("oft" in n for n, _ in model.named_modules())


def test_composes_with_lora_on_other_modules_as_peft_s_mixed_model():
    from peft_core import LoraConfig

    lora = {"task_type": "CAUSAL_LM", "r": 2, "target_modules": ["q_proj"], "init_lora_weights": False}
    oft = {"task_type": "CAUSAL_LM", "target_modules": ["v_proj", "embed_tokens"], "oft_block_size": 8,
           "init_weights": False}
    torch.manual_seed(0)
    theirs = peft.get_peft_model(MODELS["llama"](), peft.LoraConfig(**lora), mixed=True)
    theirs.add_adapter("oft", peft.OFTConfig(**oft))
    theirs.set_adapter(["default", "oft"])
    ours = get_peft_model(MODELS["llama"](), LoraConfig(**lora))
    ours.add_adapter("oft", OFTConfig(**oft))
    ours.set_adapter(["default", "oft"])
    for adapter in ("default", "oft"):
        _copy(theirs, ours, adapter)
    with torch.no_grad():
        x = model_inputs("llama")
        assert max_diff(ours(**x).logits, theirs(**x).logits) <= TOL
    # PEFT's mixed model can also stack OFT on a LoRA layer of the same module; peft-core refuses it by name
    with pytest.raises(TargetError, match=r"q_proj.*already adapted by another method"):
        ours.add_adapter("over", OFTConfig(target_modules=["q_proj"]))
    assert "over" not in ours.peft_config


def test_tied_embedding_runs_as_peft_but_refuses_to_merge():
    """GPT-2's wte is also its lm_head: rotating it in place would rotate the output layer too (PEFT does, and
    its merged model then differs from its unmerged one)."""
    ours, theirs = _pair("gpt2", target_modules=["wte"])
    assert max_diff(_logits(ours, "gpt2"), _logits(theirs, "gpt2")) <= TOL
    before = clone_state(ours.base_model)
    with pytest.raises(MergeError, match=r"'transformer.wte'.*tied to 'lm_head'"):
        ours.merge_adapter()
    assert state_equal(clone_state(ours.base_model), before) and not ours.merged_adapters


def test_safe_merge_refuses_non_finite_rotations_before_changing_anything():
    ours, _ = _pair("llama", use_cayley_neumann=False)
    with torch.no_grad():
        ours.base_model.model.layers[1].self_attn.v_proj.oft_R["default"][0, 0] = float("nan")
    before = _base_weights(ours)  # (NaN != NaN: the adapter tensors are left out of the comparison)
    with pytest.raises(MergeError, match=r"NaN.*layers\.1\.self_attn\.v_proj"):
        ours.merge_adapter(safe_merge=True)
    assert state_equal(_base_weights(ours), before) and not ours.merged_adapters


def test_a_block_size_that_does_not_divide_warns_per_layer_as_peft():
    with pytest.warns(UserWarning, match=r"Adjusted `oft_block_size` to \(8\) for model\.layers\.0\.self_attn\.q_proj"):
        model = get_peft_model(MODELS["llama"](), OFTConfig(oft_block_size=12, target_modules=["q_proj"]))
    assert model.base_model.model.layers[0].self_attn.q_proj.oft_R["default"].shape == (4, 28)


def test_rotation_maths_by_hand():
    from peft_oft.rotation import nearest_divisor, rotations, skew_symmetric

    torch.manual_seed(0)
    packed = torch.randn(3, 6, dtype=torch.float64) * 0.1  # blocks of 4: 6 entries above the diagonal
    q = skew_symmetric(packed, 4)
    assert torch.equal(q[0, 0, 1:], packed[0, :3]) and torch.equal(q[0, 1, 2:], packed[0, 3:5])
    assert torch.equal(q, -q.transpose(-2, -1))
    eye = torch.eye(4, dtype=torch.float64)
    cayley = rotations(packed, 4, neumann=False, terms=5)
    assert torch.allclose(cayley @ cayley.transpose(-2, -1), eye.expand(3, 4, 4), atol=1e-12)
    assert torch.allclose(cayley, (eye - q) @ torch.linalg.inv(eye + q), atol=1e-12)
    # the series I + 2Q + 2Q^2 + ... + 2Q^(m-2) + Q^(m-1) (PEFT >= 0.18), for m = 5 and m = 2
    q2 = q @ q
    expected = eye + 2 * q + 2 * q2 + 2 * q2 @ q + q2 @ q2
    assert torch.allclose(rotations(packed, 4, neumann=True, terms=5), expected, atol=1e-12)
    assert torch.allclose(rotations(packed, 4, neumann=True, terms=2), eye + 2 * q, atol=1e-12)
    # PEFT's series is that of (I + Q)(I - Q)^-1: the transpose (inverse) of its exact Cayley transform
    assert torch.allclose(rotations(packed, 4, neumann=True, terms=40), cayley.transpose(-2, -1), atol=1e-9)
    assert [nearest_divisor(32, v) for v in (12, 5, 7, 40, 3)] == [8, 4, 8, 32, 2]


def test_registered_under_peft_s_name():
    import peft_core
    from peft_core import get_registry

    spec = next(s for s, _ in get_registry().methods() if s.name == "OFT")
    assert spec.config_cls is OFTConfig is peft_core.OFTConfig and spec.mergeable
    assert OFTConfig.peft_type == peft.PeftType.OFT.value
