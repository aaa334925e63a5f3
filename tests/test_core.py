"""The plugin core: registry, dispatch, the hook contract, AdaptedModel bookkeeping, the CLI."""

from __future__ import annotations

import ast
import inspect
import json
import os
import pathlib
import subprocess
import sys
import warnings

import peft_core
import pytest
import torch
from conftest import clone_state, model_inputs, module_tree, state_equal, tiny_llama
from peft_core import (
    AdaptedModel,
    AdapterError,
    ConfigError,
    MergeError,
    MethodNotInstalledError,
    MethodSpec,
    PeftConfig,
    PluginContractError,
    PluginError,
    TaskType,
    hookimpl,
    hookspecs,
)
from peft_core.registry import Registry, get_registry
from toy_plugin import ToyPlugin, ToyScaleConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
HOOKS = [n for n in dir(hookspecs) if get_registry().pm.parse_hookspec_opts(hookspecs, n)]


@pytest.fixture
def toy():
    plugin = ToyPlugin()
    with get_registry().plugin(plugin, name="toy"):
        yield plugin


# ---------------------------------------------------------------- the contract itself
def test_every_hook_is_documented():
    assert set(HOOKS) >= {"inject", "state_dict_filter", "state_dict_load", "merge", "unmerge", "remove",
                          "prepare_inputs", "declare_methods"}
    for name in HOOKS:
        fn = getattr(hookspecs, name)
        doc = inspect.getdoc(fn) or ""
        assert "When:" in doc and "Returns" in doc and "Example::" in doc, f"{name} lacks documentation"
        opts = get_registry().pm.parse_hookspec_opts(hookspecs, name)
        assert ("firstresult" in doc) == True, name  # noqa: E712 - the doc must say whether it is firstresult
        sig = inspect.signature(fn)
        assert sig.return_annotation is not inspect.Signature.empty, f"{name} has no return type"
        assert all(p.annotation is not inspect.Parameter.empty for p in sig.parameters.values()), name
        assert opts is not None


class Recorder:
    """An extension plugin (declares no method) that wraps every hook and records the calls."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def _make(name):
        def wrapper(self, **kwargs):
            self.seen.append(name)
            return (yield)
        wrapper.__name__ = name
        return wrapper


#: Hooks the registry calls once per plugin as it registers, not per adapter.
REGISTRATION_HOOKS = {"declare_methods", "add_hookspecs"}

for _hook in HOOKS:
    if _hook in REGISTRATION_HOOKS:
        continue
    _params = list(inspect.signature(getattr(hookspecs, _hook)).parameters)
    _src = (f"def {_hook}(self, {', '.join(_params)}):\n    self.seen.append({_hook!r})\n    return (yield)\n")
    _ns: dict = {}
    exec(_src, _ns)
    setattr(Recorder, _hook, hookimpl(wrapper=True)(_ns[_hook]))


def test_every_hook_is_exercised_and_wrappable(toy, tmp_path):
    """One lifecycle drives every hook; an extension's wrapper sees each call (subset callers keep it)."""
    rec = Recorder()
    reg = get_registry()
    with reg.plugin(rec, name="recorder"):
        model = AdaptedModel(tiny_llama(), ToyScaleConfig(shift_inputs=True))
        ids = model_inputs("llama")["input_ids"]
        model(input_ids=ids)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()  # a training forward with a loss: training_loss_term
        model.on_optimizer_step(0)  # what a loop calls after optimizer.step(): on_optimizer_step
        model.eval()
        model.save_pretrained(tmp_path)
        # the toy method has no conversion: the call reaches the hook, answers None, and the save is refused
        with pytest.raises(ConfigError, match=r"TOY.* has no conversion"):
            model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path)
        assert not (tmp_path / "converted").exists()
        model.merge_adapter()
        model.unmerge_adapter()
        # the toy method cannot hot-swap: both calls reach the hooks (the recorder wraps them), which answer None
        with pytest.raises(ConfigError, match="no adapter to prepare"):
            peft_core.prepare_model_for_compiled_hotswap(model)
        with pytest.raises(ConfigError, match="TOYSCALE adapters cannot be hot-swapped"):
            peft_core.hotswap_adapter(model, tmp_path, "default")
        AdaptedModel.from_pretrained(tiny_llama(), tmp_path)
        model.delete_adapter("default")
    missing = set(HOOKS) - REGISTRATION_HOOKS - set(rec.seen)
    assert not missing, f"hooks never exercised: {missing}"
    rec2 = Recorder()
    with reg.plugin(rec2, name="recorder2"):  # declare_methods: called when a plugin registers
        with reg.plugin(ToyPluginTwo(), name="toy2") as record:
            assert [s.name for s in record.methods] == ["TOYTWO"]
    # add_hookspecs: called when a plugin registers, before its hooks are checked
    published = []

    class Publisher:
        @hookimpl
        def add_hookspecs(self, pluginmanager):
            published.append(pluginmanager)
            pluginmanager.add_hookspecs(PublishedSpecs)

        @hookimpl
        def toy_published(self, value):
            return value * 2

    with reg.plugin(Publisher(), name="publisher"):
        assert published == [reg.pm] and "toy_published" in reg.hook_names()
        assert reg.hook.toy_published(value=21) == 42


