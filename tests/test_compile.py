"""torch.compile over LoRA models: the adapter path traces without graph breaks (counted by Dynamo, not timed)."""

from __future__ import annotations

import threading

import peft_core
import pytest
import torch
import torch._dynamo as dynamo
from conftest import tiny_llama


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: Dynamo's caches (and its recompile limit per code object, which every
    model's ``forward`` shares) would otherwise carry from one test into the next."""
    dynamo.reset()
    yield
    dynamo.reset()


def _lora_llama():
    return peft_core.get_peft_model(tiny_llama(), peft_core.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


def test_lora_forward_has_no_graph_break_and_compiled_equals_eager() -> None:
    model = _lora_llama()
    x = torch.randint(0, 128, (2, 8))
    explained = dynamo.explain(model)(input_ids=x)
    # The layers used to read the routing ContextVar on every call, which Dynamo cannot trace.
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    with torch.no_grad():
        eager = model(input_ids=x).logits
        compiled = torch.compile(model, backend="eager", fullgraph=True)(input_ids=x).logits
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-6)


def test_routing_is_seen_in_the_routed_thread_only() -> None:
    """The no-ContextVar fast path must not hide a routing in flight, nor leak it into another thread."""
    model = _lora_llama()
    runtime = model._runtime
    seen: dict[str, object] = {}
    inside, release = threading.Event(), threading.Event()

    def routed() -> None:
        with runtime.route(["default", peft_core.BASE_ROW]) as routing:
            seen["routed"] = runtime.routing() is routing
            inside.set()
            release.wait(10)

    worker = threading.Thread(target=routed)
    worker.start()
    assert inside.wait(10)
    seen["other"] = runtime.routing()
    release.set()
    worker.join()
    assert seen == {"routed": True, "other": None}
    assert runtime.routing() is None and runtime._routed_calls == 0


@pytest.mark.parametrize("adapter_names", [["default", peft_core.BASE_ROW]])
def test_mixed_batch_still_routes_after_compiling_the_plain_path(adapter_names) -> None:
    model = _lora_llama()
    torch.nn.init.normal_(model.base_model.model.layers[0].self_attn.q_proj.lora_B["default"].weight)
    x = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        torch.compile(model, backend="eager")(input_ids=x)
        mixed = model(input_ids=x, adapter_names=adapter_names).logits
        with model.disable_adapter():
            base = model(input_ids=x[1:]).logits
        adapted = model(input_ids=x[:1]).logits
    torch.testing.assert_close(mixed[1:], base)
    torch.testing.assert_close(mixed[:1], adapted)
    assert not torch.allclose(adapted, base)


# ---------------------------------------------------------------------------------- across models
_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "t5": ["q", "v"], "bert": ["query", "value"]}


def _labels(name: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    if name == "bert":
        return torch.tensor([0, 1])
    return inputs["decoder_input_ids"] if name == "t5" else inputs["input_ids"]


def _lively_lora(name: str, **extra):
    from conftest import MODELS

    base = MODELS[name]()
    for module in base.modules():  # compiled and eager training steps must draw no different dropout masks
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif isinstance(getattr(module, "dropout", None), float):  # attention dropout as a rate (T5)
            module.dropout = 0.0
    if name == "gpt2":  # else transformers logs "loss_type=None ... unrecognized" (warning_once: no graph for it)
        base.loss_type = "ForCausalLM"
    model = peft_core.get_peft_model(base, peft_core.LoraConfig(r=4, target_modules=_TARGETS[name], **extra))
    torch.manual_seed(3)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)  # a real update, or compiled and eager agree trivially
    return model


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5", "bert"])
def test_lora_compiles_fullgraph_on_each_model_and_equals_eager(name) -> None:
    from conftest import model_inputs

    model = _lively_lora(name)
    inputs = model_inputs(name)
    explained = dynamo.explain(model)(**inputs)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    with torch.no_grad():
        eager = model(**inputs).logits
        with model.disable_adapter():
            base = model(**inputs).logits
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(**inputs).logits
    assert not torch.allclose(eager, base, atol=1e-3)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5", "bert"])
