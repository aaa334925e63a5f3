"""LoRA on torch.nn.MultiheadAttention against Hugging Face peft 0.21 (the oracle) and hand computations.

PEFT 0.21 applies the out_proj update twice, in its forward and its merge (huggingface/peft#3774, open): its
output is the attention with ``W_o + 2 s B_o A_o``, its gradient that of ``W_o + s B_o A_o``. peft-core applies
it once. So outputs and gradients are compared with PEFT's where the out_proj update is zero (both libraries
then compute the same function), and with a hand computation for a full adapter; one test pins the
difference down to exactly that doubling.
"""

from __future__ import annotations

import copy
import io
import json
import warnings

import peft
import pytest
import torch
from conftest import clone_state, copy_adapter_weights, module_tree, state_equal
from peft_core import AdapterError, LoraConfig, PeftModel, TargetError, get_peft_model
from safetensors.torch import load_file
from torch import nn

OUT_B = "base_model.model.mha.base_layer.out_proj.lora_B.weight"  # PEFT's file key of out_proj's B


class Net(nn.Module):
    """A MultiheadAttention (embed 16, 4 heads) followed by a Linear."""

    def __init__(self, batch_first: bool = True, **mha: object) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, **mha)
        self.lin = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, **kw: object) -> torch.Tensor:
        out, _ = self.mha(x, x, x, **kw)
        return self.lin(out)


def build(seed: int = 0, **kw: object) -> Net:
    torch.manual_seed(seed)
    return Net(**kw).eval()


def inputs(batch_first: bool = True) -> torch.Tensor:
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    return x if batch_first else x.transpose(0, 1).contiguous()


def pair(zero_out_proj: bool = False, batch_first: bool = True, **kw: object):
    """The same Net wrapped by peft and by peft-core, with the same non-zero adapter weights (out_proj's B zero
    on both if asked: the case where PEFT 0.21 computes plain LoRA)."""
    kw = {"target_modules": ["mha", "lin"], "r": 4, "lora_alpha": 8, "init_lora_weights": False, **kw}
    theirs = peft.get_peft_model(build(batch_first=batch_first), peft.LoraConfig(**kw))
    ours = get_peft_model(build(batch_first=batch_first), LoraConfig(**kw))
    if zero_out_proj:
        sd = peft.get_peft_model_state_dict(theirs)
        sd[OUT_B].zero_()
        peft.set_peft_model_state_dict(theirs, sd)
    copy_adapter_weights(theirs, ours)
    return ours, theirs


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    prefix = "base_model.model." if isinstance(model, peft.PeftModel) else "base_model."
    return {n[len(prefix):]: p.grad for n, p in model.named_parameters() if p.grad is not None}


def by_hand(model: PeftModel, x: torch.Tensor, names: tuple[str, ...] = ("default",), **kw: object) -> torch.Tensor:
    """Net's output with LoRA computed from the layers' own A and B: W + sum s B A on in_proj and out_proj, and
    the Linear's x W^T + s B A x."""
    net = model.base_model
    layer, out = net.mha, net.mha.base_layer.out_proj
    w_in = layer.base_layer.in_proj_weight
    w_out = out.base_layer.weight
    for n in names:
        w_in = w_in + layer.scaling[n] * layer.lora_B[n].weight @ layer.lora_A[n].weight
        w_out = w_out + out.scaling[n] * out.lora_B[n].weight @ out.lora_A[n].weight
    plain = nn.MultiheadAttention(16, 4, batch_first=layer.batch_first)
    y, _ = torch.func.functional_call(plain, {"in_proj_weight": w_in, "in_proj_bias": layer.in_proj_bias,
                                              "out_proj.weight": w_out, "out_proj.bias": out.base_layer.bias},
                                      (x, x, x), kw)
    lin = net.lin
    z = lin.base_layer(y)
    for n in names:
        z = z + lin.scaling[n] * (y @ lin.lora_A[n].weight.T) @ lin.lora_B[n].weight.T
    return z


