"""Reliability under bad input, part 3: misbehaving plugins, model misuse, and threads.

- A plugin hook that raises (any exception, at any point of ``inject``, in ``complete_config``, in
  ``state_dict_load`` while loading, in ``state_dict_filter`` while saving) leaves the model and the adapter
  folder as they were, and the error names the plugin, its distribution and version, and the hook. A hook
  that returns the wrong type is a ``PluginContractError`` saying what the contract expects. (tests/test_core.py
  covers an ``inject`` that raises after changing the model and one that returns 42.)
- Misuse (another architecture or size, merge twice, unmerge without merge, deleting the active or a merged
  adapter, reserved or path-like adapter names, bad ``adapter_names``) is a clear error or a documented no-op.
- Inference from several threads on one model with fixed adapters, mixed batches included, gives exactly the
  serial results.
"""

from __future__ import annotations

import random
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import clone_state, model_inputs, state_equal, tiny_bert_cls, tiny_gpt2, tiny_llama
from peft_core import (
    AdaptedModel,
    AdapterError,
    CheckpointError,
    LoraConfig,
    MergeError,
    PeftModel,
    PluginContractError,
    PluginError,
    TargetError,
    get_peft_model,
    hookimpl,
)
from peft_core.registry import get_registry
from reliability_support import check_error, fingerprint, unchanged, write_summary
from torch import nn
from toy_plugin import ToyPlugin, ToyScaleConfig

DIST, VERSION = "flaky-plugins", "6.6.6"


@pytest.fixture(scope="module", autouse=True)
def _report(tmp_path_factory):
    yield
    write_summary(tmp_path_factory.getbasetemp())


# ---------------------------------------------------------------- misbehaving plugins
class Boom(Exception):
    pass


class Flaky(ToyPlugin):
    """The toy method, with one hook made to fail (or to return the wrong thing) on demand."""

    def __init__(self, hook: str, error: BaseException | None = None, result: object = None) -> None:
        super().__init__()
        self.hook, self.error, self.result = hook, error, result

    def _fail(self, hook: str) -> None:
        if hook == self.hook and self.error is not None:
            raise self.error

    @hookimpl
    def complete_config(self, model, adapter_name, config):
        self._fail("complete_config")
        return self.result if self.hook == "complete_config" else None

    @hookimpl
    def inject(self, model, adapter_name, config, runtime, store):
        if self.hook == "inject" and self.error is None:
            return self.result
        # change everything the core must put back: layers, the store, hooks, attributes, requires_grad
        paths = super().inject(model, adapter_name, config, runtime, store)
        model.model.layers[0].register_forward_hook(lambda *a: None)
        model.model.layers[1].mlp.surprise = "left behind?"
        model.lm_head.weight.requires_grad_(True)
        if adapter_name not in store:  # store[adapter_name] is the adapter's own (the contract)
            store[adapter_name] = nn.ModuleDict({"extra": nn.Linear(2, 2)})
        self._fail("inject")
        return paths

    @hookimpl
    def state_dict_load(self, adapter_name, state_dict):
        self._fail("state_dict_load")
        if self.hook == "state_dict_load" and self.result is not None:
            return self.result
        return super().state_dict_load(adapter_name, state_dict)

    @hookimpl
    def state_dict_filter(self, adapter_name, state_dict):
        self._fail("state_dict_filter")
        if self.hook == "state_dict_filter" and self.result is not None:
            return self.result
        return super().state_dict_filter(adapter_name, state_dict)

    @hookimpl
    def prepare_inputs(self, model, adapter_name, store, inputs):
        if self.hook == "prepare_inputs" and self.result is not None:
            return self.result
        return super().prepare_inputs(model, adapter_name, store, inputs)


def _registered(plugin: ToyPlugin):
    reg = get_registry()
    reg.register(plugin, name="flaky", distribution=DIST, version=VERSION)
    return reg


