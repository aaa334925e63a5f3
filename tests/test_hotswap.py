"""Hot-swapping adapters in place (hotswap_adapter, prepare_model_for_compiled_hotswap): outputs equal a fresh load
of the new adapter, a compiled model compiles nothing new, and incompatible adapters are refused untouched."""

from __future__ import annotations

import peft
import peft_core
import pytest
import torch
import torch._dynamo as dynamo
from conftest import clone_state, state_equal, tiny_llama
from peft_core import AdapterError, CheckpointError, ConfigError
from torch._dynamo.testing import CompileCounter

X = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


def _save(path, seed: int, targets=("q_proj", "v_proj"), **config) -> torch.Tensor:
    """Save a LoRA adapter with random (non-identity) weights; return its logits on X."""
    torch.manual_seed(seed)
    model = peft_core.get_peft_model(tiny_llama(), peft_core.LoraConfig(target_modules=list(targets), **config))
    for n, p in model.named_parameters():
        if "lora_" in n:
            torch.nn.init.normal_(p, std=0.3)
    model.save_pretrained(path)
    with torch.no_grad():
        return model.eval()(input_ids=X).logits


def _loaded(path):
    return peft_core.PeftModel.from_pretrained(tiny_llama(), path).eval()


def test_prepared_compiled_model_swaps_other_ranks_and_alphas_without_recompiling(tmp_path) -> None:
    want = {"a": _save(tmp_path / "a", 1, r=4, lora_alpha=8), "b": _save(tmp_path / "b", 2, r=2, lora_alpha=16),
            "c": _save(tmp_path / "c", 3, r=8, lora_alpha=4, use_rslora=False)}
    model = _loaded(tmp_path / "a")
    peft_core.prepare_model_for_compiled_hotswap(model, target_rank=8)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=X).logits, want["a"], rtol=0, atol=1e-6)
        for name in ("b", "c", "a"):
            peft_core.hotswap_adapter(compiled, tmp_path / name, "default")  # the compiled wrapper is accepted
            torch.testing.assert_close(compiled(input_ids=X).logits, want[name], rtol=0, atol=1e-6)
    assert counter.frame_count == 1
    assert model.peft_config["default"].r == 4  # the adapter's own rank: the padding is a serving detail


def test_same_rank_swap_needs_no_preparation_and_the_swapped_model_saves_the_new_adapter(tmp_path) -> None:
    _save(tmp_path / "a", 1, r=4)
    want = _save(tmp_path / "b", 2, r=4)
    model = _loaded(tmp_path / "a")
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        compiled(input_ids=X)
        params = {n: p for n, p in model.named_parameters() if "lora_" in n}
        peft_core.hotswap_adapter(model, tmp_path / "b", "default")
        torch.testing.assert_close(compiled(input_ids=X).logits, want, rtol=0, atol=1e-6)
    assert counter.frame_count == 1
    assert all(p is params[n] for n, p in model.named_parameters() if "lora_" in n)  # the same objects
    model.save_pretrained(tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(_loaded(tmp_path / "saved")(input_ids=X).logits, want, rtol=0, atol=1e-6)


def test_padded_adapter_saves_its_true_rank_which_peft_loads(tmp_path) -> None:
    _save(tmp_path / "a", 1, r=4)
    want = _save(tmp_path / "b", 2, r=2, lora_alpha=3)
    model = _loaded(tmp_path / "a")
    peft_core.prepare_model_for_compiled_hotswap(model, target_rank=16)
    peft_core.hotswap_adapter(model, tmp_path / "b", "default")
    model.save_pretrained(tmp_path / "saved")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=X).logits, want, rtol=0, atol=1e-5)
    assert theirs.peft_config["default"].r == 2


def test_a_module_the_new_adapter_leaves_alone_is_switched_off(tmp_path) -> None:
    _save(tmp_path / "a", 1)
    want = _save(tmp_path / "q", 2, targets=("q_proj",))
    model = _loaded(tmp_path / "a")
    peft_core.hotswap_adapter(model, tmp_path / "q", "default")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=X).logits, want, rtol=0, atol=1e-6)


def test_modules_to_save_copies_are_swapped_too_without_recompiling(tmp_path) -> None:
    """A classifier's trained head (modules_to_save) belongs to the adapter: it is swapped with the LoRA weights."""
    from conftest import tiny_llama_cls

    x = X[:, :6]
    for i, name in enumerate("ab"):
        source = peft_core.get_peft_model(tiny_llama_cls(), peft_core.LoraConfig(task_type="SEQ_CLS",
                                                                                 target_modules=["q_proj"]))
        torch.manual_seed(20 + i)
        for p in source.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.3)
        source.save_pretrained(tmp_path / name)
    model = peft_core.PeftModel.from_pretrained(tiny_llama_cls(), tmp_path / "a").eval()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    fresh = peft_core.PeftModel.from_pretrained(tiny_llama_cls(), tmp_path / "b").eval()
    with torch.no_grad():
        before = compiled(input_ids=x).logits
        peft_core.hotswap_adapter(model, tmp_path / "b", "default")
        got = compiled(input_ids=x).logits
        torch.testing.assert_close(got, fresh(input_ids=x).logits, rtol=0, atol=1e-6)
    assert not torch.allclose(got, before)
    assert counter.frame_count == 1


