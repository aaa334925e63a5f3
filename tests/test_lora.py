"""LoRA against Hugging Face peft (the oracle), the base model, and hand computations."""

from __future__ import annotations

import contextlib
import copy
import io

import peft
import pytest
import torch
from conftest import MODELS, clone_state, copy_adapter_weights, model_inputs, module_tree, state_equal, tiny_llama
from peft_core import AdapterError, CheckpointError, LoraConfig, MergeError, PeftModel, TargetError, get_peft_model
from peft_core.registry import get_registry
from torch import nn

TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "opt": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM", "bert": "SEQ_CLS"}


def pair(name: str, **kw):
    """The same tiny model wrapped by peft and by peft-core, with the same (non-zero) adapter weights."""
    kw.setdefault("init_lora_weights", False)
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    theirs = peft.get_peft_model(MODELS[name](), peft.LoraConfig(task_type=TASK[name], **kw))
    ours = get_peft_model(MODELS[name](), LoraConfig(task_type=TASK[name], **kw))
    copy_adapter_weights(theirs, ours)
    return ours, theirs


def lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gradients keyed by the path inside the user's model (peft nests it one level deeper than we do)."""
    prefix = "base_model.model." if isinstance(model, peft.PeftModel) else "base_model."
    return {n[len(prefix):]: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("targets", [None, "all-linear"])
def test_logits_and_gradients_match_peft(name, targets):
    ours, theirs = pair(name, target_modules=targets)
    x = model_inputs(name)
    labels = x["input_ids"] if name != "bert" else torch.tensor([0, 1])
    if name == "t5":
        labels = x["decoder_input_ids"]
    # eval mode: the base models' own dropout would draw different masks; gradients flow all the same
    out_o, out_t = ours(**x, labels=labels), theirs(**x, labels=labels)
    assert (out_o.logits - out_t.logits).abs().max() <= 1e-5
    out_o.loss.backward()
    out_t.loss.backward()
    go, gt = lora_grads(ours), lora_grads(theirs)
    assert go.keys() == gt.keys() and go
    for k in go:
        assert (go[k] - gt[k]).abs().max() <= 1e-5, k


@pytest.mark.parametrize("name", list(MODELS))
def test_print_trainable_parameters_matches_peft(name):
    ours, theirs = pair(name, target_modules="all-linear")
    lines = []
    for m in (ours, theirs):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            m.print_trainable_parameters()
        lines.append(buf.getvalue())
    assert lines[0] == lines[1]
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_patterns_rslora_layers_and_exclusions_match_peft():
    kw = dict(target_modules=["q_proj", "v_proj", "down_proj"],
              rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6}, alpha_pattern={"down_proj": 3},
              use_rslora=True, layers_to_transform=[1], layers_pattern="layers",
              exclude_modules=["layers.1.mlp.down_proj"])
    ours, theirs = pair("llama", **kw)
    shapes_o = {k.replace("base_model.model.", ""): tuple(v.shape) for k, v in ours.get_adapter_state_dict().items()}
    shapes_t = {k.replace("base_model.model.", ""): tuple(v.shape)
                for k, v in peft.get_peft_model_state_dict(theirs).items()}
    assert shapes_o == shapes_t and len(shapes_o) == 4
    x = model_inputs("llama")
    assert (ours(**x).logits - theirs(**x).logits).abs().max() <= 1e-5


def test_embedding_lora_matches_peft():
    ours, theirs = pair("llama", target_modules=["embed_tokens", "q_proj"])
    x = model_inputs("llama")
    assert (ours(**x).logits - theirs(**x).logits).abs().max() <= 1e-5


def test_conv2d_lora_matches_peft():
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))

    kw = dict(target_modules=["0", "2"], r=2, lora_alpha=4, init_lora_weights=False)
    theirs = peft.get_peft_model(net(), peft.LoraConfig(**kw))
    ours = get_peft_model(net(), LoraConfig(**kw))
    copy_adapter_weights(theirs, ours)
    x = torch.randn(2, 3, 6, 6)
    assert (ours(x) - theirs(x)).abs().max() <= 1e-5
    before = ours(x)
    ours.merge_adapter()
    assert (ours(x) - before).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5"])
