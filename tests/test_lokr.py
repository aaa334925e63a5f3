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
    assert ours_cfg["peft_type"] == "LOKR" and set(ours_cfg) == set(theirs_cfg)
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


@pytest.mark.parametrize("name", ["llama", "t5", "bert"])
def test_merge_is_exact_and_unmerge_restores_bits(name):
    ref, ours = _pair(name, r=2, decompose_both=True)
    expected = _logits(ours, name)
    before = clone_state(ours.base_model)
    ours.merge_adapter()
    merged_logits = _logits(ours, name)
    assert torch.allclose(merged_logits, expected, atol=1e-5)
    ref.merge_adapter()
    assert torch.allclose(merged_logits, _logits(ref, name), atol=1e-5)
    ours.unmerge_adapter()
    assert state_equal(clone_state(ours.base_model), before)  # bit for bit, which PEFT's W + d - d is not
    merged = ours.merge_and_unload()
    assert not any("lokr" in n for n, _ in merged.named_modules())
    assert torch.allclose(_logits(merged, name), expected, atol=1e-5)


def test_safe_merge_refuses_nan_and_changes_nothing():
    from peft_core import MergeError

    _, ours = _pair("llama")
    layer = ours.get_base_model().model.layers[1].self_attn.v_proj
    with torch.no_grad():
        layer.lokr_w2["default"][0, 0] = float("nan")
    before = {k: v for k, v in clone_state(ours.base_model).items() if "lokr" not in k}
    with pytest.raises(MergeError, match="default"):
        ours.merge_adapter(safe_merge=True)
    assert state_equal({k: v for k, v in clone_state(ours.base_model).items() if "lokr" not in k}, before)
    assert not ours.get_base_model().model.layers[0].self_attn.q_proj.merged_adapters