def _freeze_like_a_user(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.mark.parametrize("error", [KeyError("missing"), AttributeError("no such attribute"), TypeError("bad"),
                                   Boom("custom"), IndexError(), RuntimeError("CUDA out of memory (pretend)")],
                         ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("hook", ["complete_config", "inject"])
def test_a_hook_raising_while_adding_leaves_the_model_and_names_the_plugin(hook, error):
    reg = _registered(Flaky(hook, error))
    try:
        base = tiny_llama()
        before = fingerprint(base)
        model = AdaptedModel(base)
        with pytest.raises(PluginError) as info:
            model.add_adapter("default", ToyScaleConfig(shift_inputs=True))
        message = str(info.value)
        check_error(info.value, f"{hook} raising {type(error).__name__}")
        assert all(s in message for s in ("'flaky'", DIST, VERSION, hook)), message
        assert type(error).__name__ in message and info.value.__cause__ is error
        assert unchanged(base, before), "half-injected"
        assert not model.peft_config and not len(model.adapter_modules)
    finally:
        reg.unregister("flaky")


def test_a_keyboard_interrupt_inside_inject_rolls_back_and_is_not_wrapped():
    reg = _registered(Flaky("inject", KeyboardInterrupt()))
    try:
        base = tiny_llama()
        before = fingerprint(base)
        with pytest.raises(KeyboardInterrupt):
            AdaptedModel(base, ToyScaleConfig(shift_inputs=True))
        assert unchanged(base, before)
    finally:
        reg.unregister("flaky")


def test_state_dict_load_raising_while_loading_leaves_the_model(tmp_path):
    with get_registry().plugin(ToyPlugin(), name="toy"):
        AdaptedModel(tiny_llama(), ToyScaleConfig(shift_inputs=True)).save_pretrained(tmp_path)
    reg = _registered(Flaky("state_dict_load", ValueError("cannot map")))
    try:
        base = _freeze_like_a_user(tiny_llama())
        model = AdaptedModel(base, LoraConfig(target_modules=["v_proj"]))
        before = fingerprint(model)
        with pytest.raises(PluginError, match=r"'flaky'.*flaky-plugins 6\.6\.6.*state_dict_load.*cannot map") as info:
            model.load_adapter(tmp_path, adapter_name="toy")
        check_error(info.value, "state_dict_load raising")
        assert unchanged(model, before) and list(model.peft_config) == ["default"]
    finally:
        reg.unregister("flaky")


def test_state_dict_filter_raising_while_saving_leaves_the_folder(tmp_path):
    plugin = Flaky("state_dict_filter")
    reg = _registered(plugin)
    try:
        model = AdaptedModel(tiny_llama(), ToyScaleConfig())
        model.save_pretrained(tmp_path)
        files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "toy_scale" in n).fill_(2.0)
        plugin.error = LookupError("lost the tensors")
        with pytest.raises(PluginError, match=r"'flaky'.*state_dict_filter.*lost the tensors") as info:
            model.save_pretrained(tmp_path)
        check_error(info.value, "state_dict_filter raising")
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files
    finally:
        reg.unregister("flaky")


@pytest.mark.parametrize(("hook", "result", "expects"), [
    ("complete_config", {"r": 8}, "ToyScaleConfig or None"),
    ("inject", "q_proj", "sequence of module names"),
    ("inject", [1, 2], "sequence of module names"),
    ("state_dict_load", [("a", 1)], "expects a dict"),
    ("state_dict_filter", ["weights"], "expects a dict"),
    ("prepare_inputs", ["input_ids"], "expects a dict"),
])
def test_a_hook_returning_the_wrong_type_is_a_contract_error(tmp_path, hook, result, expects):
    with get_registry().plugin(ToyPlugin(), name="toy"):
        AdaptedModel(tiny_llama(), ToyScaleConfig(shift_inputs=True)).save_pretrained(tmp_path)
    reg = _registered(Flaky(hook, result=result))
    try:
        base = tiny_llama()
        before = fingerprint(base)
        with pytest.raises(PluginContractError, match=expects) as info:
            if hook == "state_dict_load":
                AdaptedModel.from_pretrained(base, tmp_path)
            elif hook in ("complete_config", "inject"):
                AdaptedModel(base, ToyScaleConfig())
            else:
                model = AdaptedModel(base, ToyScaleConfig(shift_inputs=True))
                if hook == "state_dict_filter":
                    model.save_pretrained(tmp_path / "again")
                else:
                    model(**model_inputs("llama"))
        check_error(info.value, f"{hook} returning {type(result).__name__}")
        if hook in ("complete_config", "inject", "state_dict_load"):
            assert unchanged(base, before)
        assert not (tmp_path / "again").exists()
    finally:
        reg.unregister("flaky")


def test_a_lora_merge_failing_midway_unfolds_what_it_folded():
    """The second targeted layer lives on the meta device: merging folds the first, then fails. Before the fix,
    the first stayed folded while the core thought nothing was merged."""
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    x = model_inputs("llama")
    with torch.no_grad():
        expected = model(**x).logits
    layer = model.base_model.model.layers[1].self_attn.q_proj
    real = layer.base_layer.weight
    layer.base_layer.weight = nn.Parameter(torch.empty_like(real, device="meta"), requires_grad=False)
    weights = clone_state(model.base_model.model.layers[0])
    with pytest.raises(MergeError, match="meta") as info:
        model.merge_adapter()
    check_error(info.value, "merge failing midway")
    assert state_equal(weights, clone_state(model.base_model.model.layers[0]))
    assert model.merged_adapters == []
    layer.base_layer.weight = real
    with torch.no_grad():
        assert torch.equal(model(**x).logits, expected)


# ---------------------------------------------------------------- loading onto the wrong model
def _saved_lora(tmp_path: Path, build, **kw) -> Path:
    get_peft_model(build(), LoraConfig(init_lora_weights=False, **kw)).save_pretrained(tmp_path)
    return tmp_path


def _llama(**changes) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, pad_token_id=0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**{**cfg, **changes})).eval()