def test_lora_training_step_compiles_fullgraph_with_eager_gradients(name) -> None:
    from conftest import model_inputs

    model = _lively_lora(name)
    model.train()
    inputs = {**model_inputs(name), "labels": None}
    inputs["labels"] = _labels(name, inputs)
    eager_loss = model(**inputs).loss
    eager_loss.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    loss = torch.compile(model, backend="aot_eager", fullgraph=True)(**inputs).loss
    loss.backward()
    torch.testing.assert_close(loss, eager_loss, rtol=0, atol=1e-5)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == eager.keys() and all("lora_" in n for n in grads)
    for n, g in grads.items():
        torch.testing.assert_close(g, eager[n], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------- no recompiles
def _two_served_adapters(tmp_path):
    """Two adapters of the same rank, loaded for inference (frozen), as a server holds them."""
    first = _lively_lora("llama")
    first.save_pretrained(tmp_path / "a")
    torch.manual_seed(9)
    for n, p in first.named_parameters():
        if "lora_" in n:
            torch.nn.init.normal_(p, std=0.5)
    first.save_pretrained(tmp_path / "b")
    model = peft_core.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a")
    model.load_adapter(tmp_path / "b", adapter_name="b")
    return model.eval()


def test_set_adapter_disable_and_mixed_batches_compile_nothing_new(tmp_path) -> None:
    from torch._dynamo.testing import CompileCounter

    model = _two_served_adapters(tmp_path)
    x = torch.randint(0, 128, (2, 8))
    counter = CompileCounter()
    # not fullgraph: a mixed-batch call sets its routing (a ContextVar) in Python, before the network runs
    compiled = torch.compile(model, backend=counter)

    def both(**kw):
        with torch.no_grad():
            return compiled(input_ids=x, **kw).logits, model(input_ids=x, **kw).logits

    seen = []
    got, want = both()
    seen.append(got)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert counter.frame_count == 1
    model.set_adapter("b")
    got, want = both()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    seen.append(got)
    with model.disable_adapter():
        got, want = both()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    seen.append(got)
    assert counter.frame_count == 1  # set_adapter and disable_adapter ran the first graph
    got, want = both(adapter_names=["a", "b"])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    frames = counter.frame_count  # a call with a new keyword argument is a new call signature to Dynamo
    for names in (["b", "a"], ["b", peft_core.BASE_ROW], ["a", "a"]):
        got, want = both(adapter_names=names)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert counter.frame_count == frames
    # the three plain calls really differed, so the graph did follow the adapter switches
    assert not torch.allclose(seen[0], seen[1]) and not torch.allclose(seen[1], seen[2])


def test_generate_style_routing_around_a_compiled_network_compiles_nothing_new(tmp_path) -> None:
    """Routing set outside the compiled region (as ``generate`` does around transformers' compiled forward): the
    first mixed batch compiles its graph once (a routed call reads per-row gates through an operator); no later
    mixed batch, whatever its names, nor going back to plain calls, compiles anything."""
    from torch._dynamo.testing import CompileCounter

    model = _two_served_adapters(tmp_path)
    x = torch.randint(0, 128, (3, 8))
    counter = CompileCounter()
    network = torch.compile(model.base_model, backend=counter, fullgraph=True)
    with torch.no_grad():
        network(input_ids=x)
        for i, names in enumerate((["a", "b", "a"], ["b", peft_core.BASE_ROW, "b"], ["b", "b", "a"])):
            with model._runtime.route(names):
                got = network(input_ids=x).logits
            torch.testing.assert_close(got, model(input_ids=x, adapter_names=names).logits, rtol=0, atol=1e-6)
            assert counter.frame_count == 2, i
        model.set_adapter("b")
        torch.testing.assert_close(network(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=1e-6)
    assert counter.frame_count == 2


def test_a_routed_call_in_one_thread_leaves_a_compiled_plain_call_in_another_alone(tmp_path) -> None:
    """While one thread's mixed batch is in flight, the compiled graph reads gates through the operator, which
    sees each thread's own routing: a plain call elsewhere gets the active adapter on every row."""
    import threading

    model = _two_served_adapters(tmp_path)
    x = torch.randint(0, 128, (2, 8))
    network = torch.compile(model.base_model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        plain = model(input_ids=x).logits
        inside, release = threading.Event(), threading.Event()

        def routed() -> None:
            with model._runtime.route(["b", peft_core.BASE_ROW]):
                inside.set()
                release.wait(10)

        worker = threading.Thread(target=routed)
        worker.start()
        assert inside.wait(10)
        try:
            got = network(input_ids=x).logits
        finally:
            release.set()
            worker.join()
    torch.testing.assert_close(got, plain, rtol=0, atol=1e-6)


def test_merging_under_compile_recompiles_and_stays_exact(tmp_path) -> None:
    model = _two_served_adapters(tmp_path)
    x = torch.randint(0, 128, (2, 8))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        before = compiled(input_ids=x).logits
        model.merge_adapter()
        merged = compiled(input_ids=x).logits  # the merged adapter must not be added a second time
        model.unmerge_adapter()
        after = compiled(input_ids=x).logits
    torch.testing.assert_close(merged, before, rtol=0, atol=1e-5)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def test_gated_path_keeps_dtypes_and_lora_bias_under_autocast() -> None:
    model = _lively_lora("llama", lora_bias=True).eval()
    for n, p in model.named_parameters():
        if "lora_B" in n and n.endswith("bias"):
            torch.nn.init.normal_(p)
    x = torch.randint(0, 128, (2, 8))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eager = model(input_ids=x).logits
            got = compiled(input_ids=x).logits
    assert got.dtype == eager.dtype
    torch.testing.assert_close(got.float(), eager.float(), rtol=0, atol=5e-2)


# ---------------------------------------------------------------------------------- prompt-style methods
@pytest.mark.parametrize("make", [lambda: peft_core.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
                                  lambda: peft_core.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)],
                         ids=["prompt_tuning", "prefix_tuning"])
def test_prompt_methods_compile_fullgraph_in_forward_and_training(make) -> None:
    model = peft_core.get_peft_model(tiny_llama(), make())
    x = torch.randint(0, 128, (2, 8))
    explained = dynamo.explain(model)(input_ids=x, labels=x)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=1e-5)
    model.train()
    eager = model(input_ids=x, labels=x).loss
    eager.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    loss = compiled(input_ids=x, labels=x).loss
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=0, atol=1e-5)
    for n, g in want.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["gpt2", "t5", "bert"])