class PublishedSpecs:
    @hookspecs.hookspec(firstresult=True)
    def toy_published(self, value: int) -> int:
        """A hook a test plugin publishes."""


class ToyTwoConfig(ToyScaleConfig):
    peft_type = "TOYTWO"


class ToyPluginTwo(ToyPlugin):
    @hookimpl
    def declare_methods(self):
        return [MethodSpec(name="TOYTWO", config_cls=ToyTwoConfig, task_types=list(TaskType), mergeable=False,
                           summary="second toy")]


class ToyStepPlugin(ToyPlugin):
    """A third party's method with a regulariser and a per-step schedule (the two training-step hooks)."""

    def __init__(self, term=None, config_back=None) -> None:
        super().__init__()
        self.steps: list[tuple[str, int, bool]] = []
        self._term, self._config_back = term, config_back

    @hookimpl
    def training_loss_term(self, model, adapter_name, config, outputs):
        self.calls.append(f"term:{adapter_name}")
        return self._term(model, adapter_name) if self._term else None

    @hookimpl
    def on_optimizer_step(self, model, adapter_name, config, global_step):
        self.steps.append((adapter_name, global_step, torch.is_grad_enabled()))
        return self._config_back(config, global_step) if self._config_back else None


def _scales(model, name):
    return sum(m.toy_scale[name].sum() for m in model.modules() if hasattr(m, "toy_scale") and name in m.toy_scale)


def test_training_step_hooks_reach_the_loss_and_keep_the_returned_config():
    plugin = ToyStepPlugin(term=lambda model, name: 0.5 * _scales(model, name),
                           config_back=lambda config, step: config.replace(revision=f"step-{step}"))
    with get_registry().plugin(plugin, name="toy-steps"):
        model = AdaptedModel(tiny_llama(), ToyScaleConfig())
        model.add_adapter("frozen", ToyScaleConfig(inference_mode=True))
        ids = model_inputs("llama")["input_ids"]
        model.eval()
        plain = model(input_ids=ids, labels=ids).loss
        terms = lambda: [c for c in plugin.calls if c.startswith("term:")]  # noqa: E731
        assert terms() == []  # eval: no term
        model.train()
        out = model(input_ids=ids, labels=ids)
        assert terms() == ["term:default"]  # only the adapter that trains now
        expected = float(plain) + 0.5 * float(_scales(model.base_model, "default"))
        assert abs(float(out.loss) - expected) < 1e-4 and out["loss"] is out.loss
        out.loss.backward()  # the term's gradient reaches the adapter's parameters
        layer = next(m for m in model.base_model.modules() if hasattr(m, "toy_scale"))
        assert layer.toy_scale["default"].grad is not None
        model(input_ids=ids)  # no labels, no loss: nothing to add to
        with model.disable_adapter():
            model(input_ids=ids, labels=ids)
        assert terms() == ["term:default"]
        model.on_optimizer_step(3)
        # every adapter of the method, in the order added, without autograd; the returned configs are kept
        assert plugin.steps == [("default", 3, False), ("frozen", 3, False)]
        assert model.peft_config["default"].revision == "step-3"
        assert model.peft_config["frozen"].revision == "step-3"
        with pytest.raises(TypeError, match="step index"):
            model.on_optimizer_step(-1)


