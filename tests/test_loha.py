"""The built-in LoHa plugin against Hugging Face PEFT 0.21 (an oracle only): logits, seeded init and training
forwards, files both ways, merging, several adapters, composition, dtypes, dropout options, convs, and the refusals
(GPT-2's Conv1D, which PEFT's LoHa refuses too; mixed batches, which PEFT's LoHa ignores)."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from conftest import MODELS, clone_state, copy_adapter_weights, model_inputs, module_tree, state_equal
from peft_core import (
    AdapterError,
    ConfigError,
    LoHaConfig,
    LoraConfig,
    MergeError,
    PeftModel,
    PromptTuningConfig,
    TargetError,
    get_peft_model,
    get_registry,
)
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


@pytest.mark.parametrize("name", list(TASK))
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


@pytest.mark.parametrize("init_weights", [True, False])
def test_seeded_init_is_peft_s_and_init_weights_true_is_the_identity(init_weights):
    models = MODELS["llama"](), MODELS["llama"]()
    torch.manual_seed(5)
    theirs = peft.get_peft_model(models[0], peft.LoHaConfig(task_type="CAUSAL_LM", r=4, init_weights=init_weights))
    torch.manual_seed(5)
    ours = get_peft_model(models[1], LoHaConfig(task_type="CAUSAL_LM", r=4, init_weights=init_weights))
    mine, ref = ours.get_adapter_state_dict("default"), peft.get_peft_model_state_dict(theirs)
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in mine)
    w2_b = [v for k, v in mine.items() if k.endswith("hada_w2_b")]
    assert all(bool((v == 0).all()) == init_weights for v in w2_b)
    assert all(float(v.abs().max()) > 0 for k, v in mine.items() if not k.endswith("hada_w2_b"))
    if init_weights:  # dW = 0 exactly: the base model's logits, bit for bit
        assert torch.equal(_logits(ours, "llama"), _logits(MODELS["llama"](), "llama"))


def _train_outputs(model: nn.Module, seed: int = 7, prefix: str = "base_model."):
    x = model_inputs("llama")
    torch.manual_seed(seed)
    out = model(**x, labels=x["input_ids"])
    out.loss.backward()
    grads = {n.removeprefix(prefix): p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


def test_dropouts_draw_like_peft_in_training_and_do_nothing_in_eval():
    kw = {"rank_dropout": 0.5, "module_dropout": 0.5}
    ours, theirs = _pair("llama", **kw)
    plain, _ = _pair("llama")
    copy_adapter_weights(theirs, plain)
    # eval: neither dropout acts (the same logits as without them)
    assert torch.equal(_logits(ours, "llama"), _logits(plain, "llama"))
    ours.train(), theirs.train()
    # training: PEFT's draws (torch.rand(1) per adapter and layer, then one per output row) in PEFT's order
    lo, go = _train_outputs(ours)
    lt, gt = _train_outputs(theirs, prefix="base_model.model.")
    assert _diff(lo, lt) <= TOL
    assert go.keys() == gt.keys() and 0 < len(go) < 16  # module dropout skipped some layers alike
    assert all(_diff(go[k], gt[k]) <= TOL for k in go)
    # and they do act: another seed gives another loss, and module_dropout=1 skips every adapter
    assert _diff(_train_outputs(ours, seed=8)[0], lo) > 1e-6
    skipped, _ = _pair("llama", module_dropout=1.0)
    base = MODELS["llama"]()
    skipped.train(), base.train()
    x = model_inputs("llama")
    with torch.no_grad():
        assert torch.equal(skipped(**x).logits, base(**x).logits)


def test_training_lowers_loss_and_keeps_base_bits():
    ours = get_peft_model(MODELS["llama"](), LoHaConfig(task_type="CAUSAL_LM", r=4, rank_dropout=0.1))
    base = {k: v for k, v in clone_state(ours.base_model).items() if "hada_" not in k}
    x = model_inputs("llama")
    ours.train()
    opt = torch.optim.Adam([p for p in ours.parameters() if p.requires_grad], lr=0.02)
    losses = []
    for _ in range(8):
        loss = ours(**x, labels=x["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    assert state_equal({k: v for k, v in clone_state(ours.base_model).items() if "hada_" not in k}, base)


@pytest.mark.parametrize("name", list(TASK))
def test_print_trainable_parameters_matches_peft(name, capsys):
    cfg = {"task_type": TASK[name], "r": 4}
    if name == "llama":
        cfg.update(target_modules=["q_proj", "down_proj"], rank_pattern={"down_proj": 2})
    peft.get_peft_model(MODELS[name](), peft.LoHaConfig(**cfg)).print_trainable_parameters()
    theirs = capsys.readouterr().out
    get_peft_model(MODELS[name](), LoHaConfig(**cfg)).print_trainable_parameters()
    assert capsys.readouterr().out == theirs and theirs.startswith("trainable params: ")


def test_rank_and_alpha_patterns_match_peft():
    ours, theirs = _pair("llama", target_modules=["q_proj", "v_proj", "down_proj"],
                         rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.down_proj": 3},
                         alpha_pattern={"q_proj": 3})
    sd = ours.get_adapter_state_dict("default")
    assert sd["base_model.model.model.layers.0.self_attn.v_proj.hada_w1_a"].shape == (16, 2)
    assert sd["base_model.model.model.layers.1.mlp.down_proj.hada_w1_b"].shape == (3, 64)
    assert sd["base_model.model.model.layers.0.mlp.down_proj.hada_w1_b"].shape == (4, 64)
    layer = ours.base_model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == 3 / 4
    assert _diff(_logits(ours, "llama"), _logits(theirs, "llama")) <= TOL


def test_several_adapters_match_peft_and_disable_gives_the_base():
    ours, theirs = _pair("llama")
    cfg = {"task_type": "CAUSAL_LM", "r": 2, "alpha": 5, "init_weights": False, "target_modules": ["k_proj", "q_proj"]}
    theirs.add_adapter("b", peft.LoHaConfig(**cfg))
    ours.add_adapter("b", LoHaConfig(**cfg))
    copy_adapter_weights(theirs, ours, "b")
    theirs.base_model.set_adapter(["default", "b"])
    ours.set_adapter(["default", "b"])
    both = _logits(ours, "llama")
    assert _diff(both, _logits(theirs, "llama")) <= TOL
    before = clone_state(ours.base_model)
    ours.merge_adapter()
    assert _diff(_logits(ours, "llama"), both) <= TOL
    ours.unmerge_adapter()
    ours.unmerge_adapter()
    assert not ours.merged_adapters and state_equal(clone_state(ours.base_model), before)
    base = _logits(MODELS["llama"](), "llama")
    with ours.disable_adapter():
        assert torch.equal(_logits(ours, "llama"), base)
    ours.set_adapter("b")
    theirs.set_adapter("b")
    assert _diff(_logits(ours, "llama"), _logits(theirs, "llama")) <= TOL
    ours.delete_adapter("default")
    theirs.delete_adapter("default")
    assert list(ours.peft_config) == ["b"] and ours.active_adapters == ["b"]
    assert not any(".default" in n for n, _ in ours.named_parameters())
    assert _diff(_logits(ours, "llama"), _logits(theirs, "llama")) <= TOL
    ours.delete_adapter("b")
    assert not any("hada_" in n for n, _ in ours.named_parameters())
    assert torch.equal(_logits(ours, "llama"), base)


def test_mixed_batches_are_refused_as_peft_has_none():
    ours, _ = _pair("llama")
    expected = _logits(ours, "llama")
    # PEFT 0.21 silently applies the active adapter to every row, "__base__" rows included; we refuse instead
    with pytest.raises(AdapterError, match="q_proj"):
        ours(**model_inputs("llama"), adapter_names=["default", "__base__"])
    assert torch.equal(_logits(ours, "llama"), expected)  # and the model is as it was


def test_gpt2_is_refused_like_peft_and_bad_targets_leave_the_model_untouched():
    with pytest.raises(TypeError, match="Conv1D"):  # PEFT 0.21 has no LoHa layer for GPT-2's Conv1D
        peft.get_peft_model(MODELS["gpt2"](), peft.LoHaConfig(task_type="CAUSAL_LM"))
    for name, cfg in [("gpt2", {}), ("gpt2", {"target_modules": "all-linear"}),
                      ("llama", {"target_modules": ["embed_tokens"]}), ("llama", {"target_modules": ["nope"]})]:
        model = MODELS[name]()
        before, tree = clone_state(model), module_tree(model)
        with pytest.raises(TargetError) as err:
            get_peft_model(model, LoHaConfig(task_type="CAUSAL_LM", **cfg))
        message = str(err.value)
        culprit = {"gpt2": "Conv1D", "embed_tokens": "Embedding", "nope": "matched no module"}
        assert culprit["gpt2" if name == "gpt2" else cfg["target_modules"][0]] in message
        assert "exclude_modules" in message or "adaptable layers are named" in message  # says what to do
        assert state_equal(clone_state(model), before) and module_tree(model) == tree


def test_config_refusals():
    with pytest.raises(ConfigError, match="layers_to_transform"):
        LoHaConfig(layers_pattern="layers")
    with pytest.raises(ConfigError, match="r"):
        LoHaConfig(r=0)
    with pytest.raises(ConfigError, match="rank_pattern"):
        LoHaConfig(rank_pattern={"q_proj": 0})
    with pytest.raises(ConfigError, match="module_dropout"):
        LoHaConfig(module_dropout=1.5)
    assert LoHaConfig(rank_dropout=0).rank_dropout == 0.0


def test_bf16_model_and_autocast():
    ours, theirs = _pair("llama")
    ours.to(torch.bfloat16), theirs.to(torch.bfloat16)
    x = model_inputs("llama")
    assert _diff(_logits(ours, "llama"), _logits(theirs, "llama")) <= 0.05
    # a bf16 base model gets float32 factors (autocast_adapter_dtype, as in PEFT), and merges exactly
    fresh = get_peft_model(MODELS["llama"]().to(torch.bfloat16), LoHaConfig(task_type="CAUSAL_LM", init_weights=False))
    assert all(p.dtype == torch.float32 for n, p in fresh.named_parameters() if "hada_" in n)
    before = clone_state(fresh.base_model)
    expected = _logits(fresh, "llama")
    assert expected.dtype == torch.bfloat16
    fresh.merge_adapter()
    assert _diff(_logits(fresh, "llama"), expected) <= 0.05
    fresh.unmerge_adapter()
    assert state_equal(clone_state(fresh.base_model), before)
    # autocast on a float32 model: a training step in bf16 with finite gradients, close to PEFT's
    ours, theirs = _pair("llama")
    for model in (ours, theirs):
        model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lo = ours(**x, labels=x["input_ids"]).loss
        lt = theirs(**x, labels=x["input_ids"]).loss
    assert abs(float(lo) - float(lt)) <= 0.05
    lo.backward()
    grads = [p.grad for p in ours.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_safe_merge_refuses_nan_and_changes_nothing():
    ours, _ = _pair("llama")
    before = clone_state(ours.base_model)
    with torch.no_grad():
        ours.base_model.model.layers[1].self_attn.v_proj.hada_w1_a["default"][0, 0] = float("nan")
    with pytest.raises(MergeError, match="NaN"):
        ours.merge_adapter(safe_merge=True)
    assert not ours.merged_adapters
    after = clone_state(ours.base_model)
    assert all(torch.equal(after[k], before[k]) for k in before if "hada_" not in k)


class _Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, stride=2)
        self.g2 = nn.Conv2d(6, 6, 3, groups=2, padding=1)
        self.p2 = nn.Conv2d(6, 5, 1)
        self.lin = nn.Linear(5, 3)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        h = self.p2(self.g2(self.c2(x2))).mean((-1, -2))
        return self.lin(h) + self.c1(x1).mean()


@pytest.mark.parametrize("effective", [False, True])
def test_conv_layers_match_peft_and_merge_exactly(effective):
    torch.manual_seed(0)
    x1, x2 = torch.randn(2, 4, 9), torch.randn(2, 4, 9, 9)
    kw = {"r": 3, "alpha": 5, "init_weights": False, "use_effective_conv2d": effective,
          "target_modules": ["c1", "c2", "g2", "p2", "lin"], "rank_dropout": 0.3, "module_dropout": 0.2}
    torch.manual_seed(1)
    theirs = peft.get_peft_model(_Convs(), peft.LoHaConfig(**kw))
    torch.manual_seed(1)
    ours = get_peft_model(_Convs(), LoHaConfig(**kw))
    sd = ours.get_adapter_state_dict("default")
    ref = peft.get_peft_model_state_dict(theirs)
    # same shapes (the Tucker cores only on kernels wider than 1) and, from the same seed, the same values
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in ref.items()}
    assert all(torch.equal(sd[k], ref[k]) for k in sd)
    assert any("hada_t1" in k for k in sd) == effective and not any("p2.hada_t1" in k for k in sd)
    ours.eval(), theirs.eval()  # a fresh nn.Module is in training mode, where the dropouts act
    with torch.no_grad():
        expected = theirs(x1, x2)
        assert _diff(ours(x1, x2), expected) <= 1e-4
        before = clone_state(ours.base_model)
        ours.merge_adapter()
        assert _diff(ours(x1, x2), expected) <= 1e-4
        ours.unmerge_adapter()
        assert state_equal(clone_state(ours.base_model), before)
        # training: the dropout masks (rows of the 4-D and 3-D kernels too) are drawn as PEFT draws them
        ours.train(), theirs.train()
        draws = []
        for seed in (3, 4):
            torch.manual_seed(seed)
            draws.append(ours(x1, x2))
            torch.manual_seed(seed)
            assert _diff(draws[-1], theirs(x1, x2)) <= 1e-4
        assert _diff(draws[0], draws[1]) > 1e-3  # the masks did act


def _merged_peft_loha(ours, adapter: str, **kw) -> nn.Module:
    """A fresh base with PEFT's LoHa holding our adapter's factors, merged in (PEFT's own merge)."""
    ref = peft.get_peft_model(MODELS["llama"](), peft.LoHaConfig(task_type="CAUSAL_LM", **kw))
    peft.set_peft_model_state_dict(ref, ours.get_adapter_state_dict(adapter))
    return ref.merge_and_unload()


def test_composes_with_lora_on_other_modules_and_with_prompt_tuning(tmp_path):
    loha = {"r": 4, "alpha": 16, "init_weights": False}
    lora = {"r": 2, "lora_alpha": 4, "target_modules": ["k_proj", "o_proj"], "init_lora_weights": False}
    ours = get_peft_model(MODELS["llama"](), LoHaConfig(task_type="CAUSAL_LM", **loha))
    ours.add_adapter("lora", LoraConfig(task_type="CAUSAL_LM", **lora))
    ours.add_adapter("prompt", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    # LoHa + LoRA: PEFT's LoHa merged into the base, then PEFT's LoRA with our LoRA weights on top
    ours.set_adapter(["default", "lora"])
    ref = peft.get_peft_model(_merged_peft_loha(ours, "default", **loha), peft.LoraConfig(task_type="CAUSAL_LM",
                                                                                         **lora))
    peft.set_peft_model_state_dict(ref, ours.get_adapter_state_dict("lora"))
    assert _diff(_logits(ours, "llama"), _logits(ref, "llama")) <= TOL
    # LoHa + prompt tuning: the same, with PEFT's prompt tuning on the LoHa-merged base
    ours.set_adapter(["default", "prompt"])
    ref = peft.get_peft_model(_merged_peft_loha(ours, "default", **loha),
                              peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    peft.set_peft_model_state_dict(ref, ours.get_adapter_state_dict("prompt"))
    assert _diff(_logits(ours, "llama"), _logits(ref, "llama")) <= TOL
    # LoHa on a module LoRA already wraps is refused, naming it, and the model is left as it was
    tree = module_tree(ours)
    with pytest.raises(TargetError, match=r"k_proj.*another method"):
        ours.add_adapter("clash", LoHaConfig(task_type="CAUSAL_LM", target_modules=["k_proj"]))
    assert module_tree(ours) == tree and "clash" not in ours.peft_config


def test_conv_update_uses_the_base_padding_mode_so_merged_equals_unmerged():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))
    x = torch.randn(2, 3, 6, 6)
    ours = get_peft_model(net, LoHaConfig(r=2, alpha=4, init_weights=False, target_modules=["0"]))
    layer = ours.base_model[0]
    with torch.no_grad():
        by_hand = layer.base_layer._conv_forward(x, layer.base_layer.weight + layer.delta_weight("default"),
                                                 layer.base_layer.bias)
        unmerged = ours(x)
        ours.merge_adapter()
        assert _diff(ours(x), unmerged) <= 1e-5 and _diff(unmerged, by_hand) <= 1e-5


def test_low_cpu_mem_usage_and_trainable_loads(tmp_path):
    ours, _ = _pair("llama")
    ours.save_pretrained(tmp_path)
    expected = _logits(ours, "llama")
    lazy = PeftModel.from_pretrained(MODELS["llama"](), tmp_path, low_cpu_mem_usage=True)
    assert torch.equal(_logits(lazy, "llama"), expected)
    assert not any(p.requires_grad for p in lazy.parameters())  # inference by default, as PEFT
    trainable = PeftModel.from_pretrained(MODELS["llama"](), tmp_path, is_trainable=True)
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert names and all(".hada_w" in n for n in names)
    empty = get_peft_model(MODELS["llama"](), LoHaConfig(task_type="CAUSAL_LM"), low_cpu_mem_usage=True)
    assert all(p.is_meta for n, p in empty.named_parameters() if "hada_" in n)


def test_deleting_an_older_merged_adapter_keeps_the_newer_merged_and_unload_gives_the_base():
    ours, _ = _pair("llama")
    ours.add_adapter("b", LoHaConfig(task_type="CAUSAL_LM", r=2, init_weights=False))
    ours.set_adapter(["default", "b"])
    base = clone_state(MODELS["llama"]())
    q = ours.base_model.model.layers[0].self_attn.q_proj
    only_b = (q.base_layer.weight.detach().float() + q.delta_weight("b").detach()).to(q.weight.dtype)
    ours.merge_adapter()
    assert ours.merged_adapters == ["default", "b"]
    ours.delete_adapter("default")  # merged before b: b is taken out, default unmerged, b merged again
    assert ours.merged_adapters == ["b"]
    assert torch.equal(q.base_layer.weight, only_b)
    plain = ours.unload()  # unmerges first: the original bits
    assert state_equal(clone_state(plain), base)


def test_all_linear_files_load_both_ways(tmp_path):
    """PEFT writes the resolved module paths for "all-linear"; we write "all-linear" itself (as peft-core's LoRA
    does): either library reads either file."""
    ours, theirs = _pair("llama", target_modules="all-linear")
    assert len(ours.get_adapter_state_dict("default")) == 4 * 14  # every linear layer but lm_head
    assert _diff(_logits(ours, "llama"), _logits(theirs, "llama")) <= TOL
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    back = peft.PeftModel.from_pretrained(MODELS["llama"](), tmp_path / "ours")
    assert _diff(_logits(back, "llama"), _logits(ours, "llama")) <= TOL
    loaded = PeftModel.from_pretrained(MODELS["llama"](), tmp_path / "theirs")
    assert _diff(_logits(loaded, "llama"), _logits(theirs, "llama")) <= TOL


def test_the_method_is_declared_under_peft_s_name():
    specs = {spec.name: spec for spec, _ in get_registry().methods()}
    assert specs["LOHA"].config_cls is LoHaConfig and specs["LOHA"].mergeable
    assert LoHaConfig.peft_type == "LOHA" and LoHaConfig().to_dict()["peft_type"] == "LOHA"


def test_layers_to_transform_and_exclude_modules_select_what_peft_selects():
    ours, theirs = _pair("llama", target_modules=["q_proj", "v_proj", "up_proj"], layers_to_transform=[1],
                         layers_pattern="layers", exclude_modules=["model.layers.1.mlp.up_proj"])
    keys = set(ours.get_adapter_state_dict("default"))
    assert keys == set(peft.get_peft_model_state_dict(theirs))
    assert {k.split(".hada_")[0] for k in keys} == {"base_model.model.model.layers.1.self_attn.q_proj",
                                                    "base_model.model.model.layers.1.self_attn.v_proj"}
    assert _diff(_logits(ours, "llama"), _logits(theirs, "llama")) <= TOL
