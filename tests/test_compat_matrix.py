"""Checkpoint compatibility with Hugging Face PEFT 0.21 (the oracle), both ways, over a matrix (issue 6).

Models: tiny llama (causal LM), tiny gpt2 (Conv1D layers), tiny t5 (seq2seq), tiny bert sequence
classification (with ``modules_to_save``: the head plus ``pooler.dense``). Methods: LoRA with the default
targets; LoRA with ``rank_pattern`` + ``alpha_pattern`` + rsLoRA (targets as a list, a regex, layer
filters); LoRA on the token embeddings; prompt tuning; prefix tuning with the projection MLP. Besides the
matrix: LoRA's ``bias`` options, two adapters in one folder, PEFT's ``.bin`` files, the config fields, and
files that do not fit the model.

Each case runs in two directions, each its own test id:

- ``peft_to_ours``: PEFT builds the adapter, every trainable tensor is moved off its initial value, PEFT
  saves it under a non-default adapter name (so in a sub-folder), and ``PeftModel.from_pretrained`` of
  peft-core loads it under another name: logits equal PEFT's within 1e-5, and no warning;
- ``ours_to_peft``: the mirror image; PEFT must load our folder without a warning, hold exactly the tensors
  of our file (PEFT skips unexpected keys silently, so this is checked), and give our logits within 1e-5.

Every case also checks that the adapter matters (its logits differ from the base model's), so an equality
cannot come from two adapters that both do nothing. ``run_case`` is the case builder;
``scripts/compat_matrix_report.py`` runs it and prints each case's max abs difference as a table.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import peft
import pytest
import torch
from conftest import max_diff, model_inputs, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_t5
from peft_core import (
    CheckpointError,
    ConfigError,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
)
from safetensors.torch import load_file

TOLERANCE = 1e-5
#: The adapter name used when saving, and the (other) one used when loading: keys must not depend on it.
SAVE_NAME, LOAD_NAME = "task_a", "task_b"
N_PROMPT, N_PREFIX = 4, 3

# name -> (factory, task type, inputs flavour for conftest.model_inputs)
MODELS = {
    "llama": (tiny_llama, "CAUSAL_LM", "llama"),
    "gpt2": (tiny_gpt2, "CAUSAL_LM", "gpt2"),
    "t5": (tiny_t5, "SEQ_2_SEQ_LM", "t5"),
    "bert_cls": (tiny_bert_cls, "SEQ_CLS", "bert"),
}
#: Extra modules trained and saved with the adapter (the task adds the classifier head itself).
MODULES_TO_SAVE = {"bert_cls": ["classifier", "pooler.dense"]}

LORA = {"r": 4, "lora_alpha": 8, "init_lora_weights": False}
LORA_PATTERNS = {
    "llama": {"target_modules": ["q_proj", "v_proj", "down_proj"], "layers_to_transform": [1],
              "layers_pattern": "layers", "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 3}},
    "gpt2": {"target_modules": r".*\.(c_attn|c_fc)", "fan_in_fan_out": True, "rank_pattern": {"c_fc": 2},
             "alpha_pattern": {r"h\.1\.attn\.c_attn": 5}},
    "t5": {"target_modules": r".*(SelfAttention|EncDecAttention)\.(q|v)", "rank_pattern": {r"EncDecAttention\.q": 6},
           "alpha_pattern": {r"decoder\.block\.0\..*\.v": 2}},
    "bert_cls": {"target_modules": ["query", "key", "value"], "rank_pattern": {"key": 2},
                 "alpha_pattern": {"value": 16}},
}
LORA_EMBEDDING = {"llama": ["embed_tokens", "q_proj"], "gpt2": ["wte", "c_attn"], "t5": ["embed_tokens", "q"],
                  "bert_cls": ["word_embeddings", "query"]}

METHODS = ["lora", "lora_patterns", "lora_embedding", "prompt", "prefix_projection"]
CASES = [(m, k) for m in MODELS for k in METHODS]
DIRECTIONS = ["peft_to_ours", "ours_to_peft"]

#: (model, method, direction) -> max abs difference of the logits; filled as the cases run.
RESULTS: dict[tuple[str, str, str], float] = {}


def configs(model: str, method: str) -> tuple[PeftConfig, peft.PeftConfig]:
    """(ours, PEFT's) config of a case: the same fields, given to both libraries."""
    _, task, _ = MODELS[model]
    kw: dict = {"task_type": task}
    if model in MODULES_TO_SAVE:
        kw["modules_to_save"] = list(MODULES_TO_SAVE[model])
    if method.startswith("lora"):
        kw.update(LORA)
        if method.startswith("lora_bias_"):
            kw["bias"] = method[len("lora_bias_"):]
        elif method == "lora_all_linear":
            kw["target_modules"] = "all-linear"
        elif method == "lora_patterns":
            kw.update(LORA_PATTERNS[model], use_rslora=True)
        elif method == "lora_embedding":
            kw["target_modules"] = LORA_EMBEDDING[model]
        return LoraConfig(**kw), peft.LoraConfig(**kw)
    if method == "prompt":
        kw["num_virtual_tokens"] = N_PROMPT
        return PromptTuningConfig(**kw), peft.PromptTuningConfig(**kw)
    assert method == "prefix_projection"
    kw.update(num_virtual_tokens=N_PREFIX, prefix_projection=True, encoder_hidden_size=24)
    return PrefixTuningConfig(**kw), peft.PrefixTuningConfig(**kw)


def perturb(model: torch.nn.Module, seed: int = 3) -> int:
    """Move every trainable tensor (adapter weights, modules_to_save copies, the prefix MLP) off its start."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
                n += 1
    assert n, "nothing trainable to perturb"
    return n


def logits(model: torch.nn.Module, model_name: str, method: str, x: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits. PEFT 0.21's own forward of prefix tuning on a classifier raises with transformers 5
    (it looks for ``past_key_values``, now ``cache``): there the base model runs with the cache PEFT's
    ``get_prompt`` builds, which is what PEFT's forward would do."""
    with torch.no_grad():
        if isinstance(model, peft.PeftModel) and method.startswith("prefix") and model_name.endswith("_cls"):
            batch = x["input_ids"].shape[0]
            mask = torch.cat([torch.ones(batch, N_PREFIX, dtype=torch.long), x["attention_mask"]], dim=1)
            return model.base_model(input_ids=x["input_ids"], attention_mask=mask,
                                    cache=model.get_prompt(batch)).logits
        return model(**x).logits


_NOISE = ("will not detect padding tokens", "is deprecated and will be removed", "is_gradient_checkpointing",
          # PEFT's advice for LoRA on an embedding tied to the output layer (gpt2's wte), whoever wrote the file
          "a tied layer is part of the adapter")


def relevant(caught: list[warnings.WarningMessage]) -> list[str]:
    """Warnings raised while loading, but transformers' deprecation notices and advice unrelated to the file."""
    return [str(w.message) for w in caught if not any(s in str(w.message) for s in _NOISE)]


def run_case(model: str, method: str, direction: str, folder: Path, safe: bool = True) -> float:
    """Save the case's adapter with one library, load it with the other; the max abs logit difference."""
    factory, _, flavour = MODELS[model]
    ours_config, peft_config = configs(model, method)
    x = model_inputs(flavour)
    with torch.no_grad():
        base = logits(factory(), model, method, x)
    if direction == "peft_to_ours":
        saved = peft.get_peft_model(factory(), peft_config, adapter_name=SAVE_NAME)
    else:
        saved = get_peft_model(factory(), ours_config, adapter_name=SAVE_NAME)
    perturb(saved)
    expected = logits(saved, model, method, x)
    saved.save_pretrained(folder, safe_serialization=safe)
    sub = folder / SAVE_NAME  # a non-default adapter goes to a sub-folder, in both libraries
    assert (sub / "adapter_config.json").is_file()
    assert (sub / ("adapter_model.safetensors" if safe else "adapter_model.bin")).is_file()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if direction == "peft_to_ours":
            loaded = PeftModel.from_pretrained(factory(), folder, subfolder=SAVE_NAME, adapter_name=LOAD_NAME)
        else:
            loaded = peft.PeftModel.from_pretrained(factory(), folder, subfolder=SAVE_NAME, adapter_name=LOAD_NAME)
    assert relevant(caught) == [], relevant(caught)
    if direction == "ours_to_peft":  # PEFT skips unexpected keys silently: it must hold exactly our file
        ours_file = load_file(sub / "adapter_model.safetensors")
        # (save_embedding_layers: PEFT's own files add the whole base embedding when one is a LoRA target)
        in_peft = peft.get_peft_model_state_dict(loaded, adapter_name=LOAD_NAME, save_embedding_layers=False)
        assert set(ours_file) <= set(in_peft)
        # (and with bias="all", PEFT's state dict repeats a saved head's bias under the wrapper's own paths)
        assert all(".original_module." in k or ".modules_to_save." in k for k in set(in_peft) - set(ours_file))
        assert all(torch.equal(in_peft[k], ours_file[k]) for k in ours_file)
    got = logits(loaded, model, method, x)
    # prompt tuning returns logits for the virtual tokens too: compare the input positions with the base model
    assert max_diff(expected[:, expected.shape[1] - base.shape[1]:], base) > 1e-3, \
        "the adapter does not change the output: the case proves nothing"
    diff = max_diff(got, expected)
    RESULTS[(model, method, direction + ("" if safe else " (.bin)"))] = diff
    return diff


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("model,method", CASES, ids=[f"{m}-{k}" for m, k in CASES])
def test_matrix(model, method, direction, tmp_path):
    assert run_case(model, method, direction, tmp_path) <= TOLERANCE


BIN_CASES = [("llama", "lora_patterns"), ("bert_cls", "lora"), ("t5", "prompt"), ("gpt2", "prefix_projection")]


@pytest.mark.parametrize("model,method", BIN_CASES, ids=[f"{m}-{k}" for m, k in BIN_CASES])
def test_peft_bin_files_load(model, method, tmp_path):
    """``save_pretrained(safe_serialization=False)`` of PEFT writes adapter_model.bin; ours reads it."""
    assert run_case(model, method, "peft_to_ours", tmp_path, safe=False) <= TOLERANCE
    assert not (tmp_path / SAVE_NAME / "adapter_model.safetensors").exists()


#: More LoRA files: target_modules="all-linear" (on bert_cls it would also match pooler.dense, which is in
#: modules_to_save and so never a target, as in PEFT); bias="all" / "lora_only" (base-model biases saved with
#: the adapter) with a classifier head (PEFT's file then also holds the head's bias under the wrapper's paths)
#: and on Conv1D.
LORA_VARIANTS = ([(m, "lora_all_linear") for m in MODELS]
                 + [(m, f"lora_bias_{b}") for m in ("bert_cls", "gpt2") for b in ("all", "lora_only")])


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("model,method", LORA_VARIANTS, ids=[f"{m}-{k}" for m, k in LORA_VARIANTS])
def test_lora_variants(model, method, direction, tmp_path):
    assert run_case(model, method, direction, tmp_path) <= TOLERANCE


# ---------------------------------------------------------------- several adapters in one folder
def _pair_configs(model: str) -> list[tuple[str, PeftConfig, peft.PeftConfig]]:
    return [("default", *configs(model, "lora")), ("second", *configs(model, "lora_patterns"))]


@pytest.mark.parametrize("model", ["llama", "bert_cls"])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_two_adapters_in_one_folder(model, direction, tmp_path):
    """"default" in the folder, "second" in its sub-folder; each loads and gives the saving model's logits."""
    factory, _, flavour = MODELS[model]
    x = model_inputs(flavour)
    saved = None
    for name, ours_config, peft_config in _pair_configs(model):
        if saved is None:
            saved = (peft.get_peft_model(factory(), peft_config) if direction == "peft_to_ours"
                     else get_peft_model(factory(), ours_config))
        else:
            saved.add_adapter(name, peft_config if direction == "peft_to_ours" else ours_config)
            saved.set_adapter(name)
        perturb(saved, seed=len(name))  # the active adapter's tensors, heads included
    expected = {}
    for name in ("default", "second"):
        saved.set_adapter(name)
        expected[name] = logits(saved, model, "lora", x)
    saved.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "second" / "adapter_model.safetensors").is_file()
    loader = PeftModel if direction == "peft_to_ours" else peft.PeftModel
    loaded = loader.from_pretrained(factory(), tmp_path)
    loaded.load_adapter(tmp_path, adapter_name="second", subfolder="second")
    assert max_diff(expected["default"], expected["second"]) > 1e-3
    for name in ("default", "second"):
        loaded.set_adapter(name)
        diff = max_diff(logits(loaded, model, "lora", x), expected[name])
        RESULTS[(model, f"two LoRA adapters, {name!r}", direction)] = diff
        assert diff <= TOLERANCE, name