def test_training_step_hooks_answer_with_the_contract_s_types():
    with get_registry().plugin(ToyStepPlugin(term=lambda model, name: 1.0), name="toy-bad-term"):
        model = AdaptedModel(tiny_llama(), ToyScaleConfig())
        model.train()
        ids = model_inputs("llama")["input_ids"]
        with pytest.raises(PluginContractError, match="training_loss_term"):
            model(input_ids=ids, labels=ids)
    with get_registry().plugin(ToyStepPlugin(config_back=lambda config, step: {"r": 1}), name="toy-bad-step"):
        model = AdaptedModel(tiny_llama(), ToyScaleConfig())
        with pytest.raises(PluginContractError, match="on_optimizer_step"):
            model.on_optimizer_step(0)
        assert isinstance(model.peft_config["default"], ToyScaleConfig)


def test_dispatch_reaches_only_the_owning_method_plugin(toy):
    other = ToyPluginTwo()
    with get_registry().plugin(other, name="toy2"):
        AdaptedModel(tiny_llama(), ToyScaleConfig())
        assert toy.calls == ["inject"] and other.calls == []
        AdaptedModel(tiny_llama(), ToyTwoConfig())
        assert other.calls == ["inject"] and toy.calls == ["inject"]


# ---------------------------------------------------------------- registry
def test_builtin_methods_come_from_entry_points():
    reg = Registry()
    rows = {r["method"]: r for r in reg.describe()}
    assert rows["LORA"]["distribution"] == "peft-core"
    assert rows["LORA"]["plugin"] == "lora"


def test_plugin_selection_env(monkeypatch):
    monkeypatch.setenv("PEFT_CORE_PLUGINS", "none")
    reg = Registry()
    assert reg.describe() == []
    with pytest.raises(MethodNotInstalledError, match="PEFT_CORE_PLUGINS"):
        reg.method("LORA")
    monkeypatch.setenv("PEFT_CORE_PLUGINS", "lora")
    assert [r["method"] for r in Registry().describe()] == ["LORA"]


def test_duplicate_method_names_are_an_error_naming_both():
    reg = Registry()
    reg.register(ToyPlugin(), name="a", distribution="dist-a", version="1")
    with pytest.raises(PluginError, match=r"dist-a.*dist-b"):
        reg.register(ToyPlugin(), name="b", distribution="dist-b", version="2")
    assert reg.owner("TOYSCALE").distribution == "dist-a"


def test_invalid_plugins_are_rejected_whole():
    reg = Registry()

    class UnknownHook:
        @hookimpl
        def declare_methods(self):
            return []

        @hookimpl
        def injekt(self, model):
            pass

    class BadSignature:
        @hookimpl
        def inject(self, model, not_an_argument):
            pass

    class WrongDeclaration:
        @hookimpl
        def declare_methods(self):
            return ["LORA"]

    with pytest.raises(PluginError, match=r"injekt.*neither in the contract"):
        reg.register(UnknownHook(), name="u")
    with pytest.raises(PluginError, match="not_an_argument"):
        reg.register(BadSignature(), name="s")
    with pytest.raises(PluginContractError, match="MethodSpec"):
        reg.register(WrongDeclaration(), name="w")
    assert not reg.pm.get_plugins() - {p.plugin for p in reg.plugins()}


def test_unregister_removes_methods():
    reg = get_registry()
    with reg.plugin(ToyPlugin(), name="t"):
        assert reg.method("TOYSCALE").name == "TOYSCALE"
    with pytest.raises(MethodNotInstalledError, match="TOYSCALE"):
        reg.method("TOYSCALE")


def test_method_spec_validates():
    with pytest.raises(ValueError, match="upper-case"):
        MethodSpec(name="lora", config_cls=ToyScaleConfig, task_types=[], mergeable=True, summary="")
    with pytest.raises(ValueError, match="peft_type"):
        MethodSpec(name="OTHER", config_cls=ToyScaleConfig, task_types=[], mergeable=True, summary="")
    with pytest.raises(TypeError):
        MethodSpec(name="X", config_cls=dict, task_types=[], mergeable=True, summary="")
    spec = MethodSpec(name="TOYSCALE", config_cls=ToyScaleConfig, task_types=["CAUSAL_LM"], mergeable=True,
                      summary="s")
    with pytest.raises(AttributeError):
        spec.name = "Y"  # frozen
    assert spec.task_types == frozenset({TaskType.CAUSAL_LM})