@pytest.mark.parametrize("batch_first", [True, False])
def test_outputs_and_gradients_match_peft(batch_first):
    ours, theirs = pair(zero_out_proj=True, batch_first=batch_first)
    x = inputs(batch_first)
    out_o, out_t = ours(x), theirs(x)
    assert (out_o - out_t).abs().max() <= 1e-5
    (out_o ** 2).sum().backward()
    (out_t ** 2).sum().backward()
    go, gt = grads(ours), grads(theirs)
    assert go.keys() == gt.keys() == {n for n, p in ours.base_model.named_parameters() if p.requires_grad}
    assert len(go) == 6 and all(".lora_" in k for k in go)  # in_proj, out_proj and lin: A and B each
    for k in go:
        assert (go[k] - gt[k]).abs().max() <= 1e-5, k


@pytest.mark.parametrize("batch_first", [True, False])
def test_full_adapter_matches_hand_computation(batch_first):
    ours, _ = pair(batch_first=batch_first)
    x = inputs(batch_first)
    out = ours(x)
    expected = by_hand(ours, x)
    assert (out - expected).abs().max() <= 1e-5
    params = [p for p in ours.parameters() if p.requires_grad]
    mine = torch.autograd.grad((out ** 2).sum(), params)
    ref = torch.autograd.grad((expected ** 2).sum(), params)
    for a, b in zip(mine, ref):
        assert (a - b).abs().max() <= 1e-5
    with torch.no_grad():  # eval without grad takes torch's fast attention kernel: the same adapted weights
        assert (ours(x) - expected).abs().max() <= 1e-5


def test_peft_differs_only_by_applying_the_out_proj_update_twice():
    ours, theirs = pair()
    x = inputs()
    assert (ours(x) - theirs(x)).abs().max() > 1e-2  # a real difference...
    with torch.no_grad():
        ours.base_model.mha.base_layer.out_proj.lora_B["default"].weight.mul_(2)
    assert (ours(x) - theirs(x)).abs().max() <= 1e-5  # ...and nothing but that one
    with torch.no_grad():
        theirs.merge_adapter()  # PEFT merges it twice too
    assert (ours(x) - theirs(x)).abs().max() <= 1e-5


def test_names_files_and_config_match_peft_both_ways(tmp_path):
    ours, theirs = pair()
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert {n.replace("base_model.model.", "base_model.", 1) for n, p in theirs.named_parameters()
            if p.requires_grad} == trainable
    assert "base_model.mha.base_layer.out_proj.lora_A.default.weight" in trainable
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    mine, peft_file = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
    assert mine.keys() == peft_file.keys() and OUT_B in mine and "base_model.model.mha.lora_A.weight" in mine
    assert all(torch.equal(mine[k], peft_file[k]) for k in mine)
    cfg_o, cfg_t = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "theirs"))
    for field in ("peft_type", "r", "lora_alpha", "fan_in_fan_out", "bias", "lora_dropout"):
        assert cfg_o[field] == cfg_t[field], field
    assert sorted(cfg_o["target_modules"]) == sorted(cfg_t["target_modules"]) == ["lin", "mha"]
    # peft-core's files into PEFT, PEFT's into peft-core: the same tensors, the same outputs
    into_peft = peft.PeftModel.from_pretrained(build(), tmp_path / "ours")
    into_ours = PeftModel.from_pretrained(build(), tmp_path / "theirs")
    assert all(torch.equal(v, peft_file[k]) for k, v in peft.get_peft_model_state_dict(into_peft).items())
    x = inputs()
    assert torch.equal(into_ours(x), ours(x))
    assert torch.equal(into_peft(x), theirs(x))


def test_print_trainable_parameters_matches_peft(capsys):
    ours, theirs = pair()
    ours.print_trainable_parameters()
    theirs.print_trainable_parameters()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0] == lines[1] and "trainable params: 512 " in lines[0]
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_bias_lora_only_trains_what_peft_trains():
    ours, theirs = pair(bias="lora_only")
    assert ({n.replace("base_model.model.", "base_model.", 1) for n, p in theirs.named_parameters() if p.requires_grad}
            == {n for n, p in ours.named_parameters() if p.requires_grad})
    assert ours.base_model.mha.base_layer.out_proj.base_layer.bias.requires_grad
    assert not ours.base_model.mha.base_layer.in_proj_bias.requires_grad  # PEFT's rule: out_proj's bias only