# ---------------------------------------------------------------- adapter_config.json
#: Non-default values for the fields PEFT 0.21 writes, per method (given to PEFT's config classes).
PEFT_FIELDS = {
    "lora_list": (peft.LoraConfig, dict(
        task_type="CAUSAL_LM", base_model_name_or_path="org/tiny-llama", revision="v1.0", r=6, lora_alpha=12,
        target_modules=["q_proj", "v_proj"], exclude_modules=["k_proj"], rank_pattern={"v_proj": 2},
        alpha_pattern={r"layers\.0\..*q_proj": 4}, modules_to_save=["lm_head"], layers_to_transform=[0, 1],
        layers_pattern="layers", use_rslora=True, fan_in_fan_out=True, init_lora_weights="gaussian",
        lora_dropout=0.1, bias="lora_only", inference_mode=True)),
    "lora_regex": (peft.LoraConfig, dict(task_type="SEQ_CLS", target_modules=r".*\.(query|value)",
                                         init_lora_weights=False, bias="all")),
    "prompt": (peft.PromptTuningConfig, dict(
        task_type="SEQ_2_SEQ_LM", base_model_name_or_path="org/tiny-t5", num_virtual_tokens=5, token_dim=32,
        num_transformer_submodules=2, num_attention_heads=4, num_layers=2, prompt_tuning_init="TEXT",
        prompt_tuning_init_text="classify this", tokenizer_name_or_path="org/tok",
        tokenizer_kwargs={"use_fast": True}, modules_to_save=["lm_head"])),
    "prefix": (peft.PrefixTuningConfig, dict(
        task_type="CAUSAL_LM", num_virtual_tokens=3, token_dim=16, num_attention_heads=2, num_layers=2,
        num_transformer_submodules=1, encoder_hidden_size=24, prefix_projection=True)),
}