# ---------------------------------------------------------------- configs
def test_config_json_round_trip_and_unknown_fields(toy, tmp_path):
    cfg = ToyScaleConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"])
    data = cfg.to_dict()
    assert data["peft_type"] == "TOYSCALE" and data["task_type"] == "CAUSAL_LM"
    assert PeftConfig.from_dict(json.loads(json.dumps(data))) == cfg
    data["from_the_future"] = 1
    data["also_new"] = 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert PeftConfig.from_dict(data) == cfg
    assert len(caught) == 1 and "also_new, from_the_future" in str(caught[0].message)
    cfg.save_pretrained(tmp_path)
    assert PeftConfig.from_pretrained(tmp_path) == cfg


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="task_type='NOPE'"):
        ToyScaleConfig(task_type="NOPE")
    with pytest.raises(ConfigError, match="shift_inputs must be bool"):
        ToyScaleConfig(shift_inputs="yes")
    with pytest.raises(ConfigError, match="peft_type"):
        PeftConfig.from_dict({"r": 8})
    with pytest.raises(MethodNotInstalledError, match="NOSUCH"):
        PeftConfig.from_dict({"peft_type": "NOSUCH"})


# ---------------------------------------------------------------- AdaptedModel
def test_wraps_in_place_and_freezes_base(toy):
    base = tiny_llama()
    model = AdaptedModel(base, ToyScaleConfig())
    assert model.base_model is base
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".toy_scale.default" in n for n in trainable)
    assert model.toy_count() == 1  # an operation declared by the method


def test_failed_inject_leaves_model_untouched(toy):
    base = tiny_llama()
    before, tree = clone_state(base), module_tree(base)
    with pytest.raises(Exception, match="matched nothing"):
        AdaptedModel(base, ToyScaleConfig(target_modules=["nope"]))
    assert state_equal(before, clone_state(base)) and tree == module_tree(base)


def test_plugin_raising_midway_is_rolled_back_and_named():
    class HalfInject(ToyPlugin):
        @hookimpl
        def inject(self, model, adapter_name, config, runtime, store):
            super().inject(model, adapter_name, config, runtime, store)
            raise RuntimeError("boom after changing the model")

    reg = get_registry()
    with reg.plugin(HalfInject(), name="half"):
        base = tiny_llama()
        before, tree = clone_state(base), module_tree(base)
        grads = [p.requires_grad for p in base.parameters()]
        with pytest.raises(PluginError, match=r"'half'.*<in-process>.*boom"):
            AdaptedModel(base, ToyScaleConfig())
        assert tree == module_tree(base) and state_equal(before, clone_state(base))
        assert grads == [p.requires_grad for p in base.parameters()]


def test_wrong_return_type_is_rejected():
    class Liar(ToyPlugin):
        @hookimpl
        def inject(self, model):
            return 42

    with get_registry().plugin(Liar(), name="liar"):
        base = tiny_llama()
        tree = module_tree(base)
        with pytest.raises(PluginContractError, match="sequence of module names"):
            AdaptedModel(base, ToyScaleConfig())
        assert tree == module_tree(base)


def test_task_type_support_is_checked(toy):
    with pytest.raises(ConfigError, match="does not support task_type=SEQ_CLS"):
        AdaptedModel(tiny_llama(), ToyScaleConfig(task_type="SEQ_CLS"))


def test_adapter_names(toy):
    model = AdaptedModel(tiny_llama(), ToyScaleConfig())
    for bad in ["", "a.b", "keys", "__base__", 3]:
        with pytest.raises(AdapterError):
            model.add_adapter(bad, ToyScaleConfig())
    with pytest.raises(AdapterError, match="already exists"):
        model.add_adapter("default", ToyScaleConfig())
    with pytest.raises(AdapterError, match="unknown adapter"):
        model.set_adapter("nope")


def test_set_adapter_disable_merge_cycle(toy):
    base = tiny_llama()
    ref = base(**model_inputs("llama")).logits
    model = AdaptedModel(base, ToyScaleConfig())
    model.add_adapter("two", ToyScaleConfig())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "toy_scale" in n:
                p.fill_(1.5 if ".default" in n else 0.5)
    x = model_inputs("llama")
    out_default = model(**x).logits
    assert not torch.allclose(out_default, ref)
    assert next(n for n, p in model.named_parameters() if p.requires_grad).endswith("toy_scale.default")
    model.set_adapter("two")
    assert all(".two" in n for n, p in model.named_parameters() if p.requires_grad)
    with model.disable_adapter():
        torch.testing.assert_close(model(**x).logits, ref, rtol=0, atol=0)
    model.set_adapter("default")
    weights = clone_state(base)
    model.merge_adapter()
    model.merge_adapter()  # documented no-op
    assert model.merged_adapters == ["default"]
    torch.testing.assert_close(model(**x).logits, out_default)
    with model.disable_adapter():
        torch.testing.assert_close(model(**x).logits, ref, rtol=0, atol=0)
    assert model.merged_adapters == ["default"]
    model.unmerge_adapter()
    with pytest.warns(UserWarning, match="nothing is merged"):
        model.unmerge_adapter()
    assert state_equal({k: v for k, v in weights.items()}, clone_state(base))


