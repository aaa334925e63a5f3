"""PEFT 0.21's newer LoRA variants (MiCA, KaSA, BD-LoRA, VeLoRA), implemented by the ``lora_variants`` extension
through LoRA's ``lora_variant`` hook, against Hugging Face PEFT 0.21 (the oracle): the same starting tensors under
the same seed, outputs and gradients with the same weights, counts, files both ways, merging, several adapters and
mixed batches; and LoRA's refusal of a variant field that no installed plugin claims."""

from __future__ import annotations

import json
import re

import peft
import pytest
import torch
from conftest import MODELS, model_inputs
from peft_core import ConfigError, LoraConfig, PeftModel, TargetError, get_peft_model, get_registry, hookimpl
from peft_lora_variants import kasa_loss
from safetensors.torch import load_file, save_file
from toy_plugin import ToyGateVariant

TOL = 1e-5
LLAMA = ["q_proj", "v_proj", "o_proj", "down_proj"]
GPT2 = ["c_attn", "c_proj"]
BD = {"target_modules_bd_a": ["o_proj", "down_proj"], "target_modules_bd_b": ["q_proj", "v_proj"], "nblocks": 2}
VARIANTS = {  # name -> (config fields, targets on llama, targets on gpt2 or None where PEFT has no such variant)
    "mica": ({"init_lora_weights": "mica"}, [*LLAMA, "embed_tokens"], GPT2),
    "kasa": ({"kasa_config": {"beta": 1e-3}}, LLAMA, None),  # PEFT refuses Conv1D (fan_in_fan_out)
    "bdlora": ({"use_bdlora": {**BD, "match_strict": False}}, [*LLAMA, "up_proj"], GPT2),  # up_proj: plain LoRA
    "velora": ({"velora_config": {"num_groups": 4}}, LLAMA, GPT2),
}
CASES = [(v, m) for v, (_, _, g) in VARIANTS.items() for m in ("llama", "gpt2") if m == "llama" or g is not None]
_SAVED = re.compile(r"\.(lora_diag|lora_velora_embed)\.([^.]+)\.weight$")


def _peft_name(ours: str) -> str:
    """Our in-memory name as PEFT's: KaSA's and VeLoRA's tensors carry a ``.weight`` here (PEFT: a Parameter or
    BufferDict entry)."""
    return _SAVED.sub(r".\1.\2", ours)


def _kw(variant: str, model: str, **extra) -> dict:
    fields, llama, gpt2 = VARIANTS[variant]
    return {"task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": llama if model == "llama" else gpt2,
            "fan_in_fan_out": model == "gpt2", **fields, **extra}


def _pair(variant: str, model: str, perturb: bool = True, dtype: torch.dtype = torch.float32, **extra):
    """(ours, PEFT's) from the same seed; with ``perturb``, PEFT's adapter tensors moved off their start and copied
    into ours through PEFT's file format (so outputs differ from the base model's)."""
    kw = _kw(variant, model, **extra)
    torch.manual_seed(3)
    theirs = peft.get_peft_model(MODELS[model]().to(dtype), peft.LoraConfig(**kw))
    torch.manual_seed(3)
    ours = get_peft_model(MODELS[model]().to(dtype), LoraConfig(**kw))
    if perturb:
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for n, p in theirs.named_parameters():
                if "lora_" in n:
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
        sd = peft.get_peft_model_state_dict(theirs)
        ours.load_adapter_state_dict("default", {k: v.clone() for k, v in sd.items()})
    return ours, theirs.eval()  # PEFT's get_peft_model leaves the model in training mode (dropout on)


def _states(ours, theirs) -> tuple[dict, dict]:
    so = {_peft_name(k[len("base_model."):]): v for k, v in ours.state_dict().items()}
    st = {k[len("base_model.model."):]: v for k, v in theirs.state_dict().items()}
    return so, st