def _json(path: Path) -> dict:
    return json.loads((path / "adapter_config.json").read_text())


def _peft_config_dict(config: peft.PeftConfig) -> dict:
    """PEFT's config as the JSON it writes (sets become lists)."""
    return json.loads(json.dumps({k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}))


@pytest.mark.parametrize("case", list(PEFT_FIELDS))
def test_every_field_peft_writes_is_read_and_written_back(case, tmp_path):
    cls, kw = PEFT_FIELDS[case]
    cls(**kw).save_pretrained(tmp_path / "peft")
    written = _json(tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unknown field" warning for anything PEFT 0.21 writes
        ours = PeftConfig.from_pretrained(tmp_path / "peft")
    assert type(ours).peft_type == written["peft_type"]
    mine = json.loads(ours.to_json_string())
    for key, value in mine.items():  # every field we know has PEFT's value, peft_version included
        assert value == written[key], key
    inert = type(ours).peft_inert_fields
    for key in set(written) - set(mine):  # the rest are the features we lack, at their "off" values
        assert key in inert, key
    # and back: PEFT reads our file, without a warning, to the config it wrote
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = peft.PeftConfig.from_pretrained(tmp_path / "ours")
    assert _peft_config_dict(again) == _peft_config_dict(cls.from_pretrained(tmp_path / "peft"))


@pytest.mark.parametrize("case", list(PEFT_FIELDS))
def test_peft_config_keywords_build_our_config(case, tmp_path):
    """Code written for PEFT passes PEFT's keywords, ``use_dora=False`` and the like included."""
    cls, kw = PEFT_FIELDS[case]
    cls(**kw).save_pretrained(tmp_path)
    written = _json(tmp_path)
    ours = PeftConfig.from_pretrained(tmp_path)
    assert type(ours)(**{k: v for k, v in written.items() if k != "peft_type"}) == ours


# (kasa_config, velora_config, use_bdlora and init_lora_weights="mica" are LoRA fields now, implemented by the
# lora_variants extension: see tests/test_lora_variants.py)
@pytest.mark.parametrize("field,value", [("use_qalora", True), ("monteclora_config", {"num_samples": 2}),
                                         ("corda_config", {"cache_file": "x"})])
def test_peft_features_we_lack_are_a_config_error_in_the_constructor_too(field, value):
    with pytest.raises(ConfigError, match=f"{field}=.*does not implement"):
        LoraConfig(target_modules=["q_proj"], **{field: value})


def test_a_fresh_config_writes_a_peft_version_that_peft_loads_silently(tmp_path):
    """We write ``"peft_version": "0.21.0+peftcore.<ours>"``: the PEFT format release, our version as the PEP 440
    local label. PEFT 0.21 loads it without a warning and keeps it."""
    LoraConfig(target_modules=["q_proj"]).save_pretrained(tmp_path)
    written = _json(tmp_path)["peft_version"]
    assert written.startswith("0.21.0+peftcore.")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert peft.PeftConfig.from_pretrained(tmp_path).peft_version == written


def test_unknown_fields_from_newer_versions_give_one_warning_naming_them(tmp_path):
    factory, _, flavour = MODELS["llama"]
    ref = peft.get_peft_model(factory(), configs("llama", "lora")[1])
    perturb(ref)
    x = model_inputs(flavour)
    expected = logits(ref, "llama", "lora", x)
    ref.save_pretrained(tmp_path)
    data = _json(tmp_path)
    data.update(future_option=1, another_new_field={"mode": "fast"})
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(factory(), tmp_path)
    ours = [str(w.message) for w in caught if "future_option" in str(w.message)]
    assert len(ours) == 1 and "another_new_field" in ours[0], relevant(caught)
    assert relevant(caught) == ours
    assert max_diff(logits(loaded, "llama", "lora", x), expected) <= TOLERANCE


@pytest.mark.parametrize("field,value", [
    ("use_qalora", True), ("lora_ga_config", {"batch_size": 2}), ("monteclora_config", {"num_samples": 2}),
    ("ensure_weight_tying", True), ("loftq_config", {"loftq_bits": 4}), ("init_lora_weights", "eva"),
    ("init_lora_weights", "loftq"),
])
def test_peft_features_we_lack_are_a_clear_config_error(field, value, tmp_path):
    ref = peft.get_peft_model(tiny_llama(), configs("llama", "lora")[1])
    ref.save_pretrained(tmp_path)
    data = _json(tmp_path)
    data[field] = value
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ConfigError, match=field) as info:
        PeftModel.from_pretrained(base, tmp_path)
    assert "not" in str(info.value) and "support" in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert [type(m).__name__ for m in base.modules()].count("LoraLinear") == 0


