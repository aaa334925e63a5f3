"""A third party's method plugin, found the way users find it: installed, then discovered by entry point.

``examples/peft-road`` is pip-installed (a real build of its pyproject) into a temporary folder that goes
on ``sys.path`` / ``PYTHONPATH``; nothing is registered in-process. Deliberately broken plugins are
distributions written by hand (a ``*.dist-info`` folder with METADATA and entry_points.txt beside the
module), which is all ``importlib.metadata`` needs to see an installed distribution.

Hugging Face ``peft`` is the oracle for RoAd: same logits, same files, loadable both ways.
"""

from __future__ import annotations

import copy
import importlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import clone_state, model_inputs, module_tree, tiny_bert_cls, tiny_llama, tiny_t5
from peft_core import MergeError, PeftModel, TaskType, get_peft_model, set_peft_model_state_dict
from peft_core.errors import ConfigError, TargetError
from peft_core.registry import Registry, reset_registry
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "peft-road"
SCRUBBED = ("PEFT_CORE_PLUGINS", "PEFT_CORE_STRICT")  # a developer's shell must not change the outcome


# ---------------------------------------------------------------- installing plugins
def _pip_install(source: Path, target: Path) -> None:
    # Build from a copy: an in-tree build would leave build/ and *.egg-info in the repository.
    work = target.parent / f"{source.name}-src"
    shutil.copytree(source, work, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "tests"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--no-compile", "--target", str(target), str(work)],
                   check=True, capture_output=True, text=True, timeout=180)


def _fake_dist(root: Path, dist: str, version: str, entry: str, module: str, source: str) -> None:
    """An installed distribution as importlib.metadata sees it: a dist-info folder plus its code."""
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[peft_core.methods]\n{entry} = {module}:plugin\n")
    (root / f"{module}.py").write_text(source)


BROKEN_IMPORT = 'raise ImportError("peft-broken-import needs libfrobnicate, which is not installed")\n'
BROKEN_CONTRACT = '''\
from peft_core import hookimpl


class Plugin:
    @hookimpl
    def declare_methods(self):
        return []

    @hookimpl
    def injekt(self, model):  # a typo: not a hook of the contract
        return []


plugin = Plugin()
'''


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder where ``pip install --target`` put the example plugin."""
    target = tmp_path_factory.mktemp("road") / "site"
    _pip_install(EXAMPLE, target)
    assert (target / "peft_road-0.1.0.dist-info" / "entry_points.txt").read_text().split() == [
        "[peft_core.methods]", "road", "=", "peft_road.plugin:plugin"]
    return target


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One folder per broken distribution, so each can be put on the path alone or together."""
    root = tmp_path_factory.mktemp("broken")
    _fake_dist(root / "import", "peft-broken-import", "0.3.0", "broken_import", "peft_broken_import", BROKEN_IMPORT)
    _fake_dist(root / "contract", "peft-broken-contract", "0.2.0", "broken_contract", "peft_broken_contract",
               BROKEN_CONTRACT)
    return {"import": root / "import", "contract": root / "contract"}


@pytest.fixture
def road(site: Path) -> Iterator[Registry]:
    """The example plugin on ``sys.path`` and a registry rebuilt from entry points; all undone after."""
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    try:
        yield reset_registry(strict=False)
    finally:
        sys.path.remove(str(site))
        for name in [m for m in sys.modules if m == "peft_road" or m.startswith("peft_road.")]:
            del sys.modules[name]
        importlib.invalidate_caches()
        reset_registry()