def _same_config_json(ours, theirs) -> None:
    """Every field we write, PEFT writes with the same value (PEFT also writes the fields of features peft-core
    lacks, at their off values)."""
    a, b = (json.loads((folder / "adapter_config.json").read_text()) for folder in (ours, theirs))
    a["target_modules"], b["target_modules"] = sorted(a["target_modules"]), sorted(b["target_modules"])  # PEFT: a set
    assert set(a) <= set(b)
    assert [k for k in a if k != "peft_version" and a[k] != b[k]] == []
    assert {k: b[k] for k in ("init_lora_weights", "kasa_config", "use_bdlora", "velora_config")} == {
        k: a[k] for k in ("init_lora_weights", "kasa_config", "use_bdlora", "velora_config")}


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


# ---------------------------------------------------------------- the same adapter as PEFT's
@pytest.mark.parametrize(("variant", "model"), CASES)
def test_a_new_adapter_is_peft_s_bit_for_bit_and_counts_the_same(variant, model, capsys):
    """Same seed, same layer order: the same A, B, variant tensors and (KaSA's truncated) base weights; the same
    trainable parameters (MiCA's B frozen), and print_trainable_parameters prints PEFT's line."""
    ours, theirs = _pair(variant, model, perturb=False)
    so, st = _states(ours, theirs)
    assert so.keys() == st.keys()
    assert [k for k in so if not torch.equal(so[k], st[k])] == []
    trained_o = sorted(_peft_name(n[len("base_model."):]) for n, p in ours.named_parameters() if p.requires_grad)
    trained_t = sorted(n[len("base_model.model."):] for n, p in theirs.named_parameters() if p.requires_grad)
    assert trained_o == trained_t
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ours.print_trainable_parameters()
    theirs.print_trainable_parameters()
    line_o, line_t = capsys.readouterr().out.strip().splitlines()
    assert line_o == line_t
    if variant == "mica":
        assert not any("lora_B" in n or "lora_embedding_B" in n for n in trained_o)


@pytest.mark.parametrize(("variant", "model"), CASES)
def test_logits_and_a_training_step_with_dropout_match_peft(variant, model):
    """Eval logits within 1e-5; then a training step with dropout under the same seed (the variants draw PEFT's masks):
    the same loss and gradients (VeLoRA's approximate A gradient included), and MiCA's B gets none."""
    ours, theirs = _pair(variant, model, lora_dropout=0.1)
    x = model_inputs(model)
    assert _diff(ours(**x).logits, theirs(**x).logits) <= TOL
    grads = []
    for m, prefix in ((ours, "base_model."), (theirs, "base_model.model.")):
        m.train()
        torch.manual_seed(11)
        m(**x, labels=x["input_ids"]).loss.backward()
        grads.append({_peft_name(n[len(prefix):]): p.grad for n, p in m.named_parameters() if p.grad is not None})
    go, gt = grads
    assert go.keys() == gt.keys() and go
    assert [k for k in go if _diff(go[k], gt[k]) > TOL] == []
    so, st = _states(ours, theirs)  # VeLoRA's batch-averaged projections were updated alike
    assert [k for k in so if "velora" in k and _diff(so[k], st[k]) > TOL] == []


def test_velora_trains_a_with_the_compressed_input():
    """The saved sub-token coordinates only approximate A's input: A's gradient differs from plain LoRA's, B's and
    the input's do not (they are exact)."""
    ours, _ = _pair("velora", "llama")
    plain, _ = _pair("velora", "llama")
    plain.base_model.model.layers[0].self_attn.q_proj.variants.clear()  # the same adapter as plain LoRA there
    x = model_inputs("llama")
    for m in (ours, plain):
        m.train()
        m(**x, labels=x["input_ids"]).loss.backward()
    layer_o = ours.base_model.model.layers[0].self_attn.q_proj
    layer_p = plain.base_model.model.layers[0].self_attn.q_proj
    assert _diff(layer_o.lora_A["default"].weight.grad, layer_p.lora_A["default"].weight.grad) > 1e-4
    assert _diff(layer_o.lora_B["default"].weight.grad, layer_p.lora_B["default"].weight.grad) <= TOL