def test_merge_unmerge_disable_unload(name):
    base = MODELS[name]()
    reference = copy.deepcopy(base).requires_grad_(False)  # same kernels as the frozen base (SDPA picks by grad)
    weights = clone_state(base)
    tree = module_tree(base)
    model = get_peft_model(base, LoraConfig(task_type=TASK[name], target_modules="all-linear", init_lora_weights=False))
    x = model_inputs(name)
    unmerged = model(**x).logits
    model.merge_adapter()
    assert (model(**x).logits - unmerged).abs().max() <= 1e-4
    with model.disable_adapter():
        assert torch.equal(model(**x).logits, reference(**x).logits)
    model.unmerge_adapter()
    with model.disable_adapter():
        assert torch.equal(model(**x).logits, reference(**x).logits)
    assert torch.equal(model(**x).logits, unmerged)
    returned = model.unload()
    assert returned is base and module_tree(base) == tree and state_equal(weights, clone_state(base))


def test_merge_and_unload_and_safe_merge():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    x = model_inputs("llama")
    layer = model.base_model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("inf")
    before = clone_state(model.base_model)
    with pytest.raises(MergeError, match="NaN/Inf"):
        model.merge_adapter(safe_merge=True)
    assert state_equal(before, clone_state(model.base_model)) and model.merged_adapters == []
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = 0.1
    expected = model(**x).logits
    merged = model.merge_and_unload(safe_merge=True)
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    assert (merged(**x).logits - expected).abs().max() <= 1e-4


def test_bf16_merge_unmerge_is_bit_exact():
    base = tiny_llama().to(torch.bfloat16)
    weights = clone_state(base)
    model = get_peft_model(base, LoraConfig(target_modules="all-linear", init_lora_weights=False))
    for _ in range(10):
        model.merge_adapter()
        model.unmerge_adapter()
    assert state_equal(weights, clone_state(model.unload()))


def test_several_adapters_active_delete_and_mixed_batch():
    base = tiny_llama()
    model = get_peft_model(base, LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(target_modules=["q_proj", "o_proj"], r=2, init_lora_weights=False))
    model.add_adapter("c", LoraConfig(target_modules=["v_proj"], r=8, init_lora_weights=False))
    x = model_inputs("llama", batch=5)
    single = {}
    for name in ["default", "b", "c"]:
        model.set_adapter(name)
        single[name] = model(**x).logits
    with model.disable_adapter():
        single["__base__"] = model(**x).logits
    rows = ["b", "__base__", "default", "c", "b"]
    mixed = model(**x, adapter_names=rows).logits
    for i, name in enumerate(rows):
        assert (mixed[i] - single[name][i]).abs().max() <= 1e-5, name
    with pytest.raises(AdapterError, match="unknown adapter"):
        model(**x, adapter_names=["b", "nope", "b", "b", "b"])
    # two active at once add up
    model.set_adapter(["default", "b"])
    both = model(**x).logits
    assert not torch.allclose(both, single["default"]) and not torch.allclose(both, single["b"])
    model.delete_adapter("b")
    assert model.active_adapters == ["default"] and "b" not in model.peft_config
    assert torch.equal(model(**x).logits, single["default"])
    assert not any(".b." in n for n, _ in model.named_parameters())


def test_mixed_batch_matches_peft_mixed_batch():
    ours, theirs = pair("llama", target_modules=["q_proj", "v_proj"])
    for m in (ours, theirs):
        m.add_adapter("other", (LoraConfig if m is ours else peft.LoraConfig)(
            target_modules=["q_proj"], r=2, init_lora_weights=False))
    copy_adapter_weights(theirs, ours, "other")
    theirs.eval()
    x = model_inputs("llama", batch=4)
    rows = ["other", "default", "__base__", "other"]
    assert (ours(**x, adapter_names=rows).logits - theirs(**x, adapter_names=rows).logits).abs().max() <= 1e-5


def test_weighted_adapter_cat_is_exact_sum():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(target_modules=["q_proj"], r=2, lora_alpha=3, init_lora_weights=False))
    model.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", combination_type="cat")
    layer = model.base_model.model.layers[0].self_attn.q_proj
    expected = 0.7 * layer.delta_weight("default") - 0.4 * layer.delta_weight("b")
    torch.testing.assert_close(layer.delta_weight("mix"), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="equal ranks"):
        model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "lin", combination_type="linear")
    assert "lin" not in model.peft_config


def test_targeting_errors_leave_model_untouched():
    from conftest import tiny_t5

    base = tiny_t5()
    before, tree = clone_state(base), module_tree(base)
    with pytest.raises(TargetError, match=r"target_modules=\['q_proj'\] matched no module of "
                                          r"T5ForConditionalGeneration; its adaptable layers are named .*\bq\b"):
        get_peft_model(base, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TargetError, match=r"'encoder.block.0.layer.0' is a .*T5LayerSelfAttention"):
        get_peft_model(base, LoraConfig(target_modules=["block.0.layer.0"]))
    assert state_equal(before, clone_state(base)) and tree == module_tree(base)