def test_default_targets_are_written_out_for_peft(tmp_path):
    """``target_modules=None``: the file names the targets, as PEFT's does. PEFT has no default targets for
    DistilBERT (and other defaults than ours for some architectures), so a null would not load there."""
    from transformers import AutoModel, DistilBertConfig

    def factory():
        torch.manual_seed(0)
        return AutoModel.from_config(DistilBertConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, vocab_size=128,
                                                      max_position_embeddings=64)).eval()

    ours = get_peft_model(factory(), LoraConfig(task_type="FEATURE_EXTRACTION", init_lora_weights=False))
    perturb(ours)
    x = model_inputs("bert")
    with torch.no_grad():
        expected = ours(**x).last_hidden_state
    ours.save_pretrained(tmp_path)
    assert sorted(_json(tmp_path)["target_modules"]) == ["q_lin", "v_lin"]
    loaded = peft.PeftModel.from_pretrained(factory(), tmp_path)
    with torch.no_grad():
        assert max_diff(loaded(**x).last_hidden_state, expected) <= TOLERANCE


# ---------------------------------------------------------------- files that do not fit the model
def test_tensors_that_fit_nothing_or_mismatch_are_named_and_counted(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    def llama(layers: int = 2, hidden: int = 32):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(LlamaConfig(
            hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, pad_token_id=0)).eval()

    config = configs("llama", "lora")[1]
    peft.get_peft_model(llama(), config.__class__(**{**config.to_dict(), "target_modules": "all-linear"}),
                        adapter_name=SAVE_NAME).save_pretrained(tmp_path)
    # the 7 modules x (A, B) of layer 1 are not in a 1-layer model; 6 of the 28 tensors (those only as wide as
    # the MLP or r) fit a wider model
    for model, what, count in [(llama(layers=1), "match nothing", 14), (llama(hidden=48), "shape mismatch", 22)]:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(CheckpointError) as info:
            PeftModel.from_pretrained(model, tmp_path, subfolder=SAVE_NAME, adapter_name=LOAD_NAME)
        message = str(info.value)
        assert what in message and f"{count} " in message and f"(and {count - 5} more)" in message, message
        assert "layers.1." in message or what == "shape mismatch"
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_peft_adapter_in_a_hub_repo_loads_by_id_from_the_cache(tmp_path, monkeypatch):
    """A Hub id goes through huggingface_hub (its cache; offline here): a PEFT adapter in a repo's sub-folder."""
    factory, _, flavour = MODELS["llama"]
    ref = peft.get_peft_model(factory(), configs("llama", "lora_patterns")[1], adapter_name=SAVE_NAME)
    perturb(ref)
    x = model_inputs(flavour)
    expected = logits(ref, "llama", "lora", x)
    ref.save_pretrained(tmp_path / "src")
    repo = tmp_path / "cache" / "models--someone--tiny-adapters"
    commit = "c" * 40
    for sub in ("refs", "snapshots"):
        (repo / sub).mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (tmp_path / "src").rename(repo / "snapshots" / commit)  # the layout huggingface_hub's cache uses
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = PeftModel.from_pretrained(factory(), "someone/tiny-adapters", subfolder=SAVE_NAME, adapter_name=LOAD_NAME,
                                       cache_dir=str(tmp_path / "cache"))
    assert max_diff(logits(loaded, "llama", "lora", x), expected) <= TOLERANCE
    with pytest.raises(CheckpointError, match="offline"):
        PeftModel.from_pretrained(factory(), "someone/not-cached", cache_dir=str(tmp_path / "cache"))
