"""A third party's *extension* of LoRA, built and found the way users get it: ``examples/peft-lora-conv1d``.

The example declares no method; it implements LoRA's ``lora_make_layer`` hook to teach LoRA
``torch.nn.Conv1d``. It is pip-installed (a real build of its pyproject) into a temporary folder for the
command-line and discovery checks, which run in subprocesses with that folder on ``PYTHONPATH``; the
in-process tests import it from its source folder and register it with ``Registry.plugin``, so nothing
leaks into other tests' registries.

Hugging Face ``peft`` (which adapts ``nn.Conv1d`` itself) is the oracle: same keys and shapes, same
outputs, adapter files loadable both ways.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import itertools
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from peft_core import AdapterError, LoraConfig, PeftModel, get_peft_model, get_registry
from safetensors.torch import load_file
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "peft-lora-conv1d"
SCRUBBED = ("PEFT_CORE_PLUGINS", "PEFT_CORE_STRICT")  # a developer's shell must not change the outcome
SUMMARY = "LoRA on torch.nn.Conv1d layers (groups=1), with Hugging Face PEFT's parameter names and shapes."


# ---------------------------------------------------------------- a tiny model with a Conv1d
class ConvNet(nn.Module):
    """(batch, 4, length) -> (batch, 3): a Conv1d, a ReLU, mean over time, a Linear head."""

    def __init__(self, kernel_size: int = 3, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 6, kernel_size, padding=kernel_size // 2, groups=groups)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(-1))


def convnet(kernel_size: int = 3, seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet(kernel_size).eval()


def _inputs(batch: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, 9, generator=torch.Generator().manual_seed(seed))


def _config(**kwargs: object) -> LoraConfig:
    return LoraConfig(**{"target_modules": ["conv"], "r": 2, "lora_alpha": 4, "init_lora_weights": False, **kwargs})


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(torch.int32)  # fp32 tensors compared bit for bit (torch.equal calls -0.0 == 0.0)


def _base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's own tensors, under their original names (LoRA layers nest them as base_layer)."""
    return {k.replace(".base_layer.", "."): v.detach().clone() for k, v in model.state_dict().items()
            if ".lora_" not in k}