# ---------------------------------------------------------------- the command line
def _cli(*args: str, path: list[Path], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("peft-core")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "peft_core.cli"]
    full = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
    full["PYTHONPATH"] = os.pathsep.join([*map(str, path), *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env={**full, **(env or {})}, timeout=120)


def _baseline_methods() -> set[str]:
    """What this process's own environment provides (built-ins only: the example is not on sys.path)."""
    saved = {k: os.environ.pop(k) for k in SCRUBBED if k in os.environ}
    try:
        return {row["method"] for row in Registry(strict=False).describe()}
    finally:
        os.environ.update(saved)


def test_cli_lists_the_installed_plugin(site: Path) -> None:
    baseline = _baseline_methods()
    assert "LORA" in baseline and "ROAD" not in baseline
    result = _cli("list-methods", "--json", path=[site])
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    rows = {row["method"]: row for row in data["methods"]}
    assert set(rows) == baseline | {"ROAD"} and len(rows) == len(baseline) + 1
    assert data["broken"] == []
    assert rows["ROAD"] == {
        "method": "ROAD", "distribution": "peft-road", "version": "0.1.0", "plugin": "road", "mergeable": True,
        "task_types": sorted(t.value for t in TaskType), "summary": rows["ROAD"]["summary"]}
    assert rows["LORA"]["distribution"] == "peft-core"
    table = _cli("list-methods", path=[site])
    assert table.returncode == 0, table.stderr
    road_line = next(line for line in table.stdout.splitlines() if line.startswith("ROAD"))
    assert road_line.split()[1:5] == ["peft-road", "0.1.0", "yes", "all"]
    assert "broken" not in table.stdout


def test_cli_reports_broken_plugins_and_keeps_working(site: Path, broken: dict[str, Path]) -> None:
    result = _cli("list-methods", "--json", path=[site, broken["import"], broken["contract"]])
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"ROAD", "LORA"} <= {row["method"] for row in data["methods"]}
    found = {b["plugin"]: b for b in data["broken"]}
    assert set(found) == {"broken_import", "broken_contract"}
    imp, con = found["broken_import"], found["broken_contract"]
    assert (imp["distribution"], imp["version"]) == ("peft-broken-import", "0.3.0")
    assert imp["error"] == "ImportError: peft-broken-import needs libfrobnicate, which is not installed"
    assert "pip install -U peft-broken-import" in imp["hint"] and "PEFT_CORE_PLUGINS" in imp["hint"]
    assert (con["distribution"], con["version"]) == ("peft-broken-contract", "0.2.0")
    assert "injekt" in con["error"] and "neither in the contract" in con["error"]
    assert "hook contract" in con["hint"] and "PEFT_CORE_PLUGINS" in con["hint"]
    table = _cli("list-methods", path=[site, broken["import"]])
    assert table.returncode == 0
    assert "broken: plugin 'broken_import' from peft-broken-import 0.3.0 was skipped: ImportError" in table.stdout
    assert any(line.startswith("ROAD") for line in table.stdout.splitlines())


@pytest.mark.parametrize(("which", "how"), [("import", "flag"), ("contract", "env")])
def test_strict_mode_fails_naming_the_plugin(site: Path, broken: dict[str, Path], which: str, how: str) -> None:
    args, env = (["--strict"], None) if how == "flag" else ([], {"PEFT_CORE_STRICT": "1"})
    result = _cli("list-methods", "--json", *args, path=[site, broken[which]], env=env)
    assert result.returncode != 0
    assert result.stdout == ""
    assert f"plugin 'broken_{which}' from peft-broken-{which}" in result.stderr
    assert "strict mode" in result.stderr


def test_plugin_selection_excludes_the_broken_plugin(site: Path, broken: dict[str, Path]) -> None:
    path = [site, broken["import"], broken["contract"]]
    result = _cli("list-methods", "--json", "--strict", path=path, env={"PEFT_CORE_PLUGINS": "lora"})
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [row["method"] for row in data["methods"]] == ["LORA"] and data["broken"] == []
    result = _cli("list-methods", "--json", path=path, env={"PEFT_CORE_PLUGINS": "lora,road", "PEFT_CORE_STRICT": "1"})
    assert result.returncode == 0, result.stderr
    assert [row["method"] for row in json.loads(result.stdout)["methods"]] == ["LORA", "ROAD"]


# ---------------------------------------------------------------- using the method
def _config(**kwargs: object) -> object:
    """A RoadConfig, reached the way a user reaches it: through peft_core, resolved by the registry."""
    import peft_core

    return peft_core.RoadConfig(**kwargs)


def _base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's own tensors under their original names (RoAd layers nest them as base_layer)."""
    return {k.replace(".base_layer.", "."): v.detach().clone() for k, v in model.state_dict().items()
            if ".road_" not in k}