# ---------------------------------------------------------------- files
@pytest.mark.parametrize(("variant", "model"), CASES)
def test_files_are_peft_s_and_load_both_ways(variant, model, tmp_path):
    ours, theirs = _pair(variant, model)
    x = model_inputs(model)
    expected = theirs(**x).logits
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs", save_embedding_layers=False)  # PEFT would add MiCA's base embedding
    a = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    b = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(_diff(a[k], b[k]) <= TOL for k in a)
    _same_config_json(tmp_path / "ours", tmp_path / "theirs")
    in_peft = peft.PeftModel.from_pretrained(MODELS[model](), tmp_path / "ours")
    in_ours = PeftModel.from_pretrained(MODELS[model](), tmp_path / "theirs")
    assert _diff(in_peft(**x).logits, expected) <= TOL
    assert _diff(in_ours(**x).logits, expected) <= TOL
    in_ours = PeftModel.from_pretrained(MODELS[model](), tmp_path / "theirs", is_trainable=True,
                                        low_cpu_mem_usage=True)
    assert _diff(in_ours(**x).logits, expected) <= TOL
    assert in_ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


# ---------------------------------------------------------------- merging
@pytest.mark.parametrize(("variant", "model"), CASES)
def test_merge_matches_peft_and_unmerge_restores_the_bits(variant, model):
    ours, theirs = _pair(variant, model)
    x = model_inputs(model)
    base = {k: v.clone() for k, v in ours.get_base_model().state_dict().items() if "lora_" not in k}
    unmerged = ours(**x).logits
    ours.merge_adapter()
    merged = ours(**x).logits
    assert _diff(merged, unmerged) <= 10 * TOL
    theirs.merge_adapter()
    assert _diff(theirs(**x).logits, merged) <= 10 * TOL
    ours.unmerge_adapter()
    after = ours.get_base_model().state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())
    assert torch.equal(ours(**x).logits, unmerged)
    assert _diff(ours.merge_and_unload()(**x).logits, theirs.merge_and_unload()(**x).logits) <= 10 * TOL


# ---------------------------------------------------------------- several adapters, mixed batches
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mixed_batches_match_peft_s(variant):
    """A variant adapter beside a second adapter (plain LoRA; for KaSA another KaSA adapter, since PEFT refuses to mix
    them), one row each plus a base row: each row as PEFT computes it, and as the adapter alone does."""
    ours, theirs = _pair(variant, "llama")
    second = {"kasa_config": {}} if variant == "kasa" else {}
    kw = {"r": 2, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False, **second}
    torch.manual_seed(4)
    theirs.add_adapter("other", peft.LoraConfig(**kw))
    torch.manual_seed(4)
    ours.add_adapter("other", LoraConfig(**kw))
    sd = peft.get_peft_model_state_dict(theirs, adapter_name="other")
    ours.load_adapter_state_dict("other", {k: v.clone() for k, v in sd.items()})
    x = model_inputs("llama", batch=3)
    names = ["default", "other", "__base__"]
    mixed = ours(**x, adapter_names=names).logits
    assert _diff(mixed, theirs(**x, adapter_names=names).logits) <= TOL
    for i, name in enumerate(names[:2]):
        ours.set_adapter(name)
        assert _diff(mixed[i], ours(**x).logits[i]) <= TOL, name


# ---------------------------------------------------------------- config fields and their claims
def test_variant_fields_are_written_as_peft_writes_them(tmp_path):
    from peft.tuners.lora.config import BdLoraConfig, KasaConfig, VeloraConfig

    ours = LoraConfig(kasa_config={}, velora_config={"scale": 2.0},
                      use_bdlora={"target_modules_bd_a": ["o_proj"], "nblocks": 4})
    theirs = peft.LoraConfig(kasa_config=KasaConfig(), velora_config=VeloraConfig(scale=2.0),
                             use_bdlora=BdLoraConfig(target_modules_bd_a=["o_proj"], nblocks=4))
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_written = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    for field in ("kasa_config", "velora_config", "use_bdlora"):
        assert written[field] == peft_written[field], field
    assert LoraConfig.from_json_file(tmp_path / "theirs" / "adapter_config.json") == ours
    assert LoraConfig(kasa_config=KasaConfig()) == LoraConfig(kasa_config={})  # PEFT's dataclass is accepted
    assert hash(ours) == hash(LoraConfig.from_dict(written))
    for bad, match in [({"kasa_config": {"alpha": 1}}, "kasa_config.*alpha.*does not support"),
                       ({"velora_config": {"num_groups": 0}}, r"velora_config\['num_groups'\]"),
                       ({"kasa_config": {"beta": float("inf")}}, r"kasa_config\['beta'\] must be a finite"),
                       ({"init_lora_weights": ["mica"]}, "init_lora_weights must be"),
                       ({"use_bdlora": True}, "use_bdlora must be a mapping"),
                       ({"use_bdlora": {"target_modules_bd_a": ["q"], "target_modules_bd_b": ["q"]}}, "both"),
                       ({"monteclora_config": {"num_samples": 2}}, "monteclora_config.*does not implement")]:
        with pytest.raises(ConfigError, match=match):
            LoraConfig(**bad)


