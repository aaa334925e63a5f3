"""The adapter-layer protocol and what the core does with it: ownership, trainability, routing, extensions.

The failures that made the protocol necessary are in test_protocol_regressions.py.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from conftest import model_inputs, state_equal, tiny_llama
from peft_core import (
    AdaptedModel,
    AdapterError,
    AdapterLayer,
    ConfigError,
    LoraConfig,
    MethodSpec,
    PeftModel,
    PluginContractError,
    PluginError,
    TargetError,
    TaskType,
    get_peft_model,
    get_registry,
    hookimpl,
    set_peft_model_state_dict,
)
from peft_lora import LoraLinear
from torch import nn
from toy_plugin import ToyPlugin, ToyScaleConfig


def test_a_layer_that_cannot_route_refuses_mixed_batches_naming_itself():
    with get_registry().plugin(ToyPlugin(), name="toy"):
        model = AdaptedModel(tiny_llama(), ToyScaleConfig())
        model.add_adapter("b", ToyScaleConfig())
        model.eval()
        ids = model_inputs("llama")["input_ids"]
        with pytest.raises(AdapterError, match=r"model\.layers\.0\.self_attn\.q_proj.*ScaledLinear.*set_adapter"):
            model(input_ids=ids, adapter_names=["default", "b"])
        model(input_ids=ids, adapter_names=["__base__", "__base__"])  # no adapter named: nothing to route


# ---------------------------------------------------------------- ownership comes from declarations
def test_ownership_is_what_layers_declare():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    assert len(layers) == 2 and all(isinstance(m, LoraLinear) for m in layers)
    owned = model._ownership.owned("default")
    assert sorted(owned) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert sum("lora_A" in n for n in owned) == 2 and any("modules_to_save.default" in n for n in owned)


class Undeclared(ToyPlugin):
    """Creates a parameter its layer does not declare: a contract error, model untouched."""

    @hookimpl
    def inject(self, model, adapter_name, config, runtime, store):
        paths = super().inject(model, adapter_name, config, runtime, store)
        model.get_submodule(paths[0]).hidden = nn.Parameter(torch.zeros(3))
        return paths


def test_an_undeclared_parameter_is_a_contract_error_and_the_model_is_untouched():
    base = tiny_llama()
    before = copy.deepcopy(base.state_dict())
    with get_registry().plugin(Undeclared(), name="undeclared"):
        with pytest.raises(PluginContractError, match=r"hidden.*adapter_parameters"):
            AdaptedModel(base, ToyScaleConfig())
    assert state_equal(before, base.state_dict()) and all(p.requires_grad for p in base.parameters())


# ---------------------------------------------------------------- plugins publish hooks: LoRA's layer factory
class RecordingLinear(LoraLinear):
    made: list[str] = []


class TeachLoraRecording:
    """An extension that takes over LoRA's Linear layers for modules named q_proj."""

    @hookimpl
    def lora_make_layer(self, module, path, runtime):
        if path.endswith("q_proj"):
            RecordingLinear.made.append(path)
            return RecordingLinear(module, runtime)
        return None


def test_an_extension_teaches_lora_through_its_published_hook():
    assert "lora_make_layer" in get_registry().hook_names()
    RecordingLinear.made.clear()
    with get_registry().plugin(TeachLoraRecording(), name="teach"):
        assert "teach" in [r.name for r in get_registry().extensions()]
        model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"]))
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    assert RecordingLinear.made == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert kinds["base_model.model.layers.0.self_attn.q_proj"] == "RecordingLinear"
    assert kinds["base_model.model.layers.0.self_attn.v_proj"] == "LoraLinear"


class Int8Linear(nn.Linear):
    """Stands for a quantized Linear: a subclass of nn.Linear whose weight is not floating point."""

    def __init__(self) -> None:
        super().__init__(4, 4)
        self.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)


def test_builtin_layers_refuse_non_float_weights_naming_the_module():
    net = nn.Sequential()
    net.add_module("proj", Int8Linear())
    with pytest.raises(TargetError, match=r"'proj' is a .*Int8Linear.*install the plugin"):
        get_peft_model(net, LoraConfig(target_modules=["proj"]))
    assert type(net.proj) is Int8Linear


# ---------------------------------------------------------------- extensions behave as documented
class TrainsLmHead:
    """An extension implementing an optional hook that the owning method (LoRA) does not implement."""

    @hookimpl
    def trained_base_parameters(self, model, config):
        return ["lm_head.weight"]