def _same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].view(ints.get(a[k].element_size(), a[k].dtype)),
                                                 b[k].view(ints.get(b[k].element_size(), b[k].dtype)))
        for k in a)


def test_discovered_from_the_installed_copy(road: Registry, site: Path) -> None:
    import peft_core

    owner = road.owner("ROAD")
    assert (owner.name, owner.distribution, owner.version) == ("road", "peft-road", "0.1.0")
    config_cls = peft_core.RoadConfig
    assert config_cls.peft_type == "ROAD"
    assert Path(sys.modules[config_cls.__module__].__file__).is_relative_to(site)  # not the source tree


def test_train_save_load_merge(road: Registry, tmp_path: Path) -> None:
    base = tiny_llama()
    original, tree = _base_weights(base), module_tree(base)
    model = get_peft_model(base, _config(task_type="CAUSAL_LM", group_size=8))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 8 and all(n.endswith((".road_theta.default", ".road_alpha.default")) for n in trainable)
    batch = model_inputs("llama", batch=4, seq=12)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    # a random tiny model sits near ln(vocab); steady progress, not a big drop, is the signal
    assert all(b < a for a, b in itertools.pairwise(losses)) and losses[-1] < losses[0] - 0.03, losses
    assert _same_bits(_base_weights(model.get_base_model()), original)  # only the angles and scales trained

    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(tensors) == sorted(f"base_model.model.model.layers.{i}.self_attn.{p}.{t}" for i in range(2)
                                     for p in ("q_proj", "v_proj") for t in ("road_theta", "road_alpha"))
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.road_theta"].shape == (16,)  # road_1: out/2
    assert tensors["base_model.model.model.layers.0.self_attn.v_proj.road_alpha"].shape == (8,)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ROAD" and saved["task_type"] == "CAUSAL_LM" and saved["inference_mode"] is True

    with torch.no_grad():
        expected = model(**batch).logits
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
        assert type(loaded).__name__ == "PeftModelForCausalLM"
        assert torch.equal(loaded(**batch).logits, expected)
        assert not any(p.requires_grad for p in loaded.parameters())

        model.merge_adapter()
        assert not _same_bits(_base_weights(model.get_base_model()), original)
        torch.testing.assert_close(model(**batch).logits, expected, rtol=0, atol=1e-5)
        model.unmerge_adapter()
        assert _same_bits(_base_weights(model.get_base_model()), original)  # exact, not approximately
        assert torch.equal(model(**batch).logits, expected)

    assert model.unload() is base
    assert module_tree(base) == tree and _same_bits(_base_weights(base), original)


def test_bias_and_non_lifo_unmerge_are_exact(road: Registry) -> None:
    """BERT's biased query/value layers, two merged adapters of different variants, the older one deleted."""
    base = tiny_bert_cls()
    original = _base_weights(base)
    model = get_peft_model(base, _config(variant="road_4", group_size=8, init_weights=False), adapter_name="a")
    model.add_adapter("b", _config(variant="road_1", group_size=16, init_weights=False))
    model.set_adapter(["a", "b"])
    x = model_inputs("bert")
    with torch.no_grad():
        expected = model(**x).logits
        model.merge_adapter()
        assert model.merged_adapters == ["a", "b"]
        torch.testing.assert_close(model(**x).logits, expected, rtol=0, atol=1e-5)
        layers = [m for m in model.modules() if hasattr(m, "restore_bytes")]
        held = sum(m.restore_bytes() for m in layers)
        weights = sum(m.weight.numel() * m.weight.element_size() + m.bias.numel() * m.bias.element_size()
                      for m in layers)
        assert held <= 2 * weights  # two merges recorded, neither more than a copy
        model.delete_adapter("a")  # "a" was merged first: "b" is unmerged, "a" undone, "b" merged again
        model.unmerge_adapter()
        assert _same_bits(_base_weights(base), original)
        only_b = model(**x).logits
        merged = copy.deepcopy(model).merge_and_unload()
        assert not any(hasattr(m, "road_theta") for m in merged.modules())
        torch.testing.assert_close(merged(**x).logits, only_b, rtol=0, atol=1e-5)