def test_training_lowers_loss_and_keeps_base_bit_identical():
    base = tiny_llama()
    weights = clone_state(base)
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", lora_dropout=0.1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    ids = torch.arange(2, 18).repeat(4, 1)
    model.train()
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3  # frozen random head: LoRA alone cannot drive it to zero
    after = {k: v for k, v in clone_state(model.base_model).items() if ".lora_" not in k}
    assert state_equal({k.replace(".base_layer", ""): v for k, v in after.items()}, weights)


def test_gradient_checkpointing_trains():
    base = tiny_llama()
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.arange(2, 18).repeat(2, 1)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_dropout_path_gradients_equal_reference():
    """The sparse dropout route equals dense dropout built from the same dropped positions."""
    from peft_lora.functional import dropped_positions, lora_linear

    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, requires_grad=True)
    a = torch.randn(4, 16, requires_grad=True)
    b = torch.randn(8, 4, requires_grad=True)
    base = torch.randn(3, 5, 8, requires_grad=True)
    torch.manual_seed(123)
    out = lora_linear(base, x, a, b, 0.5, p=0.3)
    torch.manual_seed(123)
    keep = torch.ones(x.numel())
    keep[dropped_positions(x.numel(), 0.3, x.device).long()] = 0
    assert (keep == 0).any() and (keep != 0).any()
    ref = base + 0.5 * ((x * keep.view_as(x) / 0.7) @ a.t()) @ b.t()
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, a, b, base), g)
    want = torch.autograd.grad(ref, (x, a, b, base), g)
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v)


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_dropped_positions_are_bernoulli(p):
    """Geometric gaps give an i.i.d. Bernoulli(p) mask: the rate, and no clumping between neighbours."""
    from peft_lora.functional import dropped_positions

    torch.manual_seed(0)
    n = 1_000_000
    pos = dropped_positions(n, p, torch.device("cpu")).long()
    assert pos.unique().numel() == pos.numel() and int(pos.min()) >= 0 and int(pos.max()) < n
    assert abs(pos.numel() / n - p) < 5 * (p * (1 - p) / n) ** 0.5
    mask = torch.zeros(n, dtype=torch.bool)
    mask[pos] = True
    both = (mask[1:] & mask[:-1]).float().mean().item()  # P(two neighbours dropped) = p^2 if independent
    assert abs(both - p * p) < 5 * (p * p / n) ** 0.5 + 1e-4


def test_dropout_above_the_sparse_range_uses_plain_dropout():
    from peft_lora.functional import lora_linear

    torch.manual_seed(0)
    x = torch.randn(64, 32)
    a, b = torch.randn(4, 32), torch.randn(16, 4)
    outs = [lora_linear(torch.zeros(64, 16), x, a, b, 1.0, p=0.9) for _ in range(2)]
    assert not torch.equal(outs[0], outs[1])  # random, and different from no dropout:
    assert not torch.allclose(outs[0], (x @ a.t()) @ b.t())


def test_meta_device_injection():
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                            num_attention_heads=4, vocab_size=100))
    model = get_peft_model(base, LoraConfig(target_modules="all-linear"))
    assert all(p.is_meta for p in model.parameters())
    # per layer, r * (in + out) for q, k, v, o (64 -> 64), gate, up (64 -> 128) and down (128 -> 64)
    per_layer = 8 * (4 * (64 + 64) + 3 * (64 + 128))
    assert model.get_nb_trainable_parameters()[0] == 2 * per_layer


def test_registry_owns_lora():
    assert get_registry().owner("LORA").name == "lora"
    assert isinstance(PeftModel, type)


def test_deleting_an_older_merged_adapter_keeps_the_newer_one_exact():
    base = tiny_llama()
    weights = clone_state(base)
    model = get_peft_model(base, LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    x = model_inputs("llama")
    model.set_adapter("b")
    only_b = model(**x).logits
    model.set_adapter(["default", "b"])
    model.merge_adapter()
    assert model.merged_adapters == ["default", "b"]
    model.delete_adapter("default")
    assert model.merged_adapters == ["b"]
    assert (model(**x).logits - only_b).abs().max() <= 1e-5
    model.unmerge_adapter()
    assert state_equal(weights, clone_state(model.unload()))


def test_partial_merges_with_several_active_adapters_keep_outputs():
    """Each layer memoizes which active adapters it still applies; merges of one or the other must not
    leave a stale answer (the same active tuple, different merged sets)."""
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(target_modules=["q_proj"], r=2, init_lora_weights=False))
    model.set_adapter(["default", "b"])
    x = model_inputs("llama")
    expected = model(**x).logits
    for names in (["default"], ["b"], ["default", "b"]):
        model.merge_adapter(names)
        assert (model(**x).logits - expected).abs().max() <= 1e-4, names
        model.unmerge_adapter()
        assert torch.equal(model(**x).logits, expected), names