def test_merge_unmerge_exact_disable_unload_and_merge_and_unload():
    base = build()
    reference = build()
    weights, tree = clone_state(base), module_tree(base)
    model = get_peft_model(base, LoraConfig(target_modules=["mha", "lin"], init_lora_weights=False))
    x = inputs()
    unmerged = model(x)
    assert (unmerged - reference(x)).abs().max() > 1e-3
    for _ in range(3):
        model.merge_adapter()
        assert (model(x) - unmerged).abs().max() <= 1e-5
        assert not torch.equal(base.mha.base_layer.in_proj_weight, weights["mha.in_proj_weight"])
        model.unmerge_adapter()
    assert torch.equal(base.mha.base_layer.in_proj_weight, weights["mha.in_proj_weight"])
    assert torch.equal(base.mha.base_layer.out_proj.base_layer.weight, weights["mha.out_proj.weight"])
    assert torch.equal(model(x), unmerged)
    with model.disable_adapter():
        assert torch.equal(model(x), reference(x))
    assert model.unload() is base and module_tree(base) == tree and state_equal(weights, clone_state(base))

    model = get_peft_model(build(), LoraConfig(target_modules=["mha", "lin"], init_lora_weights=False))
    expected = model(x)
    merged = model.merge_and_unload(safe_merge=True)
    assert type(merged.mha) is nn.MultiheadAttention
    assert type(merged.mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert isinstance(merged.mha.in_proj_weight, nn.Parameter) and module_tree(merged) == tree
    assert (merged(x) - expected).abs().max() <= 1e-5


def test_bf16_merge_unmerge_is_bit_exact():
    base = build().to(torch.bfloat16)
    weights = clone_state(base)
    model = get_peft_model(base, LoraConfig(target_modules=["mha"], init_lora_weights=False))
    for _ in range(5):
        model.merge_adapter()
        model.unmerge_adapter()
    assert state_equal(weights, clone_state(model.unload()))


def test_two_adapters_together_alone_and_deleted():
    model = get_peft_model(build(), LoraConfig(target_modules=["mha", "lin"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(target_modules=["mha", "lin"], r=2, lora_alpha=3, init_lora_weights=False))
    x = inputs()
    alone = {}
    for name in ("default", "b"):
        model.set_adapter(name)
        alone[name] = model(x)
        assert (alone[name] - by_hand(model, x, (name,))).abs().max() <= 1e-5
    model.set_adapter(["default", "b"])
    both = model(x)
    assert (both - by_hand(model, x, ("default", "b"))).abs().max() <= 1e-5
    model.merge_adapter(["b"])  # one merged, one live: still the sum
    assert (model(x) - both).abs().max() <= 1e-5
    model.unmerge_adapter()
    model.delete_adapter("b")
    assert model.active_adapters == ["default"] and torch.equal(model(x), alone["default"])
    assert not any(".b." in n for n, _ in model.named_parameters())
    out_layer = model.base_model.mha.base_layer.out_proj
    assert list(out_layer.r) == ["default"]


def test_lora_dropout_warns_and_has_no_effect_on_the_attention_as_in_peft():
    with pytest.warns(UserWarning, match="lora_dropout=0.1 has no effect on MultiheadAttention 'mha'"):
        ours, theirs = pair(zero_out_proj=True, target_modules=["mha"], lora_dropout=0.1)
    ours.train()
    theirs.train()
    x = inputs()
    trained = ours(x)
    assert (trained - theirs(x)).abs().max() <= 1e-5
    ours.eval()
    assert torch.equal(ours(x), trained)  # no mask was drawn


def test_training_touches_only_lora_tensors():
    model = get_peft_model(build(), LoraConfig(target_modules=["mha", "lin"], init_lora_weights=False))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train()
    x = inputs()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert len(before) == 6
    (model(x) ** 2).mean().backward()
    opt.step()
    assert all(p.grad is None and torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def test_need_weights_and_masks_pass_through():
    ours, theirs = pair(zero_out_proj=True)
    mha_o, mha_t = ours.base_model.mha, theirs.base_model.model.mha
    x = inputs()
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[0, 3:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    for kw in ({"need_weights": False}, {"key_padding_mask": pad}, {"attn_mask": causal},
               {"key_padding_mask": pad, "average_attn_weights": False}):
        out_o, w_o = mha_o(x, x, x, **kw)
        out_t, w_t = mha_t(x, x, x, **kw)
        assert (out_o - out_t).abs().max() <= 1e-5, kw
        assert (w_o is None) == (w_t is None) == (kw.get("need_weights") is False), kw
        if w_o is not None:
            assert w_o.shape == w_t.shape and (w_o - w_t).abs().max() <= 1e-5, kw
    assert (ours(x, key_padding_mask=pad) - by_hand(ours, x, key_padding_mask=pad)).abs().max() <= 1e-5


def test_mixed_batches_are_refused():
    model = get_peft_model(build(), LoraConfig(target_modules=["mha", "lin"], init_lora_weights=False))
    with pytest.raises(AdapterError, match=r"mha.*cannot compute each row"):
        model(inputs(), adapter_names=["default", "__base__", "default"])


@pytest.mark.parametrize(("kw", "match"), [
    ({"use_dora": True}, "use_dora=True: module 'mha' is a LoraMultiheadAttention, which has no DoRA"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' needs a Linear-like layer"),
    ({"init_lora_weights": "olora"}, "init_lora_weights='olora' needs a Linear-like layer"),
])
def test_dora_and_weight_reading_inits_are_refused(kw, match):
    net = build()
    tree, weights = module_tree(net), clone_state(net)
    with pytest.raises(TargetError, match=match):
        get_peft_model(net, LoraConfig(target_modules=["lin", "mha"], **kw))
    assert module_tree(net) == tree and state_equal(weights, clone_state(net))


def test_separate_kdim_vdim_is_refused_with_the_model_untouched():
    net = build(kdim=8, vdim=8)
    tree = module_tree(net)
    with pytest.raises(TargetError, match="kdim == vdim == embed_dim"):
        get_peft_model(net, LoraConfig(target_modules=["lin", "mha"]))
    assert module_tree(net) == tree


def test_out_proj_targeted_without_its_attention_warns():
    with pytest.warns(UserWarning, match="LoRA on 'mha.out_proj' will never run"):
        get_peft_model(build(), LoraConfig(target_modules=["out_proj", "lin"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_peft_model(build(), LoraConfig(target_modules=["mha", "out_proj"]))  # the attention's layer covers it


def test_seeded_init_draws_as_peft_does():
    torch.manual_seed(5)
    theirs = peft.get_peft_model(build(), peft.LoraConfig(target_modules=["mha", "lin"]))
    torch.manual_seed(5)
    ours = get_peft_model(build(), LoraConfig(target_modules=["mha", "lin"]))
    theirs_sd = peft.get_peft_model_state_dict(theirs)
    ours_params = dict(ours.named_parameters())
    assert len(theirs_sd) == 6
    for key, value in theirs_sd.items():
        name = key.replace("base_model.model.", "base_model.", 1).replace(".weight", ".default.weight")
        assert torch.equal(ours_params[name], value), key


def test_transformer_encoder_layer_sees_the_adapter_on_its_fast_path():
    """nn.TransformerEncoderLayer runs its own fused kernel in eval, reading self_attn's projections off the
    attention layer: it must get the adapted ones (PEFT 0.21's layer hands it the base weights there)."""
    def enc() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)).eval()

    model = get_peft_model(enc(), LoraConfig(target_modules=["self_attn"], init_lora_weights=False))
    x = inputs()
    slow = model(x)  # grad enabled and the adapted weights need grad: the module-by-module path
    with torch.no_grad():
        fast = model(x)
        assert (fast - slow).abs().max() <= 1e-5 and (fast - enc()(x)).abs().max() > 1e-2


def test_autocast_bf16_is_as_close_to_fp32_as_peft():
    ours, theirs = pair(zero_out_proj=True)
    x = inputs()
    exact = ours(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_o, out_t = ours(x), theirs(x)
    assert out_o.dtype == torch.bfloat16
    assert (out_o.float() - out_t.float()).abs().max() <= 5e-2  # test_autocast.py's logit tolerance
    # the update is computed in fp32 and rounded once (PEFT rounds B A to bf16 first): never further from exact
    assert (out_o.float() - exact).abs().max() <= 1.5 * (out_t.float() - exact).abs().max() + 1e-3


def test_copies_and_pickles_keep_working():
    model = get_peft_model(build(), LoraConfig(target_modules=["mha", "lin"], init_lora_weights=False))
    x = inputs()
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        assert torch.equal(other(x), model(x))
        other.merge_adapter()
        other.unmerge_adapter()
        assert torch.equal(other(x), model(x))