def test_an_extensions_optional_hook_runs_when_the_owner_has_none():
    with get_registry().plugin(TrainsLmHead(), name="head"):
        model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    assert model.base_model.lm_head.weight.requires_grad


class BrokenWrapper:
    """An extension whose inject wrapper raises after the owner's inject ran."""

    @hookimpl(wrapper=True)
    def inject(self):
        result = yield
        raise ValueError("the wrapper's own bug")
        return result  # pragma: no cover


def test_an_error_in_an_extensions_wrapper_names_the_extension_not_the_owner():
    base = tiny_llama()
    with get_registry().plugin(BrokenWrapper(), name="broken_wrapper"):
        with pytest.raises(PluginError, match=r"plugin 'broken_wrapper'.*the wrapper's own bug") as info:
            get_peft_model(base, LoraConfig(target_modules=["q_proj"]))
    assert "'lora'" not in str(info.value)
    assert not any("lora" in n for n, _ in base.named_parameters())  # rolled back


class PassThroughWrapper:
    @hookimpl(wrapper=True)
    def inject(self):
        return (yield)


class RaisingOwner(ToyPlugin):
    @hookimpl
    def inject(self, model):
        raise ValueError("the owner's bug")


def test_an_owner_error_passing_through_a_wrapper_names_the_owner():
    with get_registry().plugin(PassThroughWrapper(), name="passthrough"), \
            get_registry().plugin(RaisingOwner(), name="raising_owner"):
        with pytest.raises(PluginError, match=r"plugin 'raising_owner'.*the owner's bug"):
            AdaptedModel(tiny_llama(), ToyScaleConfig())


class ForwardTrouble(ToyPlugin):
    """prepare_inputs runs inside the user's forward: what it raises is the forward's error."""

    error: BaseException = RuntimeError("unset")

    @hookimpl
    def prepare_inputs(self, inputs):
        raise self.error


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory"), KeyboardInterrupt(),
                                   ValueError("bad input from the model")])
def test_forward_time_exceptions_reach_the_user_as_themselves(error):
    plugin = ForwardTrouble()
    plugin.error = error
    with get_registry().plugin(plugin, name="trouble"):
        model = AdaptedModel(tiny_llama(), ToyScaleConfig(shift_inputs=True))
        with pytest.raises(type(error)) as info:
            model(input_ids=model_inputs("llama")["input_ids"])
    assert not isinstance(info.value, PluginError)
    if isinstance(error, Exception):
        assert any("trouble" in note for note in getattr(info.value, "__notes__", ["trouble"]))


class OomInject(ToyPlugin):
    @hookimpl
    def inject(self, model):
        raise torch.OutOfMemoryError("out of memory while allocating adapters")


def test_out_of_memory_in_a_hook_is_not_wrapped():
    base = tiny_llama()
    with get_registry().plugin(OomInject(), name="oom"):
        with pytest.raises(torch.OutOfMemoryError):
            AdaptedModel(base, ToyScaleConfig())


class MergeableWithoutMerge:
    @hookimpl
    def declare_methods(self):
        return [MethodSpec(name="TOYSCALE", config_cls=ToyScaleConfig, task_types=[TaskType.CAUSAL_LM],
                           mergeable=True, summary="claims mergeable, cannot merge")]

    @hookimpl
    def inject(self, model):
        return []


def test_mergeable_without_merge_and_unmerge_is_a_contract_error_at_registration():
    with pytest.raises(PluginContractError, match=r"mergeable=True but does not implement merge and unmerge"):
        get_registry().register(MergeableWithoutMerge(), name="no_merge")
    assert "no_merge" not in [r.name for r in get_registry().plugins()]


# ---------------------------------------------------------------- PEFT's keywords
def test_autocast_adapter_dtype_on_a_bf16_model_like_peft():
    for flag in (True, False):
        ours = get_peft_model(tiny_llama().to(torch.bfloat16), LoraConfig(target_modules=["q_proj"]),
                              autocast_adapter_dtype=flag)
        theirs = peft.get_peft_model(tiny_llama().to(torch.bfloat16), peft.LoraConfig(target_modules=["q_proj"]),
                                     autocast_adapter_dtype=flag)
        dtypes = {p.dtype for n, p in ours.named_parameters() if "lora_" in n}
        assert dtypes == {p.dtype for n, p in theirs.named_parameters() if "lora_" in n}
        assert dtypes == ({torch.float32} if flag else {torch.bfloat16})
        ids = model_inputs("llama")["input_ids"]
        ours.train()
        ours(input_ids=ids, labels=ids).loss.backward()
        assert all(p.grad is not None for n, p in ours.named_parameters() if "lora_" in n)
    assert all(p.dtype == torch.bfloat16 for n, p in ours.named_parameters() if "lora_" not in n)