@pytest.mark.parametrize(("field", "value"), [("init_lora_weights", "mica"), ("kasa_config", {}),
                                              ("use_bdlora", {"match_strict": False}), ("velora_config", {})])
def test_a_variant_field_no_plugin_claims_is_refused_before_the_model_changes(fresh_registry, field, value):
    """With the extension unregistered the config still reads (the fields are LoRA's), but inject refuses it, naming
    the field and the extension; the model is left as it was."""
    assert "lora_variants" in {r.name for r in fresh_registry.plugins()}  # found by its entry point
    fresh_registry.unregister("lora_variants")
    assert "lora_variants" not in {r.name for r in fresh_registry.plugins()}
    model = MODELS["llama"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=rf"{field}=.*no installed plugin implements.*lora_variants"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj"], **{field: value}))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "LoraLinear" not in {type(m).__name__ for m in model.modules()}


@pytest.mark.parametrize(("fields", "match"), [
    ({"kasa_config": {}, "use_dora": True}, "use_dora=True cannot be combined with kasa_config"),
    ({"init_lora_weights": "mica", "velora_config": {}}, "velora_config=.*cannot be combined with init_lora_weights"),
    ({"kasa_config": {}, "target_parameters": ["q_proj.weight"], "target_modules": []}, "target_parameters"),
])
def test_two_variants_at_once_are_refused(fields, match):
    model = MODELS["llama"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=match):
        get_peft_model(model, LoraConfig(**{"target_modules": ["q_proj"], **fields}))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("model", "fields", "targets", "match"), [
    ("gpt2", {"kasa_config": {}}, ["c_attn"], "Conv1D"),  # PEFT: a ValueError
    ("llama", {"velora_config": {}}, ["embed_tokens"], "has no VeLoRA"),
    ("llama", {"use_bdlora": BD}, ["q_proj", "up_proj"], "up_proj.*matches neither"),  # match_strict
    ("llama", {"use_bdlora": {**BD, "nblocks": 3}}, ["q_proj"], "divisible by nblocks=3"),
    ("gpt2", {"use_bdlora": {"target_modules_bd_a": ["c_attn"]}}, ["c_attn"], "Conv1D"),  # PEFT fails there
    ("llama", {"init_lora_weights": "mica", "r": 40}, ["q_proj"], "fewer than r=40"),
    ("llama", {"kasa_config": {}, "r": 32}, ["q_proj"], "below 32"),
])
def test_layers_a_variant_cannot_take_are_refused_naming_them(model, fields, targets, match):
    base = MODELS[model]()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(TargetError, match=match):
        get_peft_model(base, LoraConfig(**{"target_modules": targets, **fields}))
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


# ---------------------------------------------------------------- KaSA's rules
def test_kasa_and_plain_adapters_cannot_share_a_model_as_in_peft():
    ours, _ = _pair("kasa", "llama")
    with pytest.raises(ConfigError, match=r"'plain' does not use KaSA.*'default' does"):
        ours.add_adapter("plain", LoraConfig(target_modules=["q_proj"]))
    plain = get_peft_model(MODELS["llama"](), LoraConfig(target_modules=["q_proj"]))
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(ConfigError, match="'kasa' uses KaSA"):
        plain.add_adapter("kasa", LoraConfig(target_modules=["q_proj"], kasa_config={}))
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())  # nothing truncated