def test_safe_merge_refuses_nan_and_changes_nothing(road: Registry) -> None:
    base = tiny_llama()
    original = _base_weights(base)
    model = get_peft_model(base, _config(task_type="CAUSAL_LM", group_size=8))
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith("layers.1.self_attn.v_proj.road_theta.default"))[
            3] = float("nan")
    with pytest.raises(MergeError, match=r"NaN/Inf into model\.layers\.1\.self_attn\.v_proj"):
        model.merge_adapter(safe_merge=True)
    assert model.merged_adapters == [] and _same_bits(_base_weights(base), original)


def test_mixed_batch_rows_use_their_own_adapter(road: Registry) -> None:
    torch.manual_seed(1)
    model = get_peft_model(tiny_llama(), _config(group_size=8, init_weights=False), adapter_name="a")
    model.add_adapter("b", _config(variant="road_2", group_size=16, init_weights=False))
    ids = model_inputs("llama", batch=3)["input_ids"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=["b", "__base__", "a"]).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
        alone = {}
        for name in ("a", "b"):
            model.set_adapter(name)
            alone[name] = model(input_ids=ids).logits
    torch.testing.assert_close(mixed[0], alone["b"][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[1], plain[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[2], alone["a"][2], rtol=0, atol=1e-6)


def test_config_and_target_errors(road: Registry) -> None:
    with pytest.raises(ConfigError, match="group_size=5 must be even"):
        _config(group_size=5)
    base = tiny_llama()
    tree = module_tree(base)
    with pytest.raises(TargetError, match=r"matched no module.*q_proj"):
        get_peft_model(base, _config(target_modules=["nope"], group_size=8))
    assert module_tree(base) == tree
    with pytest.raises(TargetError, match=r"LlamaRMSNorm.*cannot adapt"):
        get_peft_model(base, _config(target_modules=["q_proj", "norm"], group_size=8))
    assert module_tree(base) == tree
    with pytest.raises(TargetError, match=r"v_proj has out_features=16, not a multiple of .*group_size=32"):
        get_peft_model(base, _config(group_size=32))  # q_proj (32) would fit; nothing changes
    assert module_tree(base) == tree


# ---------------------------------------------------------------- Hugging Face PEFT as the oracle
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # raised inside peft, not ours
@pytest.mark.parametrize(("arch", "variant"), [("llama", "road_1"), ("llama", "road_4"), ("t5", "road_2"),
                                               ("bert", "road_4")])
def test_matches_peft_logits_and_files_both_ways(road: Registry, tmp_path: Path, arch: str, variant: str) -> None:
    import peft

    build = {"llama": tiny_llama, "t5": tiny_t5, "bert": tiny_bert_cls}[arch]
    task = {"llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM", "bert": None}[arch]  # bert: the plain PeftModel
    x = model_inputs(arch)
    fields = {"variant": variant, "group_size": 8}
    torch.manual_seed(7)
    theirs = peft.get_peft_model(build(), peft.RoadConfig(task_type=task, init_weights=False, **fields))
    ours = get_peft_model(build(), _config(task_type=task, **fields))
    set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    with torch.no_grad():
        reference = theirs(**x).logits
        assert (ours(**x).logits - reference).abs().max().item() <= 1e-5

        theirs.save_pretrained(tmp_path / "peft")
        ours.save_pretrained(tmp_path / "ours")
        a = load_file(tmp_path / "peft" / "adapter_model.safetensors")
        b = load_file(tmp_path / "ours" / "adapter_model.safetensors")
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
        assert all(torch.equal(a[k], b[k]) for k in a)

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # peft's config must load without "unknown field" warnings
            from_peft = PeftModel.from_pretrained(build(), tmp_path / "peft")
        assert (from_peft(**x).logits - reference).abs().max().item() <= 1e-5
        from_ours = peft.PeftModel.from_pretrained(build(), tmp_path / "ours")
        assert (from_ours(**x).logits - reference).abs().max().item() <= 1e-5

        merged_theirs = theirs.merge_and_unload()
        merged_ours = ours.merge_and_unload()
        theirs_w, ours_w = clone_state(merged_theirs), clone_state(merged_ours)
        assert theirs_w.keys() == ours_w.keys()
        assert max((theirs_w[k] - ours_w[k]).abs().max().item() for k in theirs_w) <= 1e-6