def _same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(_bits(a[k]), _bits(b[k])) for k in a)


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------- the extension: installed, and in-process
def _pip_install(source: Path, target: Path) -> None:
    # Build from a copy: an in-tree build would leave build/ and *.egg-info in the repository.
    work = target.parent / f"{source.name}-src"
    shutil.copytree(source, work, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--no-compile", "--target", str(target), str(work)],
                   check=True, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder where ``pip install --target`` put the example extension."""
    target = tmp_path_factory.mktemp("lora_conv1d") / "site"
    _pip_install(EXAMPLE, target)
    assert (target / "peft_lora_conv1d-0.1.0.dist-info" / "entry_points.txt").read_text().split() == [
        "[peft_core.methods]", "lora_conv1d", "=", "peft_lora_conv1d:plugin"]
    assert (target / "peft_lora_conv1d" / "py.typed").exists()
    return target


def _not_installed_here() -> None:
    # Installed into this environment, the registry would load it by itself: "before the extension is installed"
    # could not be tested, and registering it in-process would clash with the installed copy.
    try:
        importlib.metadata.distribution("peft-lora-conv1d")
    except importlib.metadata.PackageNotFoundError:
        return
    pytest.skip("peft-lora-conv1d is installed in this environment; uninstall it to run the in-process tests")


@pytest.fixture(scope="module")
def ext_module() -> Iterator[ModuleType]:
    """The example's package, imported from its source folder (no install: in-process registration)."""
    _not_installed_here()
    src = str(EXAMPLE / "src")
    sys.path.insert(0, src)
    importlib.invalidate_caches()
    try:
        yield importlib.import_module("peft_lora_conv1d")
    finally:
        sys.path.remove(src)
        for name in [m for m in sys.modules if m == "peft_lora_conv1d" or m.startswith("peft_lora_conv1d.")]:
            del sys.modules[name]
        importlib.invalidate_caches()


@pytest.fixture
def extension(ext_module: ModuleType) -> Iterator[ModuleType]:
    """The extension registered in the process-wide registry for one test, unregistered after."""
    with get_registry().plugin(ext_module.plugin, name="lora_conv1d"):
        yield ext_module


def _env(path: list[Path]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, path), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def _cli(*args: str, path: list[Path]) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("peft-core")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "peft_core.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=_env(path), timeout=120)


# ---------------------------------------------------------------- found by entry point
def test_cli_lists_the_installed_extension(site: Path) -> None:
    result = _cli("list-methods", "--json", path=[site])
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["broken"] == []
    assert "lora_conv1d" not in {row["plugin"] for row in data["methods"]}  # it declares no method
    row = {row["plugin"]: row for row in data["extensions"]}["lora_conv1d"]
    assert (row["distribution"], row["version"]) == ("peft-lora-conv1d", "0.1.0")
    assert "lora_make_layer" in row["hooks"]
    assert row["summary"] == SUMMARY  # the plugin class's docstring

    table = _cli("list-methods", path=[site])
    assert table.returncode == 0, table.stderr
    head, sep, extensions = table.stdout.partition("\nextensions")
    assert sep, table.stdout
    assert "lora_conv1d" not in head  # not in the methods table
    line = next(line for line in extensions.splitlines() if line.startswith("lora_conv1d"))
    assert line.split()[1:3] == ["peft-lora-conv1d", "0.1.0"] and "lora_make_layer" in line.split()[3].split(",")
    # the summary wraps under its column so the table fits 100 columns
    assert all(len(row) <= 100 for row in table.stdout.splitlines())
    rows = extensions.splitlines()
    block = [line]
    for row in rows[rows.index(line) + 1:]:  # the continuation lines, up to the next plugin's row
        if not row.startswith(" "):
            break
        block.append(row)
    assert " ".join(row.strip() for row in block).endswith(SUMMARY)


DISCOVERY = textwrap.dedent("""
    import torch
    from torch import nn
    from peft_core import LoraConfig, get_peft_model

    model = nn.Sequential(nn.Conv1d(4, 6, 3, padding=1))
    peft_model = get_peft_model(model, LoraConfig(target_modules=["0"], r=2))
    layer = peft_model.get_base_model()[0]
    print(type(layer).__module__, type(layer).__name__, tuple(layer.lora_A["default"].weight.shape))
""")


def test_installed_extension_is_used_without_registering_it(site: Path) -> None:
    """Nothing in-process: installing the distribution is all it takes for LoRA to adapt nn.Conv1d."""
    result = subprocess.run([sys.executable, "-c", DISCOVERY], capture_output=True, text=True, env=_env([site]),
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["peft_lora_conv1d", "LoraConv1d", "(2,", "4,", "3)"]


def test_without_the_extension_lora_s_own_conv1d_layer_answers() -> None:
    """LoRA now has its own nn.Conv1d layer (the extension, when installed, is asked first and wins)."""
    _not_installed_here()
    assert "lora_conv1d" not in {r.name for r in get_registry().plugins()}
    model = convnet()
    peft_model = get_peft_model(model, _config())
    layer = peft_model.get_base_model().conv
    assert type(layer).__module__ == "peft_lora.layers" and type(layer).__name__ == "LoraConv1d"


def test_grouped_conv1d_falls_through_the_extension_to_lora_s_own_layer(extension: ModuleType) -> None:
    """The extension declines groups != 1 (returns None); LoRA's built-in layer, asked last, takes it."""
    torch.manual_seed(0)
    model = ConvNet(3, groups=2)
    layer = get_peft_model(model, _config()).get_base_model().conv
    assert type(layer).__module__ == "peft_lora.layers"
    assert layer.lora_B["default"].groups == 2


# ---------------------------------------------------------------- using it, with Hugging Face PEFT as the oracle
@pytest.mark.parametrize("kernel_size", [1, 3])
def test_train_save_load_both_ways(extension: ModuleType, tmp_path: Path, kernel_size: int) -> None:
    import peft

    base = convnet(kernel_size)
    original = _base_weights(base)
    model = get_peft_model(base, _config())
    layer = model.get_base_model().conv
    assert isinstance(layer, extension.LoraConv1d)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert [n.rsplit("conv.", 1)[1] for n in trainable] == ["lora_A.default.weight", "lora_B.default.weight"]

    x, target = _inputs(8), torch.randn(8, 3, generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    losses = []
    for _ in range(6):
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        with_grad = sorted(n for n, p in model.named_parameters() if p.grad is not None)
        assert with_grad == trainable  # only LoRA's A and B
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert _same_bits(_base_weights(model.get_base_model()), original)  # the base never moved

    model.save_pretrained(tmp_path / "ours")
    ours_files = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in ours_files.items()} == {
        "base_model.model.conv.lora_A.weight": (2, 4, kernel_size), "base_model.model.conv.lora_B.weight": (6, 2, 1)}
    # PEFT's own file for the same config and model: the same keys and shapes
    theirs = peft.get_peft_model(convnet(kernel_size), peft.LoraConfig(target_modules=["conv"], r=2, lora_alpha=4,
                                                                       init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "peft")
    peft_files = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in peft_files.items()} == {k: v.shape for k, v in ours_files.items()}

    x = _inputs(5, seed=3)
    with torch.no_grad():
        expected = model(x)
        loaded = PeftModel.from_pretrained(convnet(kernel_size), tmp_path / "ours")
        assert _diff(loaded(x), expected) <= 1e-6
        assert not any(p.requires_grad for p in loaded.parameters())
        in_peft = peft.PeftModel.from_pretrained(convnet(kernel_size), tmp_path / "ours")
        assert _diff(in_peft(x), expected) <= 1e-5

        reference = theirs(x)  # and PEFT's adapter (random A and B) in peft-core
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # PEFT's config must load without "unknown field" warnings
            from_peft = PeftModel.from_pretrained(convnet(kernel_size), tmp_path / "peft")
        assert _diff(from_peft(x), reference) <= 1e-5
        assert _diff(from_peft(x), convnet(kernel_size)(x)) > 1e-3  # the adapter does something


def test_merge_unmerge_is_exact_and_merge_and_unload_matches(extension: ModuleType) -> None:
    base = convnet(3)
    original = _base_weights(base)
    model = get_peft_model(base, _config())
    model.add_adapter("other", _config(r=3, lora_alpha=6))
    x = _inputs()
    with torch.no_grad():
        expected = model(x)
        model.merge_adapter()
        assert model.merged_adapters == ["default"]
        assert not _same_bits(_base_weights(base), original)
        assert _diff(model(x), expected) <= 1e-5
        model.unmerge_adapter()
        assert _same_bits(_base_weights(base), original)  # exact, not approximately
        assert torch.equal(model(x), expected)

        model.set_adapter(["default", "other"])
        both = model(x)
        model.merge_adapter()
        assert _diff(model(x), both) <= 1e-5
        model.unmerge_adapter()
        assert _same_bits(_base_weights(base), original)

        model.set_adapter("default")
        merged = model.merge_and_unload()
        assert type(merged.conv) is nn.Conv1d
        assert _diff(merged(x), expected) <= 1e-5


@pytest.mark.parametrize("conv_kwargs", [{"padding": 1, "dilation": 2}, {"padding": 1, "padding_mode": "circular"},
                                         {"padding": "same", "dilation": 2}, {"stride": 2}])
def test_merge_matches_forward_for_any_conv_geometry(extension: ModuleType, conv_kwargs: dict[str, object]) -> None:
    """A copies the base conv's dilation and padding mode (PEFT does not, and fails on a dilated conv), so the
    unmerged update is the conv that merging folds into the base weight."""
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Conv1d(4, 6, 3, **conv_kwargs)), _config(target_modules=["0"]))
    x = _inputs()
    with torch.no_grad():
        expected = model(x)
        with model.disable_adapter():
            assert _diff(model(x), expected) > 1e-3
        model.merge_adapter()
        assert _diff(model(x), expected) <= 1e-5