@pytest.mark.parametrize(("name", "kw"), [
    ("llama", {"r": 2, "decompose_both": True, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    ("t5", {}), ("bert", {"r": 1})])  # bert: the classifier head is trained too (modules_to_save)
def test_print_trainable_parameters_matches_peft(capsys, name, kw):
    peft.get_peft_model(MODELS[name](), peft.LoKrConfig(task_type=TASK[name], **kw)).print_trainable_parameters()
    theirs = capsys.readouterr().out
    get_peft_model(MODELS[name](), LoKrConfig(task_type=TASK[name], **kw)).print_trainable_parameters()
    assert capsys.readouterr().out == theirs
    assert theirs.startswith("trainable params: ")


@pytest.mark.parametrize("init", [True, "lycoris"])
def test_default_inits_are_peft_s_and_start_as_the_identity(init):
    _, ours = _pair("llama", init_weights=init, target_modules=["q_proj", "v_proj"], r=1, decompose_both=True)
    with ours.disable_adapter():
        base = _logits(ours, "llama")
    assert torch.equal(_logits(ours, "llama"), base)
    zeros = [n for n, p in ours.named_parameters() if "lokr" in n and not p.any()]
    # r=1: every factor is decomposed, and the one PEFT zeroes is w1_a (True) or w2_b ("lycoris")
    assert zeros and all(".lokr_w1_a." in n if init is True else ".lokr_w2_b." in n for n in zeros)


def test_training_lowers_loss_and_keeps_base_bits():
    ours = get_peft_model(MODELS["llama"](), LoKrConfig(task_type="CAUSAL_LM", r=2, module_dropout=0.1,
                                                        rank_dropout=0.1))
    base = {k: v for k, v in clone_state(ours.base_model).items() if "lokr" not in k}
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all("lokr_" in n for n in trainable)
    inputs = model_inputs("llama")
    opt = torch.optim.Adam([p for p in ours.parameters() if p.requires_grad], lr=0.05)
    ours.train()
    losses = []
    for _ in range(8):
        loss = ours(**inputs, labels=inputs["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    now = {k: v for k, v in clone_state(ours.base_model).items() if "lokr" not in k}
    assert state_equal(now, base)


# module_dropout=0: PEFT still draws its number per layer, and the rank-dropout rows that follow depend on it
@pytest.mark.parametrize(("module", "scale"), [(0.5, False), (0.5, True), (0.0, False)])
def test_dropout_in_training_matches_peft_draw_for_draw_and_is_off_in_eval(module, scale):
    kw = {"module_dropout": module, "rank_dropout": 0.5, "rank_dropout_scale": scale, "r": 2}
    ref, ours = _pair("llama", **kw)
    assert not ours.get_base_model().model.layers[0].self_attn.q_proj.training  # ours follow the model's mode;
    ref.eval()  # PEFT's new layers start in training mode inside an eval model (dropout on until .eval())
    expected_eval = _logits(ref, "llama")
    assert torch.allclose(_logits(ours, "llama"), expected_eval, atol=1e-5)  # eval: no dropout at all
    ref.train()
    ours.train()
    inputs = model_inputs("llama")
    outs = []
    for seed in range(3):
        torch.manual_seed(seed)
        theirs = ref(**inputs).logits
        torch.manual_seed(seed)
        mine = ours(**inputs).logits
        assert torch.allclose(mine, theirs, atol=1e-5)
        outs.append(mine)
    # the draws really drop something: training outputs differ between seeds and from eval
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[0], expected_eval)


def test_several_adapters_disable_and_delete_match_peft():
    ref, ours = _pair("llama", r=2)
    torch.manual_seed(3)
    ref.add_adapter("b", peft.LoKrConfig(task_type="CAUSAL_LM", init_weights=False,
                                         target_modules=["q_proj", "k_proj"]))
    ours.add_adapter("b", LoKrConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "k_proj"]))
    theirs_b = peft.get_peft_model_state_dict(ref, adapter_name="b")
    ours.load_adapter_state_dict("b", {k: v.clone() for k, v in theirs_b.items()})
    ref.set_adapter("b")
    ours.set_adapter("b")
    assert torch.allclose(_logits(ours, "llama"), _logits(ref, "llama"), atol=1e-5)
    ref.base_model.set_adapter(["default", "b"])
    ours.set_adapter(["default", "b"])
    both = _logits(ref, "llama")
    assert torch.allclose(_logits(ours, "llama"), both, atol=1e-5)
    with ref.disable_adapter():
        base = _logits(ref, "llama")
    with ours.disable_adapter():
        assert torch.allclose(_logits(ours, "llama"), base, atol=1e-6)
    assert (both - base).abs().max() > 1e-3
    ours.delete_adapter("b")
    assert "b" not in ours.peft_config and ours.active_adapters == ["default"]
    assert not any(n.endswith(".b") for n, _ in ours.named_parameters())
    ref.delete_adapter("b")
    ref.set_adapter("default")
    assert torch.allclose(_logits(ours, "llama"), _logits(ref, "llama"), atol=1e-5)


def test_mixed_batch_is_refused():
    from peft_core import AdapterError

    _, ours = _pair("llama")
    with pytest.raises(AdapterError):
        ours(**model_inputs("llama"), adapter_names=["default", "__base__"])


def test_bf16_and_autocast_forward_close_to_peft():
    kw = {"r": 2, "decompose_both": True, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    ref, ours = _pair("llama", **kw)
    assert torch.allclose(_logits(ours, "llama"), _logits(ref, "llama"), atol=1e-5)
    inputs = model_inputs("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        theirs, mine = ref(**inputs).logits, ours(**inputs).logits
    assert torch.allclose(mine.float(), theirs.float(), atol=3e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    grads = [p.grad for p in ours.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    ref16, ours16 = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
    assert torch.allclose(_logits(ours16, "llama").float(), _logits(ref16, "llama").float(), atol=3e-2)


def test_bf16_model_gets_fp32_factors_and_exact_unmerge():
    model = MODELS["llama"]().to(torch.bfloat16)
    ours = get_peft_model(model, LoKrConfig(task_type="CAUSAL_LM", init_weights=False, r=2))
    assert all(p.dtype == torch.float32 for n, p in ours.named_parameters() if "lokr" in n)
    out = _logits(ours, "llama")
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    before = clone_state(ours.base_model)
    ours.merge_adapter()
    merged = clone_state(ours.base_model)
    ours.unmerge_adapter()
    assert state_equal(clone_state(ours.base_model), before)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the update is folded in fp32 whatever the context
        ours.merge_adapter()
    assert state_equal(clone_state(ours.base_model), merged)
    assert not state_equal(merged, before)


def test_bad_targets_are_refused_naming_the_culprit_and_leave_the_model_untouched():
    model = MODELS["llama"]()
    before = clone_state(model)
    with pytest.raises(TargetError, match=r"embed_tokens.*Embedding.*exclude_modules"):
        get_peft_model(model, LoKrConfig(target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(TargetError, match="matched no module"):
        get_peft_model(model, LoKrConfig(target_modules=["nope"]))
    assert state_equal(clone_state(model), before)
    assert not any("lokr" in n for n, _ in model.named_modules())


def test_config_refusals():
    from peft_core import ConfigError

    with pytest.raises(ConfigError, match="init_weights"):
        LoKrConfig(init_weights="gaussian")
    with pytest.raises(ConfigError, match="layers_to_transform"):
        LoKrConfig(layers_pattern="layers")
    with pytest.raises(ConfigError, match="rank_pattern"):
        LoKrConfig(rank_pattern={"q_proj": 0})
    with pytest.raises(ConfigError, match=r"\br\b"):
        LoKrConfig(r=0)


def test_layers_to_transform_matches_peft():
    ref, ours = _pair("llama", layers_to_transform=[1], target_modules=["q_proj", "o_proj"])
    assert all(".layers.1." in k for k in ours.get_adapter_state_dict("default"))
    assert torch.allclose(_logits(ours, "llama"), _logits(ref, "llama"), atol=1e-5)


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c2 = nn.Conv2d(4, 16, 3, padding=1)
        self.g2 = nn.Conv2d(16, 8, (1, 3), groups=2)
        self.p2 = nn.Conv2d(8, 8, 1)
        self.c1 = nn.Conv1d(4, 6, 3, padding=1)
        self.p1 = nn.Conv1d(6, 8, 1, bias=False)
        self.fc = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = self.p2(self.g2(self.c2(x))).mean((2, 3))
        b = self.p1(self.c1(y)).mean(2)
        return self.fc(a + b)


CONV_CASES = [{"r": 8}, {"r": 1}, {"r": 1, "use_effective_conv2d": True},
              {"r": 1, "decompose_both": True, "use_effective_conv2d": True}, {"r": 2, "decompose_factor": 2}]


@pytest.mark.parametrize("kw", CONV_CASES, ids=[str(i) for i in range(len(CONV_CASES))])
def test_conv_layers_match_peft(kw):
    x, y = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0)), torch.randn(
        2, 4, 9, generator=torch.Generator().manual_seed(1))
    targets = ["c2", "g2", "p2", "c1", "p1", "fc"]
    if kw.get("use_effective_conv2d"):
        # PEFT 0.21's effective Conv1d fails in torch.kron (its (r, r, k, 1) core): ours is checked by hand below
        targets.remove("c1")
    torch.manual_seed(1)
    net = _ConvNet()
    torch.manual_seed(2)
    ref = peft.get_peft_model(_copy(net), peft.LoKrConfig(target_modules=targets, init_weights=False, **kw))
    torch.manual_seed(2)
    ours = get_peft_model(_copy(net), LoKrConfig(target_modules=targets, init_weights=False, **kw))
    theirs = peft.get_peft_model_state_dict(ref)
    mine = ours.get_adapter_state_dict("default")
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    if kw.get("use_effective_conv2d"):
        assert any("lokr_t2" in k for k in theirs)
    with torch.no_grad():
        expected = ref(x, y)
        assert (expected - net(x, y)).abs().max() > 1e-3
        assert torch.allclose(ours(x, y), expected, atol=1e-5)
        before = clone_state(ours.base_model)
        ours.merge_adapter()
        assert torch.allclose(ours(x, y), expected, atol=1e-4)
        ours.unmerge_adapter()
        assert state_equal(clone_state(ours.base_model), before)


def _copy(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


def test_factorization_is_lycoris_rule():
    from peft.tuners.lokr.layer import factorization as theirs
    from peft_lokr import factorization

    for dim in [1, 2, 7, 12, 16, 32, 48, 64, 96, 127, 128, 256, 768]:
        for factor in [-1, 0, 2, 3, 4, 5, 16]:
            assert factorization(dim, factor) == theirs(dim, factor), (dim, factor)


def test_effective_conv_with_a_unit_kernel_axis_against_a_hand_computation():
    """PEFT 0.21 raises in torch.kron for an effective Conv1d and a (k, 1) Conv2d kernel; ours computes them."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    net = nn.ModuleDict({"c1": nn.Conv1d(4, 6, 3, padding=1), "c2": nn.Conv2d(16, 8, (3, 1), groups=2)})
    kw = {"target_modules": ["c1", "c2"], "r": 1, "alpha": 3, "init_weights": False, "use_effective_conv2d": True}
    torch.manual_seed(1)
    ref = peft.get_peft_model(_copy(net), peft.LoKrConfig(**kw))  # PEFT builds it (only its forward fails)
    torch.manual_seed(1)
    ours = get_peft_model(net, LoKrConfig(**kw))
    theirs, mine = peft.get_peft_model_state_dict(ref), ours.get_adapter_state_dict("default")
    assert any("lokr_t2" in k for k in theirs) and theirs.keys() == mine.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)  # PEFT's file for it is ours
    x1, x2 = torch.randn(2, 4, 9), torch.randn(2, 16, 5, 5)
    for name, x, conv in (("c1", x1, F.conv1d), ("c2", x2, F.conv2d)):
        layer = getattr(ours.get_base_model(), name)
        p = {t: getattr(layer, t)["default"].detach() for t in ("lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2")}
        w2 = torch.einsum("ijkl,ip,jq->pqkl", p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
        a, c = p["lokr_w1"].shape
        b, d = w2.shape[:2]
        kron = torch.einsum("ij,pqkl->ipjqkl", p["lokr_w1"], w2).reshape(a * b, c * d, *w2.shape[2:])
        base = layer.base_layer
        weight = base.weight + (kron * 3.0).reshape(base.weight.shape)
        expected = conv(x, weight, base.bias, stride=base.stride, padding=base.padding, groups=base.groups)
        with torch.no_grad():
            assert torch.allclose(layer(x), expected, atol=1e-5)
            assert (layer(x) - base(x)).abs().max() > 1e-3


def test_kron_equals_torch_kron():
    from peft_lokr.layer import kron

    g = torch.Generator().manual_seed(0)
    for sa, sb in [((2, 3), (4, 5)), ((2, 3, 1, 1), (4, 5, 3, 3)), ((2, 3), (4, 5, 3)), ((1, 1), (3, 2))]:
        a, b = torch.randn(sa, generator=g), torch.randn(sb, generator=g)
        assert torch.equal(kron(a, b), torch.kron(a, b))


def test_composes_with_lora_on_other_modules_like_peft_mixed_model():
    from peft_core import LoraConfig

    lora = {"r": 2, "target_modules": ["q_proj"], "init_lora_weights": False}
    lokr = {"r": 2, "target_modules": ["v_proj", "down_proj"], "init_weights": False}
    torch.manual_seed(0)
    ref = peft.get_peft_model(MODELS["llama"](), peft.LoraConfig(**lora), mixed=True)
    ref.add_adapter("k", peft.LoKrConfig(**lokr))
    ref.set_adapter(["default", "k"])
    ours = get_peft_model(MODELS["llama"](), LoraConfig(**lora))
    ours.add_adapter("k", LoKrConfig(**lokr))
    ours.set_adapter(["default", "k"])
    theirs = {n[n.index("layers."):]: p for n, p in ref.named_parameters() if "lora_" in n or "lokr_" in n}
    mine = {n[n.index("layers."):]: p for n, p in ours.named_parameters() if "lora_" in n or "lokr_" in n}
    assert theirs.keys() == mine.keys() and any("lokr" in k for k in mine) and any("lora" in k for k in mine)
    with torch.no_grad():
        for k, p in mine.items():
            p.copy_(theirs[k])
    expected = _logits(ref, "llama")
    assert torch.allclose(_logits(ours, "llama"), expected, atol=1e-5)
    with pytest.raises(TargetError, match="another method"):  # one layer, one method (LoRA holds q_proj)
        ours.add_adapter("k2", LoKrConfig(target_modules=["q_proj"]))


def test_composes_with_prompt_tuning():
    """Prompt tuning acts on the inputs, LoKr on the weights: both active equals the prompt on the merged model."""
    from peft_core import PromptTuningConfig

    prompt = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    lokr = LoKrConfig(task_type="CAUSAL_LM", init_weights=False, r=2)
    ours = get_peft_model(MODELS["llama"](), prompt)
    ours.add_adapter("k", lokr)
    ours.set_adapter(["default", "k"])
    both = _logits(ours, "llama")
    lokr_only = get_peft_model(MODELS["llama"](), lokr)
    lokr_only.load_adapter_state_dict("default", ours.get_adapter_state_dict("k"))
    merged = lokr_only.merge_and_unload()
    alone = get_peft_model(merged, prompt)
    alone.load_adapter_state_dict("default", ours.get_adapter_state_dict("default"))
    assert torch.allclose(both, _logits(alone, "llama"), atol=1e-5)
    ours.set_adapter("default")
    assert (both - _logits(ours, "llama")).abs().max() > 1e-3


def test_registered_under_peft_s_name_and_loads_lazily_without_memory(tmp_path):
    import subprocess
    import sys

    from peft_core import PeftConfig, get_registry
    from peft_lokr import LoKrConfig as Direct

    assert get_registry().config_class("LOKR") is Direct is LoKrConfig
    listing = subprocess.run([sys.executable, "-m", "peft_core.cli", "list-methods"], capture_output=True, text=True,
                             check=True).stdout
    assert any(line.split()[:1] == ["LOKR"] for line in listing.splitlines())
    ref, _ = _pair("llama", r=2, use_effective_conv2d=True)
    ref.save_pretrained(tmp_path)
    assert isinstance(PeftConfig.from_pretrained(tmp_path), LoKrConfig)
    loaded = PeftModel.from_pretrained(MODELS["llama"](), tmp_path, low_cpu_mem_usage=True)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference_mode, as PEFT loads it
    assert not any(p.is_meta for p in loaded.parameters())
    assert torch.allclose(_logits(loaded, "llama"), _logits(ref, "llama"), atol=1e-5)