def test_merge_and_unload_refuses_non_mergeable_and_unload_restores():
    reg = get_registry()
    with reg.plugin(ToyPluginTwo(), name="toy2"):
        base = tiny_llama()
        before, tree = clone_state(base), module_tree(base)
        model = AdaptedModel(base, ToyTwoConfig())
        with pytest.raises(MergeError, match="cannot be folded"):
            model.merge_and_unload()
        assert model.unload() is base
        assert tree == module_tree(base) and state_equal(before, clone_state(base))


def test_save_and_load_round_trip(toy, tmp_path):
    model = AdaptedModel(tiny_llama(), ToyScaleConfig(shift_inputs=True))
    model.add_adapter("second", ToyScaleConfig(target_modules=["v_proj"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad or "toy" in str(p.shape):
                pass
        for n, p in model.named_parameters():
            if "toy_scale" in n or "shift" in n:
                p.normal_()
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors", "second"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".peft-core-tmp")]
    x = model_inputs("llama")
    expected = model(**x).logits
    loaded = AdaptedModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(loaded(**x).logits, expected, rtol=0, atol=0)
    loaded.load_adapter(tmp_path / "second", adapter_name="second")
    model.set_adapter("second")
    loaded.set_adapter("second")
    torch.testing.assert_close(loaded(**x).logits, model(**x).logits, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())  # is_trainable=False


def test_prepare_inputs_binds_positional_args(toy):
    model = AdaptedModel(tiny_llama(), ToyScaleConfig(shift_inputs=True))
    with torch.no_grad():
        model.adapter_modules["default"]["shift"].fill_(0.3)
    ids = model_inputs("llama")["input_ids"]
    torch.testing.assert_close(model(ids).logits, model(input_ids=ids).logits)
    with model.disable_adapter():
        plain = model(ids).logits
    assert not torch.allclose(plain, model(ids).logits)


# ---------------------------------------------------------------- architecture rules
def test_core_imports_no_method():
    methods = {p.name for p in (ROOT / "methods").iterdir() if p.is_dir()}
    packages = {"peft_lora", "peft_prompt_tuning", "peft_prefix"} | methods
    for path in (ROOT / "core").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in packages, f"{path.name} imports {name}"
    code = ("import sys, peft_core; peft_core.AdaptedModel; print(sorted(m for m in sys.modules "
            "if m.startswith('peft_') and m != 'peft_core' and not m.startswith('peft_core.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PEFT_CORE_PLUGINS": "none"})
    assert out.stdout.strip() == "[]"


def test_config_names_resolve_through_registry(monkeypatch):
    import peft_core
    from peft_core.registry import reset_registry

    assert peft_core.LoraConfig.peft_type == "LORA"
    monkeypatch.setenv("PEFT_CORE_PLUGINS", "none")
    reset_registry()
    try:
        with pytest.raises(MethodNotInstalledError, match="pip install peft-core"):
            peft_core.LoraConfig  # noqa: B018
        with pytest.raises(AttributeError):
            peft_core.NotAThingConfig  # noqa: B018
    finally:
        monkeypatch.delenv("PEFT_CORE_PLUGINS")
        reset_registry()


# ---------------------------------------------------------------- CLI
def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peft_core.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_cli_list_methods_table_and_json():
    table = _cli("list-methods")
    assert table.returncode == 0
    assert table.stdout.splitlines()[0].split() == ["method", "distribution", "version", "mergeable", "task",
                                                    "types", "summary"]
    assert any(line.startswith("LORA") and "peft-core" in line for line in table.stdout.splitlines())
    data = json.loads(_cli("list-methods", "--json").stdout)
    assert {"LORA"} <= {m["method"] for m in data["methods"]} and data["broken"] == []
    version = _cli("--version")
    assert version.stdout.strip() == "peft-core 0.1.0"


def test_set_adapter_none_is_an_error(toy):
    model = AdaptedModel(tiny_llama(), ToyScaleConfig())
    with pytest.raises(AdapterError, match="disable_adapter"):
        model.set_adapter(None)
    assert model.active_adapters == ["default"]


def _plugin_sources() -> list[pathlib.Path]:
    """Every plugin a user can install from this repository: the built-in methods and the examples."""
    files = list((ROOT / "methods").rglob("*.py"))
    for example in (ROOT / "examples").iterdir():
        if (example / "pyproject.toml").exists():
            files += list((example / "src").rglob("*.py"))
    return files


def test_plugins_import_only_the_documented_api():
    """Built-in plugins are built as a third party would build one: from peft_core they import only the
    support modules' public names (peft_core.SUPPORT_MODULES, each module's __all__), and from another
    plugin only that plugin's public names; docs/api.md names every support module."""
    import importlib

    import peft_core

    api_doc = (ROOT / "docs" / "api.md").read_text()
    for mod in peft_core.SUPPORT_MODULES:
        assert f"peft_core.{mod}" in api_doc, f"docs/api.md does not document peft_core.{mod}"
    plugin_packages = {"peft_lora", "peft_prompt_tuning", "peft_prefix", "peft_p_tuning", "peft_ia3", "peft_road",
                       "peft_lora_conv1d"}
    checked = 0
    for path in _plugin_sources():
        own = path.relative_to(ROOT).parts
        own_package = {"lora": "peft_lora", "prompt_tuning": "peft_prompt_tuning", "prefix": "peft_prefix",
                       "p_tuning": "peft_p_tuning"}.get(
            own[1]) if own[0] == "methods" else next((p for p in own if p.startswith("peft_")), None)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    top = alias.name.split(".")[0]
                    assert top != "peft_core" or alias.name == "peft_core", f"{path}: import {alias.name}"
                continue
            if not isinstance(node, ast.ImportFrom) or not node.module or node.level:
                continue
            parts = node.module.split(".")
            if parts[0] == "peft_core":
                assert len(parts) <= 2, f"{path}: from {node.module} import ... (too deep)"
                if len(parts) == 2:
                    assert parts[1] in peft_core.SUPPORT_MODULES, f"{path}: {node.module} is not a support module"
                public = set(getattr(importlib.import_module(node.module), "__all__", ()))
                if len(parts) == 1:
                    public |= {s.config_cls.__name__ for s, _ in get_registry().methods()}
            elif parts[0] in plugin_packages and parts[0] != own_package:
                assert not any(p.startswith("_") for p in parts), f"{path}: imports private {node.module}"
                public = set(getattr(importlib.import_module(node.module), "__all__", ()))
            else:
                continue
            for alias in node.names:
                assert alias.name in public, f"{path}: {alias.name} is not a public name of {node.module}"
                checked += 1
    assert checked > 30  # the walk really saw the plugins' imports


def test_merge_all_or_nothing_checks_first_and_rolls_back_a_failed_merge():
    from peft_core.merging import merge_all_or_nothing, unmerge_all

    log: list[str] = []

    class Layer:
        def __init__(self, name: str, fails: bool = False, bad: bool = False) -> None:
            self.name, self.fails, self.bad = name, fails, bad

        def check_merge(self, adapter: str) -> None:
            log.append(f"check {self.name}")
            if self.bad:
                raise MergeError(f"{self.name} not finite")

        def merge(self, adapter: str) -> None:
            if self.fails:
                raise MergeError(f"{self.name} failed")
            log.append(f"merge {self.name}")

        def unmerge(self, adapter: str) -> None:
            log.append(f"unmerge {self.name}")

    layers = [("a", Layer("a")), ("b", Layer("b")), ("c", Layer("c", fails=True))]
    with pytest.raises(MergeError, match="c failed"):
        merge_all_or_nothing(layers, "x", safe=False)
    assert log == ["merge a", "merge b", "unmerge b", "unmerge a"]
    log.clear()
    with pytest.raises(MergeError, match="b not finite"):
        merge_all_or_nothing([("a", Layer("a")), ("b", Layer("b", bad=True))], "x", safe=True)
    assert log == ["check a", "check b"]  # nothing merged before every layer passed its check
    log.clear()
    merge_all_or_nothing(layers[:2], "x", safe=True, merge=lambda layer, name, path: log.append(f"{path}:{name}"))
    unmerge_all(layers[:2], "x")
    assert log == ["check a", "check b", "a:x", "b:x", "unmerge b", "unmerge a"]
