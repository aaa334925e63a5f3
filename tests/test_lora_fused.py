"""The fused LoRA linear route (methods/lora/fused.py): base layer and update as one autograd function, siblings that
read the same input computed together. Oracle: the same model on the ordinary route (the fused route switched off),
which the rest of the suite checks against Hugging Face PEFT; every case also checks that the fused route ran."""

from __future__ import annotations

import copy

import peft_core
import peft_lora.fused as fused
import peft_lora.hardware as hardware
import peft_lora.layers as layers
import pytest
import torch
from conftest import model_inputs, tiny_gpt2, tiny_llama, tiny_t5
from peft_lora.hardware import UNBOUNDED, LoraKernelChoices
from torch import nn


def lora(model: nn.Module, **kw: object) -> nn.Module:
    kw.setdefault("target_modules", "all-linear")
    pm = peft_core.get_peft_model(model, peft_core.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw))
    return pm


class Spy:
    """Counts fused calls by group size."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: list[int] = []
        real = fused._run

        def run(x: torch.Tensor, members: tuple) -> tuple:
            self.sizes.append(len(members))
            return real(x, members)

        real_inference = fused._inference

        def inference(owner: object, layers: list, x: torch.Tensor) -> tuple | None:
            out = real_inference(owner, layers, x)
            if out is not None:
                self.sizes.append(len(layers))
            return out

        monkeypatch.setattr(fused, "_run", run)
        monkeypatch.setattr(fused, "_inference", inference)


def ordinary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layers, "fused_forward", lambda layer, x: None)


def step(model: nn.Module, inputs: dict[str, torch.Tensor], steps: int = 3) -> tuple[list[torch.Tensor],
                                                                                      dict[str, torch.Tensor]]:
    """A few forward/backward passes (the groups are learned in the first); the losses and the last gradients."""
    losses = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        out = model(**inputs, labels=inputs.get("decoder_input_ids", inputs["input_ids"]))
        if out.loss.requires_grad:  # merged or disabled adapters: nothing to train
            out.loss.backward()
        losses.append(out.loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return losses, grads


def both(monkeypatch: pytest.MonkeyPatch, model: nn.Module, fn):
    """``fn(model)`` on a copy through the fused route and on another through the ordinary one."""
    twin = copy.deepcopy(model)
    spy = Spy(monkeypatch)
    torch.manual_seed(0)  # the base models' own dropout (T5) draws alike on both sides
    got = fn(model)
    with monkeypatch.context() as m:
        ordinary(m)
        torch.manual_seed(0)
        want = fn(twin)
    return got, want, spy


def close(got, want, tol: float) -> None:
    if isinstance(got, dict):
        assert got.keys() == want.keys() and got
        for k in got:
            close(got[k], want[k], tol)
    elif isinstance(got, (list, tuple)):
        for a, b in zip(got, want, strict=True):
            close(a, b, tol)
    else:
        assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol), (got - want).abs().max()


def groups(model: nn.Module) -> list[tuple[str, ...]]:
    seen, out = set(), []
    names = {m: n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    for m in model.modules():
        g = m.__dict__.get("_siblings")
        if g is not None and g.confirmed and id(g) not in seen:
            seen.add(id(g))
            out.append(tuple(names[x] for x in g.members))
    return out


def test_llama_training_learns_qkv_and_gate_up_and_matches_the_ordinary_route(monkeypatch):
    model = lora(tiny_llama()).train()
    inputs = model_inputs("llama")
    (losses, grads), (losses_o, grads_o), spy = both(monkeypatch, model, lambda m: step(m, inputs))
    close(losses, losses_o, 1e-6)
    close(grads, grads_o, 1e-5)
    assert len(grads) == 2 * 7 * 2  # A and B of 7 projections in 2 layers: none lost
    assert sorted(set(groups(model))) == [("gate_proj", "up_proj"), ("q_proj", "k_proj", "v_proj")]
    assert 3 in spy.sizes and 2 in spy.sizes and 1 in spy.sizes  # groups, and o_proj/down_proj alone


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r", [4, 8, 16])
def test_a_layer_gives_the_same_bits_alone_and_in_its_group(monkeypatch, r, dtype):
    """The first forward learns the groups (each layer alone), later ones compute q/k/v and gate/up together: the
    logits must be the same bits. They were not on an AVX-512 EPYC at r=4 and 8 in fp32, when the group shared one
    wide ``x @ [A_q; A_k; A_v].T`` (a GEMM's rounding depends on its width there)."""
    model = peft_core.get_peft_model(tiny_llama().to(dtype), peft_core.LoraConfig(
        r=r, lora_alpha=2 * r, init_lora_weights=False, target_modules="all-linear"))
    inputs = model_inputs("llama")
    spy = Spy(monkeypatch)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            fresh = copy.deepcopy(model)
            first, *later = [fresh(**inputs).logits for _ in range(3)]
            assert all(torch.equal(first, o) for o in later), [(first - o).abs().max().item() for o in later]
    assert 3 in spy.sizes and 2 in spy.sizes  # the groups did run


def test_eval_and_generate_match_and_fuse(monkeypatch):
    model = lora(tiny_llama())
    inputs = model_inputs("llama")

    def run(m: nn.Module) -> list[torch.Tensor]:
        with torch.no_grad():
            logits = [m(**inputs).logits for _ in range(2)]
        with torch.inference_mode():
            logits.append(m(**inputs).logits)
        logits.append(m.generate(**inputs, max_new_tokens=4, do_sample=False))
        return logits

    got, want, spy = both(monkeypatch, model, run)
    assert torch.equal(got[-1], want[-1])
    close(got[:-1], want[:-1], 1e-6)
    assert 3 in spy.sizes


def test_t5_cross_attention_keys_read_the_encoder_and_are_learned_apart(monkeypatch):
    model = lora(tiny_t5(), task_type="SEQ_2_SEQ_LM").train()
    inputs = model_inputs("t5")
    (losses, grads), (losses_o, grads_o), _ = both(monkeypatch, model, lambda m: step(m, inputs, steps=4))
    close(losses, losses_o, 1e-6)
    close(grads, grads_o, 1e-5)
    found = groups(model)
    assert ("q", "k", "v") in found  # self-attention
    assert ("k", "v") in found  # the decoder's cross-attention: keys and values read the encoder output, q does not


def test_gpt2_conv1d_layers(monkeypatch):
    model = lora(tiny_gpt2(), target_modules=["c_attn", "c_proj", "c_fc"]).train()
    inputs = model_inputs("gpt2")
    (losses, grads), (losses_o, grads_o), spy = both(monkeypatch, model, lambda m: step(m, inputs))
    close(losses, losses_o, 1e-6)
    close(grads, grads_o, 1e-5)
    assert spy.sizes and set(spy.sizes) == {1}  # each Conv1D reads its own input


@pytest.mark.parametrize("case", ["two active adapters", "merged", "disabled", "dropout", "trained bias",
                                  "second adapter active"])
def test_other_states_match_the_ordinary_route(monkeypatch, case):
    model = lora(tiny_llama(), lora_dropout=0.1 if case == "dropout" else 0.0,
                 bias="all" if case == "trained bias" else "none").train()
    model.add_adapter("other", peft_core.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False))
    if case == "two active adapters":
        model.set_adapter(["default", "other"])
    elif case == "second adapter active":
        model.set_adapter("other")  # k_proj holds no active adapter: a base-only member of the q/k/v group
    elif case == "merged":
        model.merge_adapter()
    inputs = model_inputs("llama")

    def run(m: nn.Module) -> tuple:
        torch.manual_seed(0)
        if case == "disabled":
            with m.disable_adapter():
                return step(m, inputs)
        return step(m, inputs)

    (losses, grads), (losses_o, grads_o), _ = both(monkeypatch, model, run)
    close(losses, losses_o, 1e-6)
    if grads_o:
        close(grads, grads_o, 1e-5)