@pytest.mark.parametrize(("source", "target", "error", "names"), [
    ("gpt2", "llama", TargetError, ["c_attn", "q_proj"]),
    ("llama", "wider llama", CheckpointError, ["shape mismatch", "layers.0.self_attn.q_proj.lora_A", "(8, 32)"]),
    ("llama", "shallower llama", CheckpointError, ["match nothing", "layers.1.self_attn.q_proj.lora_A"]),
    ("llama", "bert", TargetError, ["q_proj", "query"]),
])
def test_an_adapter_for_another_model_names_the_first_mismatching_modules(tmp_path, source, target, error, names):
    builds = {"gpt2": tiny_gpt2, "llama": tiny_llama, "wider llama": lambda: _llama(hidden_size=48),
              "shallower llama": lambda: _llama(num_hidden_layers=1), "bert": tiny_bert_cls}
    kw = {"target_modules": ["c_attn"]} if source == "gpt2" else {"target_modules": ["q_proj", "v_proj"]}
    folder = _saved_lora(tmp_path, builds[source], **kw)
    base = builds[target]()
    before = fingerprint(base)
    with pytest.raises(error) as info:
        PeftModel.from_pretrained(base, folder)
    check_error(info.value, f"{source} adapter onto {target}")
    assert all(n in str(info.value) for n in names), str(info.value)
    assert unchanged(base, before)


# ---------------------------------------------------------------- misuse of a model
@pytest.fixture
def two():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(target_modules=["q_proj"], r=2, init_lora_weights=False))
    return model


def test_merge_twice_and_unmerge_without_merge_are_documented_no_ops(two):
    base_weights = clone_state(two.base_model)
    with pytest.warns(UserWarning, match="nothing is merged"):
        two.unmerge_adapter()
    assert state_equal(base_weights, clone_state(two.base_model))
    two.merge_adapter()
    once = clone_state(two.base_model)
    two.merge_adapter()
    two.merge_adapter(["default"])
    assert two.merged_adapters == ["default"] and state_equal(once, clone_state(two.base_model))
    two.unmerge_adapter()
    assert state_equal(base_weights, clone_state(two.base_model))


def test_deleting_the_active_and_a_merged_adapter(two):
    base_weights = {k: v for k, v in clone_state(two.base_model).items() if "lora_" not in k}
    two.merge_adapter()
    with pytest.warns(UserWarning, match="'b' is now active"):
        two.delete_adapter("default")
    assert two.active_adapters == ["b"] and two.merged_adapters == []
    now = {k: v for k, v in clone_state(two.base_model).items() if "lora_" not in k}
    assert state_equal({k.replace(".base_layer", ""): v for k, v in base_weights.items()},
                       {k.replace(".base_layer", ""): v for k, v in now.items()})
    two.delete_adapter("b")
    assert two.active_adapters == [] and not two.peft_config
    with pytest.raises(AdapterError, match="unknown adapter"):
        two.delete_adapter("b")


@pytest.mark.parametrize("name", ["get", "copy", "fromkeys", "setdefault", "popitem", "keys", "to", "__base__",
                                  "a.b", "a/b", "/tmp/peft-core-escape", "a\\b", "x" * 300, "", "line\nbreak", 3,
                                  None, "\ud800"])
def test_adapter_names_that_cannot_work_are_refused_up_front(tmp_path, name):
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["embed_tokens", "q_proj"]))
    model.save_pretrained(tmp_path)
    before = fingerprint(model)
    with pytest.raises(AdapterError) as info:
        model.add_adapter(name, LoraConfig(target_modules=["embed_tokens", "q_proj"]))
    check_error(info.value, "bad adapter name")
    with pytest.raises(AdapterError):
        model.load_adapter(tmp_path, adapter_name=name)
    assert unchanged(model, before)
    assert not Path("/tmp/peft-core-escape").exists()