def test_low_cpu_mem_usage_creates_meta_adapters_that_a_load_materialises(tmp_path):
    trained = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    trained.save_pretrained(tmp_path)
    ids = model_inputs("llama")["input_ids"]
    expected = trained(input_ids=ids).logits
    lazy = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]), low_cpu_mem_usage=True)
    assert all(p.is_meta for n, p in lazy.named_parameters() if "lora_" in n)
    assert not any(p.is_meta for n, p in lazy.named_parameters() if "lora_" not in n)
    set_peft_model_state_dict(lazy, trained.get_adapter_state_dict())
    assert not any(p.is_meta for p in lazy.parameters())
    assert torch.equal(lazy(input_ids=ids).logits, expected)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, low_cpu_mem_usage=True)
    assert torch.equal(loaded(input_ids=ids).logits, expected)
    assert all(p.device.type == "cpu" for p in loaded.parameters())


def test_keywords_peft_does_not_take_are_named_not_swallowed(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="frobnicate"):
        model.save_pretrained(tmp_path, frobnicate=True)
    with pytest.raises(TypeError, match="frobnicate"):
        model.add_adapter("b", LoraConfig(target_modules=["q_proj"]), frobnicate=True)
    with pytest.raises(TypeError, match="frobnicate"):
        AdaptedModel(tiny_llama(), LoraConfig(target_modules=["q_proj"]), frobnicate=True)
    with pytest.raises(TypeError, match="mixed"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]), mixed="yes")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]), mixed=True)
    assert not list(tmp_path.iterdir())


def test_configs_are_hashable_values():
    a = LoraConfig(target_modules=["q_proj"], rank_pattern={"q_proj": 4})
    b = LoraConfig(target_modules=["q_proj"], rank_pattern={"q_proj": 4})
    assert a == b and hash(a) == hash(b) and len({a, b, LoraConfig()}) == 2
    with pytest.raises(TypeError, match="read-only"):
        a.rank_pattern["v_proj"] = 2
    assert a.replace(rank_pattern={"v_proj": 2}).rank_pattern == {"v_proj": 2}


class BuggyFactory:
    """An extension whose lora_make_layer raises: the error names it and the hook, not LoRA's inject."""

    @hookimpl
    def lora_make_layer(self, module):
        raise ValueError("factory bug")


def test_an_error_in_a_published_hook_names_the_extension_and_that_hook():
    with get_registry().plugin(BuggyFactory(), name="buggy_factory"):
        with pytest.raises(PluginError, match=r"plugin 'buggy_factory' \(<in-process>\) raised in lora_make_layer "
                                              r"\(called from inject\).*factory bug"):
            get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))


def test_low_cpu_mem_usage_leaves_prompt_tables_materialised_as_peft_does():
    from peft_core import PromptTuningConfig

    cfg = {"task_type": "CAUSAL_LM", "num_virtual_tokens": 3}
    ours = get_peft_model(tiny_llama(), PromptTuningConfig(**cfg), low_cpu_mem_usage=True)
    theirs = peft.get_peft_model(tiny_llama(), peft.PromptTuningConfig(**cfg), low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in ours.parameters())
    assert not any(p.is_meta for p in theirs.parameters())


class FrozenState(ToyPlugin):
    """Its layers hold a Parameter they declare as frozen adapter state (a shared projection, say)."""

    @hookimpl
    def inject(self, model, adapter_name, config, runtime, store):
        paths = super().inject(model, adapter_name, config, runtime, store)
        for path in paths:
            layer = model.get_submodule(path)
            layer.shared = nn.Parameter(torch.ones(2))  # requires_grad=True, as every new Parameter
            layer.adapter_state = lambda name, layer=layer: {"shared": layer.shared}
        return paths


def test_frozen_adapter_state_never_trains():
    with get_registry().plugin(FrozenState(), name="frozen_state"):
        model = AdaptedModel(tiny_llama(), ToyScaleConfig())
        model.set_adapter("default")
    shared = [p for n, p in model.named_parameters() if n.endswith(".shared")]
    scales = [p for n, p in model.named_parameters() if ".toy_scale." in n]
    assert len(shared) == 2 and not any(p.requires_grad for p in shared)
    assert scales and all(p.requires_grad for p in scales)