def test_bf16_decode_route_matches_fp32_reference():
    """A handful of bf16 tokens on the CPU takes an fp32 route (faster there); same maths."""
    from peft_lora.functional import lora_linear

    torch.manual_seed(0)
    x = torch.randn(3, 1, 64).to(torch.bfloat16)
    a, b = torch.randn(8, 64), torch.randn(32, 8)
    base = torch.randn(3, 1, 32).to(torch.bfloat16)
    got = lora_linear(base, x, a, b, 0.5)
    want = (base.float() + 0.5 * (x.float() @ a.t()) @ b.t()).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("seq", [1, 3, 16])  # decode-like (rows grouped by adapter) and prefill (per-row)
def test_mixed_batch_routes_equal_single_adapter_runs(seq):
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(target_modules=["q_proj", "o_proj"], r=2, init_lora_weights=False))
    x = model_inputs("llama", batch=6, seq=seq)
    single = {}
    for name in ["default", "b"]:
        model.set_adapter(name)
        single[name] = model(**x).logits
    with model.disable_adapter():
        single["__base__"] = model(**x).logits
    rows = ["b", "__base__", "default", "b", "b", "default"]
    mixed = model(**x, adapter_names=rows).logits
    for i, name in enumerate(rows):
        assert (mixed[i] - single[name][i]).abs().max() <= 1e-5, (seq, i, name)


def test_base_layer_output_seen_by_a_hook_is_not_changed_afterwards():
    """The LoRA update goes into the base output in place only when nothing else can hold that tensor."""
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    layer = model.base_model.model.layers[0].self_attn.q_proj
    seen = []
    handle = layer.base_layer.register_forward_hook(lambda mod, args, out: seen.append((out, out.clone())))
    x = model_inputs("llama")
    with_hook = model(**x).logits
    handle.remove()
    out, copy_at_hook = seen[0]
    assert torch.equal(out, copy_at_hook)  # not modified after the hook saw it
    assert torch.equal(model(**x).logits, with_hook)  # in place or not, same result


# ---------------------------------------------------------------- loading skips the random init
def test_uninitialised_linear_is_built_like_nn_linear():
    from peft_lora.layers import uninitialised_linear

    for bias in (False, True):
        real = nn.Linear(12, 5, bias=bias, dtype=torch.float64)
        bare = uninitialised_linear(12, 5, bias, dtype=torch.float64)
        assert type(bare) is nn.Linear and vars(bare).keys() == vars(real).keys()
        assert {k: (v.shape, v.dtype, v.requires_grad) for k, v in bare.named_parameters()} == \
            {k: (v.shape, v.dtype, v.requires_grad) for k, v in real.named_parameters()}
        assert (bare.in_features, bare.out_features, bare.bias is None) == (12, 5, not bias)


def test_loading_draws_no_random_numbers_and_gives_the_files_values(tmp_path):
    """The file overwrites A and B right after inject, so loading skips their random init (most of the time of
    loading a small model); the values, the RNG stream and the runtime flag are as if nothing was skipped."""
    saved = get_peft_model(tiny_llama(), LoraConfig(target_modules="all-linear", init_lora_weights=False,
                                                    lora_bias=True))
    saved.save_pretrained(tmp_path)
    x = model_inputs("llama")
    want = saved.eval()(**x).logits
    base = tiny_llama()
    state = torch.random.get_rng_state()
    loaded = PeftModel.from_pretrained(base, tmp_path)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(loaded(**x).logits, want)
    assert loaded._runtime.filling is False
    # a file that does not fit: refused, the model as it was, and the flag down again
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], r=4))
    tree = module_tree(model)
    with pytest.raises(CheckpointError, match="shape"):
        model.load_adapter(tmp_path, adapter_name="other", config=LoraConfig.from_pretrained(tmp_path).replace(r=4))
    assert module_tree(model) == tree and model._runtime.filling is False and list(model.peft_config) == ["default"]
    # get_peft_model still initialises as PEFT does (same seed, same A)
    torch.manual_seed(0)
    ours = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"]))
    a = [p for n, p in ours.named_parameters() if "lora_A" in n]
    b = [p for n, p in theirs.named_parameters() if "lora_A" in n]
    assert a and all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