def test_kasa_loss_is_peft_s():
    ours, theirs = _pair("kasa", "llama")
    expected = theirs.base_model._get_kasa_loss()
    got = kasa_loss(ours).detach()
    assert float(expected) > 0 and abs(float(got) - float(expected)) <= 1e-5 * float(expected)
    assert kasa_loss(ours, adapter_names=[]) == 0.0


# ---------------------------------------------------------------- discovery
def test_the_extension_is_listed_as_an_extension_of_lora():
    rows = {r["plugin"]: r for r in get_registry().describe_extensions()}
    row = rows["lora_variants"]
    assert row["distribution"] == "peft-core" and "lora_variant" in row["hooks"]
    assert "MiCA" in row["summary"] and "lora_variants" not in {r["plugin"] for r in get_registry().describe()}


def test_a_refused_kasa_load_leaves_the_base_weights_as_they_were(tmp_path):
    """KaSA truncates the base weights as the adapter is added; a load that fails afterwards (a tensor missing from
    the file) gives the original weights back, bit for bit (the truncated weight is a new parameter, which the
    core's snapshot undoes)."""
    ours, _ = _pair("kasa", "llama")
    ours.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.endswith("q_proj.lora_diag")},
              tmp_path / "adapter_model.safetensors")
    base = MODELS["llama"]()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(Exception, match="missing"):
        PeftModel.from_pretrained(base, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_kasa_on_a_tied_weight_is_refused_and_undone():
    """GPT-2's lm_head shares the input embedding's weight: truncating it would change the embedding too."""
    base = MODELS["gpt2"]()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(TargetError, match="'lm_head' shares its weight"):
        get_peft_model(base, LoraConfig(target_modules=["lm_head"], kasa_config={}))
    assert base.lm_head.weight is base.transformer.wte.weight
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_lora_saves_any_variant_s_tensor_under_peft_s_convention(tmp_path):
    """A third party's variant whose module holds a ``weight`` has it saved as ``<path>.<attr>`` and loaded back,
    as DoRA's magnitude and KaSA's ``lora_diag`` are (LoRA's save knows no variant by name)."""
    class GatePlugin:
        @hookimpl
        def lora_variant(self, config):
            return ToyGateVariant() if config.lora_alpha == 3 else None

    with get_registry().plugin(GatePlugin(), name="toy_gate"):
        kw = {"target_modules": ["q_proj"], "lora_alpha": 3, "init_lora_weights": False}
        model = get_peft_model(MODELS["llama"](), LoraConfig(**kw))
        with torch.no_grad():
            model.base_model.model.layers[0].self_attn.q_proj.toy_gate["default"].weight.fill_(5.0)
        x = model_inputs("llama")
        expected = model(**x).logits
        model.save_pretrained(tmp_path)
        assert "base_model.model.model.layers.0.self_attn.q_proj.toy_gate" in load_file(
            tmp_path / "adapter_model.safetensors")
        loaded = PeftModel.from_pretrained(MODELS["llama"](), tmp_path)
        assert _diff(loaded(**x).logits, expected) <= TOL


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_half_precision_models_match_peft(variant):
    """A bf16 base model: the adapter in fp32 beside it (autocast_adapter_dtype), MiCA's frozen B included in the
    computation as PEFT does it: PEFT's logits, and a training step that trains fp32 tensors."""
    ours, theirs = _pair(variant, "llama", dtype=torch.bfloat16)
    x = model_inputs("llama")
    a, b = ours(**x).logits, theirs(**x).logits
    assert a.dtype == b.dtype == torch.bfloat16
    # the same roundings as PEFT (the sum in fp32, rounded once); MiCA's B is kept in bf16 here (adapter_state is not
    # upcast) and PEFT's in fp32, so the perturbed B of this test differs by its bf16 rounding
    assert _diff(a, b) <= (0.02 * float(b.float().abs().max()) if variant == "mica" else 0.0)
    ours.train()
    ours(**x, labels=x["input_ids"]).loss.backward()  # runs, and trains only what PEFT trains
    trained = {n for n, p in ours.named_parameters() if p.grad is not None}
    assert trained and all(p.dtype == torch.float32 for n, p in ours.named_parameters() if n in trained)