def test_loading_for_inference_turns_dropout_off_as_peft_does(tmp_path):
    trained = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], lora_dropout=0.5,
                                                      init_lora_weights=False))
    trained.save_pretrained(tmp_path)
    base = tiny_llama().train()  # a model left in training mode (any plain nn.Module starts so)
    loaded = PeftModel.from_pretrained(base, tmp_path)
    assert not loaded.training and not any(m.training for m in loaded.modules())
    ids = model_inputs("llama")["input_ids"]
    assert torch.equal(loaded(input_ids=ids).logits, loaded(input_ids=ids).logits)  # deterministic: no dropout
    trainable = PeftModel.from_pretrained(tiny_llama().train(), tmp_path, is_trainable=True)
    assert trainable.training


def test_a_second_get_peft_model_on_the_same_base_warns_as_peft_does():
    base = tiny_llama()
    get_peft_model(base, LoraConfig(target_modules=["q_proj"]))
    with pytest.warns(UserWarning, match=r"already holds adapter layers.*add_adapter\(\).*unload\(\)"):
        get_peft_model(base, LoraConfig(target_modules=["q_proj"], r=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))  # a fresh base: no warning


class KeywordHead(nn.Module):
    """A model whose head is called with keywords only (PEFT had the same bug with modules_to_save)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        self.blocks = nn.ModuleList([nn.Linear(4, 4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(input=self.body(x))


def test_modules_to_save_takes_keyword_only_calls_and_refuses_containers():
    torch.manual_seed(0)
    model = get_peft_model(KeywordHead(), LoraConfig(target_modules=["body"], modules_to_save=["head"]))
    model.add_adapter("b", LoraConfig(target_modules=["body"], modules_to_save=["head"]))
    with torch.no_grad():
        model.base_model.head.modules_to_save["b"].weight.add_(1.0)
    model.eval()
    x = torch.randn(3, 4)
    mixed = model(x, adapter_names=["default", "b", "__base__"])
    rows = []
    for i, name in enumerate(["default", "b"]):
        model.set_adapter(name)
        rows.append(model(x[i:i + 1]))
    with model.disable_adapter():
        rows.append(model(x[2:]))
    assert (mixed - torch.cat(rows)).abs().max() < 1e-6
    base = KeywordHead()
    with pytest.raises(ConfigError, match=r"'blocks', a ModuleList.*'blocks.0'"):
        get_peft_model(base, LoraConfig(target_modules=["body"], modules_to_save=["blocks"]))
    assert type(base.blocks) is nn.ModuleList and type(base.body) is nn.Linear


# ---------------------------------------------------------------- small first-hour items (issue 17, partly)
def test_config_classes_show_their_fields_and_say_how_to_change_one():
    import inspect

    sig = inspect.signature(LoraConfig)
    assert list(sig.parameters)[:2] == ["task_type", "inference_mode"]
    assert sig.parameters["r"].default == 8 and sig.parameters["use_dora"].default is False
    config = LoraConfig(r=4)
    with pytest.raises(AttributeError, match=r"frozen.*config.replace\(r=\.\.\.\)"):
        config.r = 5
    assert config.r == 4 and config.replace(r=5).r == 5


def test_a_string_target_that_names_a_layer_explains_the_regex_rule():
    with pytest.raises(TargetError, match=r"regex that must match the whole module path.*\['q_proj'\]"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules="q_proj"))


def test_a_plugin_selection_typo_is_reported(monkeypatch):
    from peft_core.registry import Registry

    monkeypatch.setenv("PEFT_CORE_PLUGINS", "lora,lorra")
    reg = Registry()
    assert [s.name for s, _ in reg.methods()] == ["LORA"]
    assert [b.name for b in reg.broken()] == ["lorra"] and "no installed plugin" in reg.broken()[0].error
    with pytest.raises(PluginError, match="lorra"):
        Registry(strict=True).methods()


def test_list_methods_into_a_closed_pipe_is_quiet():
    """`peft-core list-methods | head -1`: the reader is gone before the table is written."""
    import subprocess
    import sys

    code = "import sys; from peft_core.cli import main; sys.exit(main(['list-methods']))"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # closed before the child writes anything: its first write meets a broken pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "BrokenPipeError" not in err and "Traceback" not in err