def test_swapping_in_a_peft_saved_adapter_equals_peft_hotswap(tmp_path) -> None:
    from peft.utils.hotswap import hotswap_adapter as peft_hotswap

    _save(tmp_path / "a", 1)
    torch.manual_seed(5)
    src = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=8))
    for n, p in src.named_parameters():
        if "lora_" in n:
            torch.nn.init.normal_(p, std=0.3)
    src.save_pretrained(tmp_path / "theirs")
    ours = _loaded(tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a").eval()
    peft_core.hotswap_adapter(ours, tmp_path / "theirs", "default")
    peft_hotswap(theirs, str(tmp_path / "theirs"), "default", torch_device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=X).logits, theirs(input_ids=X).logits, rtol=0, atol=1e-5)


def test_hub_ids_are_swapped_in_from_the_hub_cache(tmp_path, monkeypatch) -> None:
    _save(tmp_path / "a", 1)
    want = _save(tmp_path / "src", 2)
    repo = tmp_path / "cache" / "models--me--other-adapter"
    commit = "d" * 40
    for sub in ("refs", "snapshots"):
        (repo / sub).mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (tmp_path / "src").rename(repo / "snapshots" / commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = _loaded(tmp_path / "a")
    peft_core.hotswap_adapter(model, "me/other-adapter", "default", cache_dir=str(tmp_path / "cache"))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=X).logits, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", ["other_targets", "rank_above_prepared", "config_differs", "other_method",
                                  "unknown_adapter", "merged"])
def test_incompatible_swaps_are_refused_and_leave_the_model_untouched(tmp_path, case) -> None:
    _save(tmp_path / "a", 1, r=4)
    model = _loaded(tmp_path / "a")
    name = "default"
    if case == "other_targets":
        _save(tmp_path / "new", 2, targets=("q_proj", "k_proj"))
        error, match = CheckpointError, r"k_proj.*targets other modules"
    elif case == "rank_above_prepared":
        peft_core.prepare_model_for_compiled_hotswap(model, target_rank=4)
        _save(tmp_path / "new", 2, r=8)
        error, match = CheckpointError, r"rank 8 .* above the 4 .*target_rank"
    elif case == "config_differs":
        _save(tmp_path / "new", 2, use_rslora=True)
        error, match = ConfigError, r"differ in use_rslora"
    elif case == "other_method":
        ia3 = peft_core.IA3Config(target_modules=["q_proj"], feedforward_modules=[])
        peft_core.get_peft_model(tiny_llama(), ia3).save_pretrained(tmp_path / "new")
        error, match = ConfigError, r"LORA.*IA3.*methods must be the same"
    elif case == "unknown_adapter":
        _save(tmp_path / "new", 2)
        name, error, match = "nope", AdapterError, r"no adapter named 'nope'"
    else:
        _save(tmp_path / "new", 2)
        model.merge_adapter()
        error, match = AdapterError, r"merged.*unmerge_adapter"
    before = clone_state(model)
    config = model.peft_config["default"]
    with pytest.raises(error, match=match):
        peft_core.hotswap_adapter(model, tmp_path / "new", name)
    assert state_equal(clone_state(model), before) and model.peft_config["default"] is config


def test_preparation_is_refused_after_compiling_and_without_a_swappable_adapter(tmp_path) -> None:
    _save(tmp_path / "a", 1)
    model = _loaded(tmp_path / "a")
    with pytest.raises(AdapterError, match="before compiling"):
        peft_core.prepare_model_for_compiled_hotswap(torch.compile(model), target_rank=8)
    with pytest.warns(UserWarning, match="recompile"):
        peft_core.prepare_model_for_compiled_hotswap(torch.compile(model), target_rank=8, check_compiled="warn")
    with pytest.raises(ConfigError, match="target_rank=2 is below"):
        peft_core.prepare_model_for_compiled_hotswap(model, target_rank=2)
    ia3 = peft_core.get_peft_model(tiny_llama(), peft_core.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    with pytest.raises(ConfigError, match=r"no adapter to prepare.*IA3"):
        peft_core.prepare_model_for_compiled_hotswap(ia3, target_rank=8)
    with pytest.raises(ConfigError, match="IA3 adapters cannot be hot-swapped"):
        ia3.save_pretrained(tmp_path / "ia3")
        peft_core.hotswap_adapter(ia3, tmp_path / "ia3", "default")


def test_the_compile_page_snippets_run(monkeypatch) -> None:
    """docs/compile.md's code blocks, in order, in one namespace (as a reader would run them); compiled with
    Dynamo and AOTAutograd but not inductor's code generation, which takes most of the time and is not ours."""
    import functools
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "compile.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 3
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/compile.md", "exec"), namespace)
    assert namespace["loss"].requires_grad


def test_a_hook_answer_of_the_wrong_type_is_a_contract_error(tmp_path) -> None:
    from peft_core import PluginContractError, get_registry, hookimpl

    class Wrong:  # an extension plugin answering before LoRA's own implementation
        @hookimpl(tryfirst=True)
        def prepare_hotswap(self, model, adapter_name, config, target_rank):
            return "a config"

        @hookimpl(tryfirst=True)
        def hotswap(self, model, adapter_name, config, new_config, state_dict):
            return {"r": 8}

    _save(tmp_path / "a", 1)
    _save(tmp_path / "b", 2)
    model = _loaded(tmp_path / "a")
    with get_registry().plugin(Wrong(), name="wrong"):
        with pytest.raises(PluginContractError, match=r"prepare_hotswap of LORA returned str.*LoraConfig or None"):
            peft_core.prepare_model_for_compiled_hotswap(model, target_rank=8)
        with pytest.raises(PluginContractError, match=r"hotswap of LORA returned dict.*LoraConfig or None"):
            peft_core.hotswap_adapter(model, tmp_path / "b", "default")