@pytest.mark.parametrize("routing", [
    ["default", "b"], ["default", "b", "b", "default"], ["__base__"], [], ["__base__"] * 4, ["default", "nope", "b"],
    "default", ("x" for x in range(3)), [1, 2, 3], torch.tensor([0, 1, 2]),
], ids=["short", "long", "one base", "empty", "four base", "unknown", "a str", "a generator", "ints", "a tensor"])
def test_bad_adapter_names_routing_is_an_error(two, routing):
    x = model_inputs("llama", batch=3)
    with pytest.raises(AdapterError) as info:
        two(**x, adapter_names=routing)
    check_error(info.value, "bad adapter_names")


@pytest.mark.parametrize("where", ["lora linear", "lora embedding", "modules_to_save"])
def test_wrong_length_routing_is_caught_by_every_layer_kind(where):
    """Below the core's own check (which reads the batch size from input_ids/inputs_embeds), every layer kind
    that routes rows checks the count too, even when no row names one of its adapters."""
    if where == "lora embedding":
        model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["embed_tokens"]))
        module, x = model.base_model.model.embed_tokens, model_inputs("llama", batch=3)["input_ids"]
    elif where == "lora linear":
        model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
        module, x = model.base_model.model.layers[0].self_attn.q_proj, torch.randn(3, 5, 32)
    else:
        model = get_peft_model(tiny_bert_cls(), LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
        module, x = model.base_model.classifier, torch.randn(3, 32)
    model.eval()
    for names in (["default", "__base__"], ["__base__"] * 2):
        with pytest.raises(AdapterError, match="2 entries but the batch has 3 rows"), model._runtime.route(names):
            module(x)


@pytest.mark.parametrize("value", [3, ["default", 3], {"default": 1}, b"default"])
def test_set_adapter_with_a_non_name_is_an_error(two, value):
    with pytest.raises(AdapterError, match="adapter name"):
        two.set_adapter(value)
    assert two.active_adapters == ["default"]


# ---------------------------------------------------------------- threads
def _nonzero(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_concurrent_inference_equals_serial(kind):
    """Four threads run forwards with the fixed active adapter and mixed batches (each thread its own routing,
    which is a ContextVar) on one model; every result equals the serial one exactly."""
    if kind == "llama":
        model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj", "embed_tokens"]))
        model.add_adapter("b", LoraConfig(target_modules=["q_proj", "down_proj"], r=2))
    else:
        model = get_peft_model(tiny_bert_cls(), LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
        model.add_adapter("b", LoraConfig(task_type="SEQ_CLS", target_modules=["value"], r=2))
    _nonzero(model)
    model.eval()
    routings = [None, ("default", "b", "__base__"), ("b", "b", "default"), ("__base__",) * 3, ("b", "default", "b")]
    jobs = [(r, seed) for r in routings for seed in range(3)]

    def run(job):
        routing, seed = job
        x = model_inputs("llama", batch=3, seed=seed)
        with torch.no_grad():
            return model(**x, adapter_names=None if routing is None else list(routing)).logits

    serial = {job: run(job) for job in jobs}
    order = jobs * 6
    random.Random(0).shuffle(order)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, order))
    mismatched = [job for job, out in zip(order, results) if not torch.equal(out, serial[job])]
    assert not mismatched, f"{len(mismatched)} of {len(order)} concurrent results differ from serial: {mismatched[:3]}"
    assert model.active_adapters == ["default"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(run((None, 0)), serial[(None, 0)])



@pytest.mark.parametrize("method", ["PromptTuningConfig", "PrefixTuningConfig"])
def test_concurrent_forward_and_generate_with_prompt_methods_equal_serial(method):
    """Prompt and prefix tuning act through a forward pre-hook and the KV cache: composed with LoRA, forwards
    and generate() from four threads equal the serial results."""
    import peft_core

    try:
        config_cls = getattr(peft_core, method)
    except (AttributeError, LookupError):
        pytest.skip(f"{method} is not installed")
    model = get_peft_model(tiny_llama(), config_cls(task_type="CAUSAL_LM", num_virtual_tokens=4))
    model.add_adapter("lora", LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    model.set_adapter(["default", "lora"])
    model.eval()

    def run(job):
        kind, seed = job
        x = model_inputs("llama", batch=2, seed=seed)
        with torch.no_grad():
            if kind == "forward":
                return model(**x).logits
            return model.generate(**x, max_new_tokens=3, do_sample=False)

    jobs = [(kind, seed) for kind in ("forward", "generate") for seed in range(3)]
    serial = {job: run(job) for job in jobs}
    order = jobs * 4
    random.Random(1).shuffle(order)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, order))
    assert all(torch.equal(out, serial[job]) for job, out in zip(order, results))