def test_set_adapter_and_disable_compile_nothing_new_on_other_models(tmp_path, name) -> None:
    from conftest import MODELS, model_inputs
    from torch._dynamo.testing import CompileCounter

    for i, folder in enumerate(("a", "b")):
        source = _lively_lora(name)
        torch.manual_seed(10 + i)
        for n, p in source.named_parameters():
            if "lora_" in n:
                torch.nn.init.normal_(p, std=0.5)  # two different adapters
        source.save_pretrained(tmp_path / folder)
    model = peft_core.PeftModel.from_pretrained(MODELS[name](), tmp_path / "a", adapter_name="a")
    model.load_adapter(tmp_path / "b", adapter_name="b")
    inputs = model_inputs(name)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    outs = []
    with torch.no_grad():
        for switch in (lambda: None, lambda: model.set_adapter("b"), lambda: model.set_adapter("a")):
            switch()
            outs.append(compiled(**inputs).logits)
            torch.testing.assert_close(outs[-1], model(**inputs).logits, rtol=0, atol=1e-5)
        with model.disable_adapter():
            torch.testing.assert_close(compiled(**inputs).logits, model(**inputs).logits, rtol=0, atol=1e-5)
    assert counter.frame_count == 1
    assert not torch.allclose(outs[0], outs[1], atol=1e-4)


def test_bf16_model_with_fp32_adapters_compiles_to_eager_rounding() -> None:
    """fp32 adapters on a bf16 model (autocast_adapter_dtype): the compiled update is summed in fp32 and rounded
    once, as eager's few-token route does, so compiled and eager agree to bf16's last bit here."""
    model = _lively_lora("llama")
    model = peft_core.PeftModel.from_pretrained(tiny_llama().to(torch.bfloat16), _saved(model)).eval()
    assert model.base_model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    x = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        eager = model(input_ids=x).logits
        with model.disable_adapter():
            base = model(input_ids=x).logits
        got = torch.compile(model, backend="aot_eager", fullgraph=True)(input_ids=x).logits
    assert not torch.equal(eager, base)
    torch.testing.assert_close(got, eager, rtol=0, atol=0)


def _saved(model):
    import tempfile

    folder = tempfile.mkdtemp()
    model.save_pretrained(folder)
    return folder
