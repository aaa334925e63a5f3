"""LoRA on parameters (``LoraConfig.target_parameters``) against Hugging Face PEFT 0.21 as the oracle: a tiny
Qwen3-MoE (its experts are 3-D parameters) and a tiny llama (2-D weights), with the same adapter weights."""

from __future__ import annotations

import copy
import json
import threading
import warnings

import peft
import pytest
import torch
from conftest import clone_state, copy_adapter_weights, module_tree, state_equal, tiny_llama
from peft_core import AdapterError, ConfigError, LoraConfig, PeftModel, TargetError, get_peft_model
from safetensors.torch import load_file
from torch import nn

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
TOL = 1e-5


def tiny_moe(seed: int = 0) -> nn.Module:
    """Qwen3-MoE: transformers 5 keeps each layer's experts as (experts, out, in) parameters (Mixtral too)."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(Qwen3MoeConfig(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2, vocab_size=128,
        max_position_embeddings=128)).eval()


def tiny_mixtral(seed: int = 0) -> nn.Module:
    from transformers import AutoModelForCausalLM, MixtralConfig

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(MixtralConfig(
        hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, vocab_size=128, max_position_embeddings=128)).eval()


def tiny_gpt_oss(seed: int = 0) -> nn.Module:
    """GPT-OSS: experts declared ``is_transposed`` ((experts, in, out)), with 2-D per-expert biases."""
    from transformers import AutoModelForCausalLM, GptOssConfig

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' note on the RoPE factor of a config this small
        return AutoModelForCausalLM.from_config(GptOssConfig(
            hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, num_local_experts=4, num_experts_per_tok=2, vocab_size=128, max_position_embeddings=128,
            layer_types=["full_attention"] * 2)).eval()


FACTORY = {"moe": tiny_moe, "llama": tiny_llama, "mixtral": tiny_mixtral, "gpt_oss": tiny_gpt_oss}


def ids(batch: int = 2, seq: int = 7) -> torch.Tensor:
    return torch.randint(2, 128, (batch, seq), generator=torch.Generator().manual_seed(1))


def pair(model: str = "moe", **kw):
    """The same tiny model wrapped by PEFT and by peft-core, with the same (non-zero) adapter weights."""
    kw.setdefault("init_lora_weights", False)
    kw.setdefault("r", 2)
    kw.setdefault("lora_alpha", 4)
    theirs = peft.get_peft_model(FACTORY[model](), peft.LoraConfig(task_type="CAUSAL_LM", **kw))
    ours = get_peft_model(FACTORY[model](), LoraConfig(task_type="CAUSAL_LM", **kw))
    assert copy_adapter_weights(theirs, ours) > 0
    return ours.eval(), theirs.eval()


def logits(model: nn.Module, x: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids() if x is None else x).logits


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gradients keyed by the path inside the user's model (PEFT nests it one level deeper than peft-core)."""
    prefix = "base_model.model." if isinstance(model, peft.PeftModel) else "base_model."
    return {n[len(prefix):]: p.grad for n, p in model.named_parameters() if p.grad is not None}


def same_config_json(ours: dict, theirs: dict) -> None:
    """Every field peft-core writes has PEFT's value (peft_version aside); PEFT's other fields are the features
    peft-core lacks, at their "off" values. On MoE models PEFT 0.21 turns the target lists into sets (its
    transformers-v4 conversion), which it writes in no fixed order: those compare as sets."""
    for key, value in ours.items():
        if key in ("target_modules", "target_parameters") and isinstance(value, list):
            assert sorted(value) == sorted(theirs[key]), key
        elif key != "peft_version":
            assert value == theirs[key], key
    assert set(theirs) - set(ours) <= set(LoraConfig.peft_inert_fields)


def counts(model: nn.Module) -> tuple[int, int]:
    return model.get_nb_trainable_parameters()


