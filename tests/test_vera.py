"""The built-in VeRA plugin against Hugging Face PEFT 0.21 (an oracle only): the projections bit for bit, logits,
files both ways (with and without the projections), merge, several adapters, training, and the refusals."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from conftest import MODELS, clone_state, model_inputs, state_equal
from peft_core import AdapterError, CheckpointError, ConfigError, PeftModel, TargetError, VeraConfig, get_peft_model
from safetensors.torch import load_file
from torch import nn

TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM", "bert": "SEQ_CLS"}

pytestmark = pytest.mark.filterwarnings("ignore:.*save_projection.*", "ignore:.*fan_in_fan_out.*")


def _logits(model: nn.Module, name: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**model_inputs(name)).logits


def _pair(name: str, **kw):
    """PEFT's adapter with raw (non-identity) vectors, and ours with PEFT's tensors loaded into it."""
    torch.manual_seed(5)
    ref = peft.get_peft_model(MODELS[name](), peft.VeraConfig(task_type=TASK[name], r=8, init_weights=False, **kw))
    ours = get_peft_model(MODELS[name](), VeraConfig(task_type=TASK[name], r=8, **kw))
    ours.load_adapter_state_dict("default", {k: v.clone() for k, v in peft.get_peft_model_state_dict(ref).items()})
    return ref, ours


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5", "bert"])
def test_projections_logits_files_and_config_match_peft(name, tmp_path):
    torch.manual_seed(5)
    ref = peft.get_peft_model(MODELS[name](), peft.VeraConfig(task_type=TASK[name], r=8, init_weights=False))
    ours = get_peft_model(MODELS[name](), VeraConfig(task_type=TASK[name], r=8))
    theirs_sd, ours_sd = peft.get_peft_model_state_dict(ref), ours.get_adapter_state_dict("default")
    assert set(ours_sd) == set(theirs_sd)
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in theirs_sd.items()}
    for key in ("base_model.vera_A", "base_model.vera_B"):  # drawn independently from the seed: the same bits
        assert torch.equal(ours_sd[key], theirs_sd[key]), key
    assert _logits(ours, name).equal(_logits(MODELS[name](), name))  # lambda_b = 0: the identity at init
    ours.load_adapter_state_dict("default", {k: v.clone() for k, v in theirs_sd.items()})
    expected = _logits(ref, name)
    assert not torch.allclose(expected, _logits(MODELS[name](), name), atol=1e-3)  # the adapter does something
    assert torch.allclose(_logits(ours, name), expected, atol=1e-5)
    ref.save_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")
    theirs_cfg = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert ours_cfg["peft_type"] == "VERA"
    assert set(ours_cfg) == set(theirs_cfg)
    assert set(ours_cfg["target_modules"]) == set(theirs_cfg["target_modules"])
    for key in ("fan_in_fan_out", "r", "projection_prng_key", "save_projection", "d_initial", "bias"):
        assert ours_cfg[key] == theirs_cfg[key], key
    loaded = PeftModel.from_pretrained(MODELS[name](), tmp_path / "theirs")
    assert torch.allclose(_logits(loaded, name), expected, atol=1e-5)
    back = peft.PeftModel.from_pretrained(MODELS[name](), tmp_path / "ours")
    assert torch.allclose(_logits(back, name), expected, atol=1e-5)


def test_projections_are_stored_once_and_never_trained():
    ours = get_peft_model(MODELS["llama"](), VeraConfig(task_type="CAUSAL_LM", r=8,
                                                        target_modules=["q_proj", "v_proj", "down_proj"]))
    buffers = [n for n, _ in ours.named_buffers(remove_duplicate=False) if "vera_" in n]
    assert buffers == ["adapter_modules.default.vera_A", "adapter_modules.default.vera_B"]
    store = ours.adapter_modules["default"]
    assert store.vera_A.shape == (8, 64) and store.vera_B.shape == (32, 8)  # the largest in (down_proj), out
    assert all("vera_lambda" in n for n, p in ours.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_save_projection_false_regenerates_peft_projections_both_ways(name, tmp_path):
    ref, ours = _pair(name, save_projection=False)
    expected = _logits(ref, name)
    assert torch.allclose(_logits(ours, name), expected, atol=1e-5)
    ref.save_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")
    for folder in ("theirs", "ours"):
        keys = load_file(tmp_path / folder / "adapter_model.safetensors")
        assert not any("vera_A" in k or "vera_B" in k for k in keys)
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == set(
        load_file(tmp_path / "theirs" / "adapter_model.safetensors"))
    loaded = PeftModel.from_pretrained(MODELS[name](), tmp_path / "theirs")
    assert torch.allclose(_logits(loaded, name), expected, atol=1e-5)
    back = peft.PeftModel.from_pretrained(MODELS[name](), tmp_path / "ours")
    assert torch.allclose(_logits(back, name), expected, atol=1e-5)


def test_missing_projections_with_save_projection_true_is_refused(tmp_path):
    _, ours = _pair("llama", save_projection=False)
    ours.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "save_projection": True}))
    with pytest.raises(ValueError, match="not present"):  # PEFT's refusal
        peft.PeftModel.from_pretrained(MODELS["llama"](), tmp_path)
    with pytest.raises(CheckpointError, match="save_projection=True"):
        PeftModel.from_pretrained(MODELS["llama"](), tmp_path)
    _, ours = _pair("llama")
    partial = {k: v for k, v in ours.state_dict().items() if not k.startswith("adapter_modules.")}
    with pytest.raises(CheckpointError, match="save_projection=True"):  # PEFT raises a ValueError here too
        ours.get_adapter_state_dict("default", partial)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_merge_is_exact_and_unmerge_restores_bits(name):
    ref, ours = _pair(name)
    before = clone_state(ours.base_model)
    expected = _logits(ours, name)
    ours.merge_adapter()
    assert torch.allclose(_logits(ours, name), expected, atol=1e-5)
    ours.unmerge_adapter()
    assert state_equal(clone_state(ours.base_model), before)
    merged = ours.merge_and_unload()
    assert not any("vera" in n for n, _ in merged.named_modules())
    assert torch.allclose(_logits(merged, name), expected, atol=1e-5)
    theirs = ref.merge_and_unload()  # PEFT's merged weights are ours within rounding
    for (n, a), (_, b) in zip(theirs.named_parameters(), merged.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_safe_merge_refuses_nan_and_changes_nothing():
    _, ours = _pair("llama")
    layer = ours.base_model.model.layers[1].self_attn.v_proj
    with torch.no_grad():
        layer.vera_lambda_b["default"][0] = float("nan")
    before = {k: v for k, v in clone_state(ours.base_model).items() if "vera_" not in k}  # NaN != NaN
    with pytest.raises(ValueError, match="NaN"):
        ours.merge_adapter(safe_merge=True)
    assert state_equal({k: v for k, v in clone_state(ours.base_model).items() if "vera_" not in k}, before)
    assert not ours.base_model.model.layers[0].self_attn.q_proj.merged_adapters  # all or nothing


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_print_trainable_parameters_matches_peft(name, capsys):
    peft.get_peft_model(MODELS[name](), peft.VeraConfig(task_type=TASK[name], r=16)).print_trainable_parameters()
    theirs = capsys.readouterr().out
    get_peft_model(MODELS[name](), VeraConfig(task_type=TASK[name], r=16)).print_trainable_parameters()
    assert capsys.readouterr().out == theirs


def test_several_adapters_match_peft_and_disable_gives_base():
    ref, ours = _pair("llama", target_modules=["q_proj", "down_proj"])
    torch.manual_seed(3)
    ref.add_adapter("b", peft.VeraConfig(task_type="CAUSAL_LM", r=8, target_modules=["v_proj"], init_weights=False))
    ours.add_adapter("b", VeraConfig(task_type="CAUSAL_LM", r=8, target_modules=["v_proj"]))
    theirs_b = peft.get_peft_model_state_dict(ref, adapter_name="b")
    ours_b = ours.get_adapter_state_dict("b")
    assert set(ours_b) == set(theirs_b)
    # a later adapter gets the first one's projections (sized by the first adapter's targets), as in PEFT
    assert torch.equal(ours_b["base_model.vera_A"], theirs_b["base_model.vera_A"])
    assert ours.adapter_modules["b"].vera_A.data_ptr() != ours.adapter_modules["default"].vera_A.data_ptr()
    ours.load_adapter_state_dict("b", {k: v.clone() for k, v in theirs_b.items()})
    ref.base_model.set_adapter(["default", "b"])
    ours.set_adapter(["default", "b"])
    assert torch.allclose(_logits(ref, "llama"), _logits(ours, "llama"), atol=1e-5)
    ref.set_adapter("b")
    ours.set_adapter("b")
    assert torch.allclose(_logits(ref, "llama"), _logits(ours, "llama"), atol=1e-5)
    base = _logits(MODELS["llama"](), "llama")
    with ours.disable_adapter():
        assert torch.equal(_logits(ours, "llama"), base)
    ours.delete_adapter("default")
    assert list(ours.peft_config) == ["b"] and "default" not in ours.adapter_modules
    assert torch.allclose(_logits(ref, "llama"), _logits(ours, "llama"), atol=1e-5)  # b keeps its own copy
    ours.delete_adapter("b")
    assert not any("vera" in n for n, _ in ours.base_model.named_modules())


@pytest.mark.parametrize(("kw", "match"), [
    ({"projection_prng_key": 1}, "projection_prng_key"),
    ({"save_projection": False}, "save_projection"),
    ({"r": 16}, "r=8"),
    ({"r": 4}, "r=8"),
    ({"target_modules": ["down_proj"]}, "input features"),
    ({"bias": "all"}, "only one VeRA adapter"),
])
def test_later_adapter_that_cannot_share_the_projections_is_refused(kw, match):
    _, ours = _pair("llama", target_modules=["q_proj"], bias="vera_only")
    before = clone_state(ours)
    tree = [(n, type(m).__name__) for n, m in ours.named_modules()]
    with pytest.raises((AdapterError, TargetError), match=match):
        ours.add_adapter("b", VeraConfig(task_type="CAUSAL_LM", **{"r": 8, **kw}))
    assert list(ours.peft_config) == ["default"]
    assert state_equal(clone_state(ours), before)
    assert [(n, type(m).__name__) for n, m in ours.named_modules()] == tree


def test_mixed_batch_is_refused_and_bad_targets_leave_model_untouched():
    _, ours = _pair("llama")
    with pytest.raises(AdapterError):
        ours(**model_inputs("llama"), adapter_names=["default", "__base__"])
    for targets, match in ((["embed_tokens"], "embed_tokens.*Embedding"), (["nothere"], "nothere|target_modules")):
        model = MODELS["llama"]()
        before = clone_state(model)
        with pytest.raises(TargetError, match=match):
            get_peft_model(model, VeraConfig(r=8, target_modules=targets))
        assert state_equal(clone_state(model), before)
        assert not any("vera" in type(m).__name__.lower() for m in model.modules())


def test_training_lowers_loss_keeps_base_and_projection_bits():
    ours = get_peft_model(MODELS["llama"](), VeraConfig(task_type="CAUSAL_LM", r=16, target_modules="all-linear"))
    base = {k: v for k, v in clone_state(ours).items() if "vera_lambda" not in k}
    inputs = model_inputs("llama")
    opt = torch.optim.Adam([p for p in ours.parameters() if p.requires_grad], lr=0.05)
    losses = []
    ours.train()
    for _ in range(8):
        loss = ours(**inputs, labels=inputs["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    now = {k: v for k, v in clone_state(ours).items() if "vera_lambda" not in k}
    assert state_equal(now, base)  # the base weights and the shared projections alike


def test_bf16_model_and_autocast_match_peft_loosely():
    torch.manual_seed(5)
    ref = peft.get_peft_model(MODELS["llama"]().to(torch.bfloat16),
                              peft.VeraConfig(task_type="CAUSAL_LM", r=8, init_weights=False))
    ours = get_peft_model(MODELS["llama"]().to(torch.bfloat16), VeraConfig(task_type="CAUSAL_LM", r=8))
    ours.load_adapter_state_dict("default", {k: v.clone() for k, v in peft.get_peft_model_state_dict(ref).items()})
    assert all(p.dtype == torch.float32 for n, p in ours.named_parameters() if "vera_lambda" in n)
    assert ours.adapter_modules["default"].vera_A.dtype == torch.float32
    theirs, mine = _logits(ref, "llama"), _logits(ours, "llama")
    assert mine.dtype == torch.bfloat16
    assert torch.allclose(theirs.float(), mine.float(), atol=2e-2)
    before = clone_state(ours.base_model)
    ours.merge_adapter()
    ours.unmerge_adapter()
    assert state_equal(clone_state(ours.base_model), before)
    fp32 = get_peft_model(MODELS["llama"](), VeraConfig(task_type="CAUSAL_LM", r=8))
    fp32.load_adapter_state_dict("default", {k: v.clone() for k, v in peft.get_peft_model_state_dict(ref).items()})
    inputs = model_inputs("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fp32(**inputs, labels=inputs["input_ids"])
        with torch.no_grad():
            theirs = peft.get_peft_model(MODELS["llama"](), peft.VeraConfig(task_type="CAUSAL_LM", r=8))
            theirs.load_state_dict(ref.state_dict(), strict=False)
            expected = theirs(**inputs).logits
    assert torch.allclose(out.logits.float(), expected.float(), atol=5e-2)
    out.loss.backward()
    grads = [p.grad for p in fp32.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_dropout_acts_in_training_only():
    ref, ours = _pair("llama", vera_dropout=0.5)
    ref.eval()  # PEFT's new dropout modules start in training mode even in an eval-mode model; ours follow the model
    assert torch.allclose(_logits(ours, "llama"), _logits(ref, "llama"), atol=1e-5)  # eval: no dropout, as PEFT
    ours.train()
    torch.manual_seed(0)
    first = _logits(ours, "llama")
    torch.manual_seed(1)
    assert not torch.allclose(first, _logits(ours, "llama"))
    _, dropped = _pair("llama", vera_dropout=1.0)  # every input of the branch dropped: the base output
    dropped.train()
    base = MODELS["llama"]().train()
    assert torch.equal(_logits(dropped, "llama"), _logits(base, "llama"))
    dropped.eval()
    assert not torch.allclose(_logits(dropped, "llama"), _logits(base, "llama"), atol=1e-3)


@pytest.mark.parametrize("bias", ["vera_only", "all"])
def test_bias_training_matches_peft_files_and_counts(bias, capsys, tmp_path):
    kw = {"task_type": "SEQ_CLS", "r": 8, "bias": bias}
    ref = peft.get_peft_model(MODELS["bert"](), peft.VeraConfig(**kw))
    ref.print_trainable_parameters()
    ours = get_peft_model(MODELS["bert"](), VeraConfig(**kw))
    ours.print_trainable_parameters()
    theirs_line, ours_line = capsys.readouterr().out.splitlines()
    assert ours_line == theirs_line
    # PEFT's bias="all" also repeats the classifier copy's bias as modules_to_save.bias / original_module.bias;
    # those duplicates are read (the test loads PEFT's file below) but not written
    theirs = {k for k in peft.get_peft_model_state_dict(ref)
              if not k.endswith((".modules_to_save.bias", ".original_module.bias"))}
    assert set(ours.get_adapter_state_dict("default")) == theirs
    with torch.no_grad():
        for p in ref.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(MODELS["bert"](), tmp_path)
    assert torch.allclose(_logits(loaded, "bert"), _logits(ref, "bert"), atol=1e-5)


def test_layers_to_transform_matches_peft_and_config_checks():
    kw = {"task_type": "CAUSAL_LM", "r": 8, "target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1]}
    ref = peft.get_peft_model(MODELS["llama"](), peft.VeraConfig(**kw))
    ours = get_peft_model(MODELS["llama"](), VeraConfig(**kw))
    assert set(ours.get_adapter_state_dict("default")) == set(peft.get_peft_model_state_dict(ref))
    assert torch.equal(ours.get_adapter_state_dict("default")["base_model.vera_A"],
                       peft.get_peft_model_state_dict(ref)["base_model.vera_A"])
    with pytest.raises(ConfigError, match="layers_pattern"):
        VeraConfig(layers_pattern="layers")
    with pytest.raises(ConfigError, match="r"):
        VeraConfig(r=0)
    with pytest.raises(ConfigError, match="bias"):
        VeraConfig(bias="lora_only")


def test_two_adapter_folders_load_both_ways(tmp_path):
    torch.manual_seed(5)
    kw = {"task_type": "CAUSAL_LM", "r": 8, "init_weights": False}
    ref = peft.get_peft_model(MODELS["llama"](), peft.VeraConfig(target_modules=["q_proj", "down_proj"], **kw))
    ref.add_adapter("b", peft.VeraConfig(target_modules=["v_proj"], **kw))
    ref.save_pretrained(tmp_path / "theirs")
    ours = PeftModel.from_pretrained(MODELS["llama"](), tmp_path / "theirs", low_cpu_mem_usage=True)
    ours.load_adapter(tmp_path / "theirs" / "b", adapter_name="b")
    for name in ("default", "b"):
        ref.set_adapter(name)
        ours.set_adapter(name)
        assert torch.allclose(_logits(ours, "llama"), _logits(ref, "llama"), atol=1e-5), name
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(MODELS["llama"](), tmp_path / "ours")
    back.load_adapter(tmp_path / "ours" / "b", adapter_name="b")
    back.set_adapter("b")
    assert torch.allclose(_logits(back, "llama"), _logits(ours, "llama"), atol=1e-5)


def test_composes_with_lora_on_other_modules_and_refuses_its_layers():
    from peft_core import LoraConfig

    model = get_peft_model(MODELS["llama"](), LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False))
    lora_only = _logits(model, "llama")
    model.add_adapter("v", VeraConfig(r=8, target_modules=["q_proj"], init_weights=False))
    model.set_adapter(["default", "v"])
    both = _logits(model, "llama")
    assert not torch.allclose(both, lora_only, atol=1e-4)
    before = clone_state(model)
    with pytest.raises(TargetError, match=r"k_proj.*another method"):
        model.add_adapter("v2", VeraConfig(r=8, target_modules=["k_proj"]))
    assert state_equal(clone_state(model), before) and "v2" not in model.peft_config
    model.merge_adapter()
    assert torch.allclose(_logits(model, "llama"), both, atol=1e-5)
    model.unmerge_adapter()
    assert state_equal(clone_state(model), before)


def test_composes_with_prompt_tuning():
    from peft_core import PromptTuningConfig

    model = get_peft_model(MODELS["llama"](), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    prompt_only = _logits(model, "llama")
    model.add_adapter("v", VeraConfig(task_type="CAUSAL_LM", r=8, target_modules=["q_proj"], init_weights=False))
    model.set_adapter(["default", "v"])
    both = _logits(model, "llama")
    assert both.shape == prompt_only.shape and not torch.allclose(both, prompt_only, atol=1e-4)
    model.set_adapter("v")
    assert _logits(model, "llama").shape[1] == prompt_only.shape[1] - 3  # no virtual tokens without the prompt


@pytest.mark.parametrize(("name", "targets"), [("llama", "all-linear"), ("gpt2", "all-linear"),
                                               ("t5", r".*\.(q|k)$")])
def test_projection_sizes_follow_the_targets_like_peft(name, targets):
    ref = peft.get_peft_model(MODELS[name](), peft.VeraConfig(task_type=TASK[name], r=8, target_modules=targets))
    ours = get_peft_model(MODELS[name](), VeraConfig(task_type=TASK[name], r=8, target_modules=targets))
    theirs_sd, ours_sd = peft.get_peft_model_state_dict(ref), ours.get_adapter_state_dict("default")
    assert set(ours_sd) == set(theirs_sd)
    for key in ("base_model.vera_A", "base_model.vera_B"):
        assert torch.equal(ours_sd[key], theirs_sd[key]), key


def test_listed_under_peft_type_and_unload_restores_the_plain_model(capsys):
    from peft_core.cli import main

    assert main(["list-methods", "--json"]) == 0
    methods = {m["method"]: m for m in json.loads(capsys.readouterr().out)["methods"]}
    assert methods["VERA"]["mergeable"] in (True, "yes")
    model = MODELS["gpt2"]()
    before = clone_state(model)
    _, ours = _pair("gpt2")
    ours.merge_adapter()
    plain = ours.unload()  # unmerges first: the original weights, bit for bit
    assert state_equal(clone_state(plain), before)
    assert not any("vera" in type(m).__name__.lower() for m in plain.modules())
