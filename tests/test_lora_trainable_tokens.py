"""LoRA's ``trainable_token_indices`` against Hugging Face PEFT 0.21 (the oracle), with the same weights.

Models: tiny llama with untied and with tied word embeddings, gpt2 (always tied) and t5 (``shared`` tied to
both ``embed_tokens`` and ``lm_head``). The trained rows are moved off their initial values (the base rows)
before every comparison, and the inputs use the trained tokens (and llama's padding token, whose row gets no
gradient), so an equality cannot come from rows that do nothing.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import peft
import pytest
import torch
from conftest import clone_state, model_inputs, module_tree, state_equal, tiny_gpt2, tiny_t5
from peft_core import AdapterError, ConfigError, LoraConfig, MergeError, PeftModel, TargetError, get_peft_model
from safetensors.torch import load_file
from torch import nn

TOKENS = [3, 5, 7, 0]  # 0 is llama's (and t5's) pad token
TOL = 1e-5


def _llama(tied: bool):
    def build() -> nn.Module:
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=128, pad_token_id=0, tie_word_embeddings=tied)).eval()
    return build


# name -> (factory, task type, LoRA targets, inputs flavour, path of the input embedding, tied modules)
MODELS = {
    "llama_untied": (_llama(False), "CAUSAL_LM", ["q_proj"], "llama", "model.embed_tokens", []),
    "llama_tied": (_llama(True), "CAUSAL_LM", ["q_proj"], "llama", "model.embed_tokens", ["lm_head"]),
    "gpt2": (tiny_gpt2, "CAUSAL_LM", ["c_attn"], "gpt2", "transformer.wte", ["lm_head"]),
    "t5": (tiny_t5, "SEQ_2_SEQ_LM", ["q"], "t5", "shared", ["encoder.embed_tokens", "decoder.embed_tokens",
                                                              "lm_head"]),
}


def _config(cls, name: str, **kw):
    _, task, targets, _, _, _ = MODELS[name]
    kw = {"task_type": task, "target_modules": targets, "r": 4, "lora_alpha": 8, "init_lora_weights": False,
          "trainable_token_indices": TOKENS, **kw}
    return cls(**kw)


def _perturb(model: nn.Module, seed: int = 3) -> None:
    """Move every trainable tensor off its start (the token rows start equal to the base rows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


def _pair(name: str, **kw):
    factory = MODELS[name][0]
    theirs = peft.get_peft_model(factory(), _config(peft.LoraConfig, name, **kw))
    _perturb(theirs)
    ours = get_peft_model(factory(), _config(LoraConfig, name, **kw))
    ours.load_adapter_state_dict("default", {k: v.clone() for k, v in peft.get_peft_model_state_dict(theirs).items()})
    return ours, theirs


def _inputs(name: str, batch: int = 2) -> dict[str, torch.Tensor]:
    x = model_inputs(MODELS[name][3], batch=batch)
    x["input_ids"][:, :4] = torch.tensor(TOKENS)  # the trained tokens, the pad token among them
    return x


def _labels(name: str, x: dict[str, torch.Tensor]) -> torch.Tensor:
    return x["decoder_input_ids"] if name == "t5" else x["input_ids"]


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    prefix = "base_model.model." if isinstance(model, peft.PeftModel) else "base_model."
    return {n[len(prefix):]: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _printed(model: nn.Module) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        model.print_trainable_parameters()
    return buf.getvalue()


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_gradients_and_counts_match_peft(name):
    ours, theirs = _pair(name)
    x = _inputs(name)
    out_o, out_t = ours(**x, labels=_labels(name, x)), theirs(**x, labels=_labels(name, x))
    assert (out_o.logits - out_t.logits).abs().max() <= TOL
    with ours.disable_adapter():
        assert (ours(**x).logits - out_o.logits).abs().max() > 1e-2  # the adapter (and its tokens) matter
    out_o.loss.backward()
    out_t.loss.backward()
    go, gt = _grads(ours), _grads(theirs)
    emb = MODELS[name][4]
    assert go.keys() == gt.keys() and f"{emb}.token_adapter.trainable_tokens_delta.default" in go
    for k in go:  # the head's trained columns are computed apart from the others: float rounding differs
        torch.testing.assert_close(go[k], gt[k], rtol=1e-4, atol=TOL, msg=k)
    if name == "llama_untied":  # the pad row gets no gradient from the embedding (a tied head would give it one)
        assert torch.all(go[f"{emb}.token_adapter.trainable_tokens_delta.default"][3] == 0)
    assert _printed(ours) == _printed(theirs)
    # tied modules follow the embedding: the same rows reach them, saved once
    wrapped = [p for p, m in ours.base_model.named_modules() if type(m).__name__ == "TrainableTokensWrapper"]
    assert wrapped == [emb, *MODELS[name][5]]
    keys = ours.get_adapter_state_dict().keys()
    assert set(keys) == set(peft.get_peft_model_state_dict(theirs))
    assert [k for k in keys if "token" in k] == [f"base_model.model.{emb}.token_adapter.trainable_tokens_delta"]


def test_a_mapping_names_modules_and_an_untied_head_trains_its_output_rows():
    kw = {"trainable_token_indices": {"embed_tokens": [3, 5], "lm_head": [5, 9, 11]}}
    ours, theirs = _pair("llama_untied", **kw)
    x = _inputs("llama_untied")
    assert (ours(**x).logits - theirs(**x).logits).abs().max() <= TOL
    assert set(ours.get_adapter_state_dict()) == set(peft.get_peft_model_state_dict(theirs))
    assert "base_model.model.lm_head.token_adapter.trainable_tokens_delta" in ours.get_adapter_state_dict()
    # on a tied model naming the embedding and its tied head with the same indices is the list form (PEFT too)
    tied, theirs = _pair("llama_tied", trainable_token_indices={"embed_tokens": TOKENS, "lm_head": TOKENS})
    assert (tied(**x).logits - theirs(**x).logits).abs().max() <= TOL
    assert set(tied.get_adapter_state_dict()) == set(peft.get_peft_model_state_dict(theirs))


def _config_json(path: Path) -> dict:
    return json.loads((path / "adapter_config.json").read_text())


@pytest.mark.parametrize("name", ["llama_tied", "t5"])
def test_files_load_both_ways(name, tmp_path):
    ours, theirs = _pair(name)
    x = _inputs(name)
    expected = theirs(**x).logits
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    # same tensors under the same keys, and the same config fields (those we know; the rest are PEFT's "off" ones)
    mine, peft_file = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "peft"))
    assert mine.keys() == peft_file.keys() and all(torch.equal(mine[k], peft_file[k]) for k in mine)
    ours_cfg, peft_cfg = _config_json(tmp_path / "ours"), _config_json(tmp_path / "peft")
    assert ours_cfg["trainable_token_indices"] == peft_cfg["trainable_token_indices"] == TOKENS
    for key, value in ours_cfg.items():
        if key == "target_modules":
            assert set(value) == set(peft_cfg[key])
        elif key != "peft_version":
            assert value == peft_cfg[key], key
    factory = MODELS[name][0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        loaded = PeftModel.from_pretrained(factory(), tmp_path / "peft", adapter_name="other", low_cpu_mem_usage=True)
    assert (loaded(**x).logits - expected).abs().max() <= TOL
    back = peft.PeftModel.from_pretrained(factory(), tmp_path / "ours")
    assert (back(**x).logits - expected).abs().max() <= TOL
    assert set(peft.get_peft_model_state_dict(back)) == set(mine)


def test_peft_reads_a_mapping_config_we_write(tmp_path):
    spec = {"embed_tokens": [3, 5], "lm_head": [9]}
    config = _config(LoraConfig, "llama_untied", trainable_token_indices=spec)
    ours = get_peft_model(MODELS["llama_untied"][0](), config)
    _perturb(ours)
    ours.save_pretrained(tmp_path)
    assert _config_json(tmp_path)["trainable_token_indices"] == spec
    assert peft.PeftConfig.from_pretrained(tmp_path).trainable_token_indices == spec
    theirs = peft.PeftModel.from_pretrained(MODELS["llama_untied"][0](), tmp_path)
    x = _inputs("llama_untied")
    assert (theirs(**x).logits - ours(**x).logits).abs().max() <= TOL
    again = LoraConfig.from_pretrained(tmp_path)
    assert again == ours.peft_config["default"].replace(inference_mode=True)
    assert again.trainable_token_indices["lm_head"] == (9,)


@pytest.mark.parametrize("name", ["llama_tied", "gpt2"])
def test_merge_unmerge_exact_and_merge_and_unload(name):
    factory = MODELS[name][0]
    base = factory()
    weights, tree = clone_state(base), module_tree(base)
    model = get_peft_model(base, _config(LoraConfig, name))
    _perturb(model)
    x = _inputs(name)
    unmerged = model(**x).logits
    for _ in range(3):
        model.merge_adapter()
        assert (model(**x).logits - unmerged).abs().max() <= 1e-4  # LoRA's W + BA rounds differently
        emb = model.get_input_embeddings()
        assert torch.equal(emb.base_layer.weight[TOKENS], emb.token_adapter.trainable_tokens_delta["default"])
        model.unmerge_adapter()
    assert torch.equal(model(**x).logits, unmerged)
    assert state_equal(weights, clone_state(model.unload())) and module_tree(base) == tree  # bit for bit
    model = get_peft_model(base, _config(LoraConfig, name))
    _perturb(model)
    unmerged = model(**x).logits
    merged = model.merge_and_unload()
    assert merged is base and "TrainableTokens" not in str(module_tree(merged))
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight  # still tied
    assert (merged(**x).logits - unmerged).abs().max() <= 1e-4


def test_safe_merge_refuses_non_finite_rows_and_changes_nothing():
    model = get_peft_model(MODELS["gpt2"][0](), _config(LoraConfig, "gpt2"))
    with torch.no_grad():
        model.get_input_embeddings().token_adapter.trainable_tokens_delta["default"][1, 0] = float("nan")
    before = clone_state(model.base_model)
    with pytest.raises(MergeError, match="NaN/Inf"):
        model.merge_adapter(safe_merge=True)
    assert model.merged_adapters == []
    after = clone_state(model.base_model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before if "trainable_tokens" not in k)


@pytest.mark.parametrize("name", ["llama_untied", "llama_tied"])
def test_a_training_step_changes_only_the_selected_rows(name):
    model = get_peft_model(MODELS[name][0](), _config(LoraConfig, name))
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    table, base_weight = emb.weight.detach().clone(), emb.base_layer.weight.detach().clone()
    out_before = head.weight.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model.train()
    x = _inputs(name)
    model(**x, labels=x["input_ids"]).loss.backward()
    assert emb.base_layer.weight.grad is None and not emb.base_layer.weight.requires_grad
    opt.step()
    changed = (emb.weight.detach() != table).any(dim=1).nonzero().flatten().tolist()
    # the pad row gets no gradient from the embedding; tied to the head, it does from there
    assert sorted(changed) == sorted(t for t in TOKENS if t != 0 or name == "llama_tied")
    assert torch.equal(emb.base_layer.weight, base_weight)
    head_changed = (head.weight.detach() != out_before).any(dim=1).nonzero().flatten().tolist()
    assert head_changed == (sorted(changed) if name == "llama_tied" else [])  # the tied head sees the same rows


def test_several_adapters_disable_delete_and_mixed_batch_match_peft():
    name = "llama_tied"
    ours, theirs = _pair(name)
    kw_b = {"trainable_token_indices": [9, 11], "target_modules": ["v_proj"]}
    theirs.add_adapter("b", _config(peft.LoraConfig, name, **kw_b))
    ours.add_adapter("b", _config(LoraConfig, name, **kw_b))
    with torch.no_grad():  # move "b" off its start too
        for n, p in theirs.named_parameters():
            if ".b." in n or n.endswith(".b"):
                p.add_(torch.randn_like(p) * 0.5)
    ours.load_adapter_state_dict("b", {k: v.clone() for k, v in
                                       peft.get_peft_model_state_dict(theirs, adapter_name="b").items()})
    x = _inputs(name, batch=3)
    x["input_ids"][:, 4:6] = torch.tensor([9, 11])
    single = {}
    for adapter in ("default", "b"):
        ours.set_adapter(adapter)
        theirs.set_adapter(adapter)
        single[adapter] = ours(**x).logits
        assert (single[adapter] - theirs(**x).logits).abs().max() <= TOL, adapter
    with ours.disable_adapter():
        single["__base__"] = ours(**x).logits
        with theirs.disable_adapter():
            assert (single["__base__"] - theirs(**x).logits).abs().max() <= TOL
    theirs.eval()
    rows = ["b", "__base__", "default"]
    mixed = ours(**x, adapter_names=rows).logits
    assert (mixed - theirs(**x, adapter_names=rows).logits).abs().max() <= TOL
    for i, adapter in enumerate(rows):
        assert (mixed[i] - single[adapter][i]).abs().max() <= TOL
    # both at once: disjoint rows both apply (PEFT allows one token adapter at a time); overlapping ones are refused
    ours.set_adapter(["default", "b"])
    emb = ours.get_input_embeddings()
    rows = emb.token_adapter.trainable_tokens_delta
    assert torch.equal(emb.weight[[3, 9]], torch.stack([rows["default"][0], rows["b"][0]]))
    ours.add_adapter("c", _config(LoraConfig, name, trainable_token_indices=[5]))
    ours.set_adapter(["default", "c"])
    with pytest.raises(AdapterError, match="both train token 5"):
        ours(**x)
    with pytest.raises(MergeError, match="both train token 5"):
        ours.merge_adapter(["default", "c"])
    assert ours.merged_adapters == ["default"]  # merging is per adapter: "c" changed nothing
    ours.unmerge_adapter()
    ours.set_adapter("b")
    ours.delete_adapter("default")
    ours.delete_adapter("c")
    assert torch.equal(ours(**x).logits, single["b"])
    assert not any(".default" in n for n, _ in ours.named_parameters())
    ours.delete_adapter("b")
    assert "TrainableTokens" not in str(module_tree(ours.base_model))


def test_model_status_is_regular():
    model = get_peft_model(MODELS["t5"][0](), _config(LoraConfig, "t5"))
    assert model.get_model_status().requires_grad == {"default": True}


def _untouched(factory, config, error, match):
    base = factory()
    before, tree = clone_state(base), module_tree(base)
    with pytest.raises(error, match=match):
        get_peft_model(base, config)
    assert state_equal(before, clone_state(base)) and module_tree(base) == tree


@pytest.mark.parametrize("case", ["outside", "no_module", "not_embedding", "linear_not_head", "lora_target",
                                  "modules_to_save", "tied_head_alone", "tied_mismatch", "tied_head_lora",
                                  "t5_embed_tokens"])
def test_bad_input_names_the_culprit_and_leaves_the_model_untouched(case):
    llama, gpt2 = MODELS["llama_untied"][0], MODELS["gpt2"][0]
    cases = {
        "outside": (llama, {"trainable_token_indices": [3, 128]}, ConfigError, r"index 128 is outside "
                    r"'model.embed_tokens', which has 128 tokens.*resize_token_embeddings"),
        "no_module": (llama, {"trainable_token_indices": {"embedding": [3]}}, TargetError,
                      r"'embedding', which matches no module.*model.embed_tokens"),
        "not_embedding": (llama, {"trainable_token_indices": {"norm": [3]}}, TargetError, "LlamaRMSNorm.*not an emb"),
        "linear_not_head": (llama, {"trainable_token_indices": {"down_proj": [3]}}, TargetError,
                            r"'model\.layers\.0\.mlp\.down_proj', a torch.nn.*Linear, which is not an embedding"),
        "lora_target": (llama, {"target_modules": ["q_proj", "embed_tokens"]}, TargetError,
                        "'model.embed_tokens', which is also a LoRA target"),
        "modules_to_save": (llama, {"modules_to_save": ["embed_tokens"]}, ConfigError, "modules_to_save trains fully"),
        "tied_head_alone": (gpt2, {"trainable_token_indices": {"lm_head": [3]}}, TargetError,
                            "'lm_head', which shares its weight with 'transformer.wte'"),
        "tied_mismatch": (gpt2, {"trainable_token_indices": {"wte": [3], "lm_head": [4]}}, ConfigError,
                          "different indices"),
        "tied_head_lora": (gpt2, {"target_modules": ["c_attn", "lm_head"]}, TargetError,
                           "'lm_head' shares its weight with 'transformer.wte'"),
        "t5_embed_tokens": (MODELS["t5"][0], {"trainable_token_indices": {"embed_tokens": [3]}}, TargetError,
                            "give the indices for 'shared'"),
    }
    factory, kw, error, match = cases[case]
    name = {llama: "llama_untied", gpt2: "gpt2"}.get(factory, "t5")
    _untouched(factory, _config(LoraConfig, name, **kw), error, match)


def test_later_adapters_cannot_adapt_a_token_module_and_configs_check_indices():
    model = get_peft_model(MODELS["gpt2"][0](), _config(LoraConfig, "gpt2"))
    tree = module_tree(model)
    with pytest.raises(TargetError, match=r"'lm_head', which follows 'transformer\.wte'"):
        model.add_adapter("b", LoraConfig(target_modules=["c_attn", "lm_head"]))
    with pytest.raises(TargetError, match=r"'transformer\.wte', which holds trainable tokens"):
        model.add_adapter("b", LoraConfig(target_modules=["wte"]))
    assert module_tree(model) == tree and list(model.peft_config) == ["default"]
    for bad, match in [([3, 3], "more than once"), ([-1], "not a token index"), ([True], "not a token index"),
                       ({"wte": "3"}, "list of token indices"), ({}, "empty mapping"), ("3", "must be a list")]:
        with pytest.raises(ConfigError, match=match):
            LoraConfig(target_modules=["c_attn"], trainable_token_indices=bad)