# ---------------------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("model,kw", [
    ("moe", {"target_modules": [], "target_parameters": EXPERTS}),
    ("moe", {"target_modules": ["q_proj", "o_proj"], "target_parameters": ["mlp.experts.down_proj"],
             "rank_pattern": {"down_proj": 3}, "use_rslora": True}),
    ("llama", {"target_modules": [], "target_parameters": ["q_proj.weight", "mlp.down_proj.weight"]}),
    ("llama", {"target_modules": ["k_proj"], "target_parameters": ["v_proj.weight"], "bias": "lora_only"}),
], ids=["moe-experts", "moe-with-modules", "llama-2d", "llama-with-modules"])
def test_logits_gradients_and_counts_match_peft(model, kw):
    ours, theirs = pair(model, **kw)
    assert counts(ours) == counts(theirs)
    x = ids()
    out_o, out_t = ours(input_ids=x, labels=x), theirs(input_ids=x, labels=x)
    assert diff(out_o.logits, out_t.logits) <= TOL
    assert diff(out_o.logits, logits(FACTORY[model](), x)) > 1e-3  # the adapters do change the output
    out_o.loss.backward()
    out_t.loss.backward()
    go, gt = grads(ours), grads(theirs)
    assert go.keys() == gt.keys() and go
    assert all(".lora_A." in k or ".lora_B." in k for k in go)  # only LoRA tensors learn
    for k in go:
        assert diff(go[k], gt[k]) <= TOL, k
    trainable = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    assert trainable == sorted("base_model." + k for k in go)


@pytest.mark.parametrize("model", ["mixtral", "gpt_oss"])
def test_other_moe_layouts_match_peft(model):
    """Mixtral (target_modules=None: PEFT 0.21 adapts no module beside the parameters there) and GPT-OSS, whose
    experts are stored transposed."""
    ours, theirs = pair(model, target_parameters=EXPERTS)
    assert ours.peft_config["default"].target_modules is None
    assert {type(m).__name__ for m in ours.modules()} >= {"LoraParameter"}
    assert "LoraLinear" not in {type(m).__name__ for m in ours.modules()}
    assert counts(ours) == counts(theirs)
    x = ids()
    assert diff(logits(ours, x), logits(theirs, x)) <= TOL
    unmerged = logits(ours, x)
    ours.merge_adapter()
    assert diff(logits(ours, x), unmerged) <= TOL


def test_layout_and_names_are_peft_s():
    ours, theirs = pair("moe", target_parameters=EXPERTS)
    mlp = ours.base_model.model.layers[0].mlp
    assert type(mlp.experts).__name__ == "LoraParameter" and mlp.experts.parameter_name == "down_proj"
    assert mlp.experts.base_layer.parameter_name == "gate_up_proj"  # the module's first parameter innermost
    mine = {n[len("base_model."):]: tuple(p.shape) for n, p in ours.named_parameters() if "lora_" in n}
    peft_s = {n[len("base_model.model."):]: tuple(p.shape) for n, p in theirs.named_parameters() if "lora_" in n}
    assert mine == peft_s
    # rank 2 per expert, 4 experts: A (8, in), B (out, 8)
    assert mine["model.layers.0.mlp.experts.base_layer.lora_A.default.weight"] == (8, 32)
    assert mine["model.layers.0.mlp.experts.lora_B.default.weight"] == (32, 8)


def test_print_trainable_parameters_is_peft_s(capsys):
    ours, theirs = pair("moe", target_modules=["v_proj"], target_parameters=EXPERTS)
    ours.print_trainable_parameters()
    theirs.print_trainable_parameters()
    mine, peft_s = capsys.readouterr().out.splitlines()
    assert mine == peft_s