@pytest.mark.parametrize("name", ["llama", "t5", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_training_fuses_and_draws_the_ordinary_routes_masks(monkeypatch, name, dtype):
    """With dropout the group still runs as one function, each member drawing its own positions in call order:
    under the same seed, the masks, losses and gradients are the ordinary route's."""
    build = {"llama": tiny_llama, "t5": tiny_t5, "gpt2": tiny_gpt2}[name]
    torch.manual_seed(0)
    model = lora(build().to(dtype), lora_dropout=0.1).train()
    # 80 tokens: above every CPU table row's few-token fp32 route (bf16 with fp32 adapters), which stays ordinary
    inputs = model_inputs(name, batch=4, seq=20)
    (losses, grads), (losses_o, grads_o), spy = both(monkeypatch, model, lambda m: step(m, inputs))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    close(losses, losses_o, tol)
    close(grads, grads_o, tol)
    assert len(grads) == len(grads_o) and spy.sizes  # the fused route ran, with dropout
    if name != "gpt2":  # GPT-2's q/k/v are one Conv1D
        assert max(spy.sizes) >= 2


def test_a_group_of_dropout_and_plain_members(monkeypatch):
    """q and v hold adapter "a" (dropout), k adapter "b" (none), both active: one fused call mixes members that
    read their own dropped input with members that share the wide products."""
    torch.manual_seed(0)
    model = peft_core.get_peft_model(tiny_llama(), peft_core.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.add_adapter("b", peft_core.LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj"], init_lora_weights=False))
    model.set_adapter(["default", "b"])
    model.train()
    inputs = model_inputs("llama")
    (losses, grads), (losses_o, grads_o), spy = both(monkeypatch, model, lambda m: step(m, inputs))
    close(losses, losses_o, 1e-6)
    close(grads, grads_o, 1e-5)
    assert 3 in spy.sizes and any(".k_proj.lora_A.b" in n for n in grads)


def test_a_dense_dropout_rate_takes_the_ordinary_route(monkeypatch):
    model = lora(tiny_llama(), lora_dropout=0.5).train()  # above the table's sparse_dropout_max_p (0.3)
    inputs = model_inputs("llama")
    step(model, inputs, steps=2)
    spy = Spy(monkeypatch)
    step(model, inputs, steps=1)
    assert spy.sizes == []


@pytest.mark.parametrize("fp32_route", [64, UNBOUNDED])  # a native-half CPU; one whose half GEMMs are emulated
def test_half_model_with_fp32_adapters_matches_and_fuses(monkeypatch, fp32_route):
    for dtype in (torch.float32, torch.bfloat16):  # this machine's table row replaced by the case's
        monkeypatch.setitem(hardware._CACHE, (torch.device("cpu"), dtype), LoraKernelChoices(fp32_route, 0.3, 16))
    model = lora(tiny_llama().to(torch.bfloat16)).train()  # autocast_adapter_dtype: fp32 adapters
    q = model.get_submodule("base_model.model.layers.0.self_attn.q_proj")
    assert q.lora_A["default"].weight.dtype == torch.float32
    reference = copy.deepcopy(model).float()  # the same maths in fp32: how far each route's rounding goes
    inputs = model_inputs("llama", batch=2, seq=48)  # above the few-token fp32 route
    (losses, grads), (losses_o, grads_o), spy = both(monkeypatch, model, lambda m: step(m, inputs, steps=2))
    with monkeypatch.context() as m:
        ordinary(m)
        _, grads_32 = step(reference, inputs, steps=1)
    close(losses, losses_o, 1e-6)  # the forward is the same sequence of bf16 operations
    assert all(g.dtype == torch.float32 for g in grads.values()) and grads.keys() == grads_o.keys()
    # backward sums the input gradient in one buffer (one rounding less): not bit-equal, and no further from fp32
    err = max((grads[k] - grads_32[k]).abs().max().item() for k in grads)
    err_o = max((grads_o[k] - grads_32[k]).abs().max().item() for k in grads)
    assert 0 < err <= 1.25 * err_o, (err, err_o)
    assert 3 in spy.sizes


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(monkeypatch, reentrant):
    model = lora(tiny_llama()).train()
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    inputs = model_inputs("llama")
    (losses, grads), (losses_o, grads_o), _ = both(monkeypatch, model, lambda m: step(m, inputs))
    close(losses, losses_o, 1e-6)
    close(grads, grads_o, 1e-5)


def q_and_k() -> tuple[nn.Module, nn.Module, nn.Module]:
    """Two LoRA linear siblings under one parent (candidates of one group), and the model."""
    torch.manual_seed(0)
    parent = nn.Module()
    parent.q, parent.k = nn.Linear(8, 8), nn.Linear(8, 8)
    model = peft_core.get_peft_model(nn.Sequential(parent), peft_core.LoraConfig(
        r=2, target_modules=["q", "k"], init_lora_weights=False))
    return model, model.get_submodule("base_model.0.q"), model.get_submodule("base_model.0.k")


def test_a_member_fed_another_input_is_relearned_and_still_correct(monkeypatch):
    model, q, k = q_and_k()
    x, y = torch.randn(3, 8), torch.randn(3, 8)

    def want(layer: nn.Module, inp: torch.Tensor) -> torch.Tensor:
        with monkeypatch.context() as m:
            ordinary(m)
            return layer(inp)

    with torch.no_grad():
        for _ in range(2):  # learned: q and k read the same input
            q(x), k(x)
        assert q.__dict__["_siblings"].confirmed
        out_q = q(x)
        out_k = k(y)  # but now k reads another: the fused guess for k is not used
        close([out_q, out_k], [want(q, x), want(k, y)], 1e-6)
        assert not q.__dict__["_siblings"].confirmed
        x.add_(1.0)  # in place between the calls: not the same input any more
        for _ in range(2):
            q(x), k(x)
        out_q = q(x)
        x.mul_(2.0)
        out_k = k(x)
        close([out_q, out_k], [want(q, x / 2.0), want(k, x)], 1e-6)
        model.add_adapter("b", peft_core.LoraConfig(r=2, target_modules=["q", "k"], init_lora_weights=False))
        for _ in range(2):
            q(x), k(x)
        q(x)
        model.set_adapter("b")  # between the calls: k's guess was made for the default adapter
        close(k(x), want(k, x), 1e-6)


def test_an_unused_fused_output_gives_its_adapter_no_gradient(monkeypatch):
    model, q, k = q_and_k()
    x = torch.randn(3, 8)
    for _ in range(2):
        q(x), k(x)
    model.zero_grad(set_to_none=True)
    q(x).sum().backward()  # k's output was computed with q's but never used
    assert q.lora_A["default"].weight.grad is not None
    assert k.lora_A["default"].weight.grad is None and k.lora_B["default"].weight.grad is None


def test_saved_tensor_hooks_and_autocast_take_the_ordinary_route(monkeypatch):
    model = lora(tiny_llama()).train()
    inputs = model_inputs("llama")
    step(model, inputs, steps=2)
    spy = Spy(monkeypatch)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        model(**inputs).logits.sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**inputs)
    assert spy.sizes == []


def test_inference_program_follows_weight_writes_hooks_and_adapter_switches(monkeypatch):
    model = lora(tiny_llama())
    model.add_adapter("b", peft_core.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear",
                                                init_lora_weights=False))
    inputs = model_inputs("llama")

    def want() -> torch.Tensor:
        with monkeypatch.context() as m:
            ordinary(m)
            return model(**inputs).logits

    spy = Spy(monkeypatch)
    q = model.get_submodule("base_model.model.layers.0.self_attn.q_proj")
    k = model.get_submodule("base_model.model.layers.0.self_attn.k_proj")
    with torch.no_grad():
        for _ in range(2):
            model(**inputs)
        close(model(**inputs).logits, want(), 1e-6)
        k.lora_B["default"].weight.mul_(3.0)  # in place: the prepared B.T of the group is stale
        close(model(**inputs).logits, want(), 1e-6)
        q.lora_A["default"].weight.data = q.lora_A["default"].weight.data * 2.0  # a new tensor under the same param
        close(model(**inputs).logits, want(), 1e-6)
        model.set_adapter("b")
        close(model(**inputs).logits, want(), 1e-6)
        seen = []
        q.base_layer.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
        close(model(**inputs).logits, want(), 1e-6)
        assert seen  # a hook added to a base layer runs (that layer leaves the fused route)
    assert 3 in spy.sizes


def test_few_token_half_inference_takes_the_fp32_route_fused(monkeypatch):
    """bf16 model, fp32 adapters, a few tokens: the table's fp32 route, computed for the whole group at once."""
    for dtype in (torch.float32, torch.bfloat16):
        monkeypatch.setitem(hardware._CACHE, (torch.device("cpu"), dtype), LoraKernelChoices(64, 0.3, 16))
    model = lora(tiny_llama().to(torch.bfloat16))
    reference = copy.deepcopy(model).float()
    inputs = model_inputs("llama")  # 2 x 7 tokens

    def run(m: nn.Module) -> list[torch.Tensor]:
        with torch.no_grad():
            return [m(**inputs).logits for _ in range(3)]

    got, want, spy = both(monkeypatch, model, run)
    assert 3 in spy.sizes
    with torch.no_grad():
        exact = reference(**inputs).logits
    for g, w in zip(got, want):
        # the same fp32 sums rounded once to bf16; the stacked A product may round its fp32 sums differently
        assert (g.float() - w.float()).abs().max() <= 2e-2 * w.float().abs().max()
        assert (g.float() - exact).abs().max() <= 1.25 * (w.float() - exact).abs().max()