def test_mixed_batch_rows_use_their_own_adapter(extension: ModuleType) -> None:
    model = get_peft_model(convnet(3), _config())
    model.add_adapter("other", _config(r=3, lora_alpha=6))
    x = _inputs(4)
    names = ["default", "other", "__base__", "other"]
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
        alone = {}
        for name in ("default", "other"):
            model.set_adapter(name)
            alone[name] = model(x)
        with model.disable_adapter():
            alone["__base__"] = model(x)
    for row, name in enumerate(names):
        assert _diff(mixed[row], alone[name][row]) <= 1e-6, (row, name)
    assert _diff(alone["default"], alone["other"]) > 1e-3  # the rows really differ
    with pytest.raises(AdapterError, match="2 entries but the batch has 4 rows"):
        model(x, adapter_names=["default", "other"])


def test_unbatched_input(extension: ModuleType) -> None:
    model = get_peft_model(convnet(3), _config())
    layer = model.get_base_model().conv
    x = _inputs(1)
    with torch.no_grad():
        assert _diff(layer(x[0]), layer(x)[0]) <= 1e-6  # (channels, length), as nn.Conv1d takes it
        assert _diff(model(x[0]), model(x)[0]) <= 1e-6
        # a mixed batch of one unbatched sample: its 4 channels must not be taken for 4 rows
        with pytest.raises(AdapterError, match=r"batched \(batch, channels, length\) input for LoraConv1d"):
            model(x[0], adapter_names=["default"] * 4)


def test_dropout_in_training_only(extension: ModuleType) -> None:
    model = get_peft_model(convnet(3), _config(lora_dropout=0.5))
    x = _inputs()
    model.train()
    torch.manual_seed(0)
    first = model(x)
    second = model(x)
    assert _diff(first, second) > 0  # a fresh mask each call
    first.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_bf16_autocast_train_step(extension: ModuleType) -> None:
    model = get_peft_model(convnet(3), _config())
    model.train()
    x, target = _inputs(), torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        assert out.dtype == torch.bfloat16
        loss = torch.nn.functional.mse_loss(out.float(), target)
    loss.backward()
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(lora) == 2 and all(p.dtype == torch.float32 for p in lora.values())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in lora.values())