# ---------------------------------------------------------------------------------------------------- files
def test_peft_file_loads_here_and_ours_loads_in_peft(tmp_path):
    ours, theirs = pair("moe", target_modules=["q_proj"], target_parameters=EXPERTS)
    expected = logits(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    # the same files: tensor keys, shapes and config fields
    t_sd = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    o_sd = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert o_sd.keys() == t_sd.keys()
    assert "base_model.model.model.layers.1.mlp.experts.base_layer.lora_A.weight" in o_sd
    assert all(torch.equal(o_sd[k], t_sd[k]) for k in o_sd)
    t_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    o_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    same_config_json(o_cfg, t_cfg)
    assert o_cfg["target_parameters"] == EXPERTS  # in the user's order
    # both ways
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no unknown-field warning for anything PEFT writes
        here = PeftModel.from_pretrained(tiny_moe(), tmp_path / "peft")
    assert diff(logits(here), expected) <= TOL
    there = peft.PeftModel.from_pretrained(tiny_moe(), tmp_path / "ours")
    assert diff(logits(there.eval()), expected) <= TOL


def test_default_target_modules_are_added_and_written_as_peft_does(tmp_path):
    """``target_modules=None`` keeps meaning the architecture's defaults (llama: q_proj, v_proj) beside the
    parameters, as in PEFT, and the file names them."""
    ours, theirs = pair("llama", target_parameters=["o_proj.weight"])
    assert diff(logits(ours), logits(theirs)) <= TOL
    assert counts(ours) == counts(theirs)
    assert set(ours.peft_config["default"].target_modules) == {"q_proj", "v_proj"}
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    same_config_json(json.loads((tmp_path / "ours" / "adapter_config.json").read_text()),
                            {**json.loads((tmp_path / "peft" / "adapter_config.json").read_text()),
                             "target_modules": sorted(theirs.peft_config["default"].target_modules)})


# ---------------------------------------------------------------------------------------------------- merging
def test_merge_equals_unmerged_and_unmerge_restores_the_base_exactly():
    ours, theirs = pair("moe", target_modules=["q_proj"], target_parameters=EXPERTS)
    base = clone_state(ours.get_base_model())
    unmerged = logits(ours)
    ours.merge_adapter(safe_merge=True)
    assert ours.merged_adapters == ["default"] and diff(logits(ours), unmerged) <= TOL
    ours.unmerge_adapter()
    assert state_equal(clone_state(ours.get_base_model()), base)
    assert diff(logits(ours), unmerged) == 0
    with ours.disable_adapter():
        assert diff(logits(ours), logits(tiny_moe())) == 0
    merged = ours.merge_and_unload()
    assert "LoraParameter" not in {t for _, t in module_tree(merged)}
    assert module_tree(merged) == module_tree(tiny_moe())
    assert diff(logits(merged), logits(theirs.merge_and_unload())) <= TOL


def test_merge_round_trip_is_bit_exact_in_bfloat16():
    model = get_peft_model(tiny_moe().to(torch.bfloat16),
                           LoraConfig(target_parameters=EXPERTS, r=2, init_lora_weights=False))
    before = clone_state(model.get_base_model())
    for _ in range(3):
        model.merge_adapter()
        model.unmerge_adapter()
    assert state_equal(clone_state(model.get_base_model()), before)


# ---------------------------------------------------------------------------------------------------- adapters
def test_two_adapters_switch_combine_and_delete_like_peft():
    ours, theirs = pair("moe", target_parameters=EXPERTS)
    other = {"target_parameters": EXPERTS, "r": 3, "lora_alpha": 5, "init_lora_weights": False}
    theirs.add_adapter("other", peft.LoraConfig(**other))
    ours.add_adapter("other", LoraConfig(**other))
    copy_adapter_weights(theirs, ours, "other")
    for active in ("other", "default", ["default", "other"]):
        theirs.base_model.set_adapter(active)
        ours.set_adapter(active)
        assert diff(logits(ours), logits(theirs)) <= TOL, active
    assert counts(ours) == counts(theirs)
    ours.delete_adapter("default")
    theirs.delete_adapter("default")
    ours.set_adapter("other")
    theirs.set_adapter("other")
    assert diff(logits(ours), logits(theirs)) <= TOL
    ours.delete_adapter("other")
    assert module_tree(ours.get_base_model()) == module_tree(tiny_moe())


def test_adapters_must_target_the_same_parameters_as_in_peft():
    ours, _ = pair("moe", target_parameters=EXPERTS)
    tree, state = module_tree(ours), clone_state(ours)
    with pytest.raises(TargetError, match="same ones"):
        ours.add_adapter("other", LoraConfig(target_parameters=["experts.down_proj"]))
    assert module_tree(ours) == tree and state_equal(clone_state(ours), state) and list(ours.peft_config) == ["default"]
    ours.add_adapter("attn", LoraConfig(target_modules=["q_proj"]))  # module-only adapters are free
    with pytest.raises(AdapterError, match="target_parameters"):
        ours.add_weighted_adapter(["default", "attn"], [1.0, 1.0], "mix")  # PEFT refuses it too


def test_mixed_batch_is_refused_with_the_fix_as_peft_refuses_it():
    ours, theirs = pair("moe", target_modules=["q_proj"], target_parameters=EXPERTS)
    ours.add_adapter("other", LoraConfig(target_parameters=EXPERTS))
    with pytest.raises(ValueError):
        theirs(input_ids=ids(), adapter_names=["default", "__base__"])
    with pytest.raises(AdapterError, match=r"experts.*set_adapter"):
        ours(input_ids=ids(), adapter_names=["default", "other"])
    # rows without adapters need nothing the layer cannot do
    with torch.no_grad():
        out = ours(input_ids=ids(), adapter_names=["__base__", "__base__"]).logits
    assert diff(out, logits(tiny_moe())) == 0


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kw,error,words", [
    ({"target_parameters": ["experts.gate_proj"]}, TargetError, ["experts.gate_proj", "mlp.experts.gate_up_proj"]),
    ({"target_parameters": ["input_layernorm.weight"]}, TargetError, ["shape (32,)", "2-D"]),
    ({"target_parameters": [*EXPERTS, "lm_head.weight"], "modules_to_save": ["lm_head"]}, TargetError,
     ["modules_to_save"]),
    ({"target_modules": ["q_proj"], "target_parameters": ["q_proj.weight"]}, TargetError,
     ["'model.layers.0.self_attn.q_proj'", "target_modules=[]"]),
    ({"target_parameters": EXPERTS, "lora_dropout": 0.1}, ConfigError, ["lora_dropout=0"]),
    ({"target_parameters": "experts.down_proj"}, ConfigError, ["list of parameter names"]),
], ids=["no-match", "1-d", "modules-to-save", "module-and-parameter", "dropout", "string"])
def test_bad_targets_name_the_culprit_and_leave_the_model_untouched(kw, error, words):
    model = tiny_moe()
    tree, state = module_tree(model), clone_state(model)
    with pytest.raises(error) as info:
        get_peft_model(model, LoraConfig(target_modules=kw.pop("target_modules", []), **kw))
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    assert module_tree(model) == tree and state_equal(clone_state(model), state)


# ---------------------------------------------------------------------------------------------------- threads, copies
def test_concurrent_forwards_and_copies():
    """The parameter is swapped for its adapted value while the module runs; overlapping calls from threads must
    neither see each other's swap nor leave the module holding a plain tensor instead of its Parameter."""
    ours, _ = pair("moe", target_parameters=EXPERTS)
    x = ids(4, 16)
    expected = logits(ours, x)
    worst: list[float] = []

    def run() -> None:
        for _ in range(10):
            worst.append(diff(logits(ours, x), expected))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(worst) == 40 and max(worst) == 0
    holder = ours.base_model.model.layers[0].mlp.experts.base_layer.base_layer
    assert all(type(holder._parameters[n]) is nn.Parameter for n in ("gate_up_proj", "down_proj"))
    twin = copy.deepcopy(ours)
    assert diff(logits(twin, x), expected) == 0
