"""Adaption prompt (LLaMA-Adapter) against Hugging Face PEFT 0.21 (the oracle).

Both libraries get the same prompt and gate weights, with the gates set away from their zero init so the
adapter changes the outputs; logits must then agree to 1e-5 (fp32), greedy generation with the KV cache
token for token, and files load both ways. Models: llama with grouped-query attention (4 query heads, 2
key/value heads), mistral, gpt2 — the model types PEFT supports.
"""

from __future__ import annotations

import json
import subprocess
import sys

import peft
import peft_core
import pytest
import torch
from conftest import clone_state, max_diff, state_equal
from peft_adaption_prompt import AdaptedAttention, AdaptionPromptConfig
from peft_core import AdapterError, ConfigError, PeftModel, TargetError, get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig

VOCAB = 128


def tiny(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32, init: float = 0.2) -> torch.nn.Module:
    """Tiny models with a lively init (the default init greedily repeats one token whatever the input)."""
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
                          initializer_range=init, pad_token_id=0)
    elif kind == "mistral":
        cfg = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=128,
                            initializer_range=init, pad_token_id=0)
    else:
        cfg = GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=VOCAB, n_positions=128,
                         initializer_range=init, bos_token_id=1, eos_token_id=2)
    return AutoModelForCausalLM.from_config(cfg).to(dtype).eval()


KINDS = ["llama", "mistral", "gpt2"]
IDS = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
MASK = torch.ones_like(IDS)


def config(**kw) -> dict:
    return {"task_type": "CAUSAL_LM", "adapter_len": 4, "adapter_layers": 2, **kw}


def set_gates(model: torch.nn.Module, value: float = 0.8, prompt_seed: int | None = None) -> None:
    """Gates away from zero (the adapter is exercised); optionally fresh prompts too."""
    gen = torch.Generator().manual_seed(prompt_seed) if prompt_seed is not None else None
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("adaption_gate") or ".adaption_gate." in name:
                p.fill_(value)
            elif gen is not None and (name.endswith("adaption_prompt") or ".adaption_prompt." in name):
                p.copy_(torch.randn(p.shape, generator=gen).to(p.dtype))


def pair(kind: str, dtype: torch.dtype = torch.float32, **kw):
    """(PEFT's model, ours) on identical base models, ours holding PEFT's adapter weights."""
    theirs = peft.get_peft_model(tiny(kind, dtype=dtype), peft.AdaptionPromptConfig(**config(**kw)))
    set_gates(theirs)
    ours = get_peft_model(tiny(kind, dtype=dtype), AdaptionPromptConfig(**config(**kw)))
    ours.load_adapter_state_dict("default", peft.get_peft_model_state_dict(theirs))
    return theirs.eval(), ours.eval()


def logits(model, ids=IDS, mask=MASK) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


# ---------------------------------------------------------------- equal to PEFT
@pytest.mark.parametrize("kind", KINDS)
def test_logits_equal_peft(kind):
    theirs, ours = pair(kind)
    with theirs.disable_adapter():
        base = logits(theirs)
    expected = logits(theirs)
    assert max_diff(expected, base) > 1e-2  # the adapter really changes the output
    assert max_diff(logits(ours), expected) <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_adapter_is_the_identity(kind):
    base = logits(tiny(kind))
    model = get_peft_model(tiny(kind), AdaptionPromptConfig(**config()))
    assert torch.equal(logits(model), base)  # the zero-init gate
    layers = [n for n, m in model.base_model.named_modules() if isinstance(m, AdaptedAttention)]
    n_layers = 2 if kind == "mistral" else 3
    top = [f"{'transformer.h' if kind == 'gpt2' else 'model.layers'}.{i}.{'attn' if kind == 'gpt2' else 'self_attn'}"
           for i in range(n_layers - 2, n_layers)]
    assert layers == top  # the top adapter_layers attention modules, as PEFT


def test_same_seed_gives_peft_init():
    base, base_theirs = tiny("llama"), tiny("llama")  # tiny() seeds: build the models first
    torch.manual_seed(5)
    theirs = peft.get_peft_model(base_theirs, peft.AdaptionPromptConfig(**config()))
    want = peft.get_peft_model_state_dict(theirs)
    torch.manual_seed(5)
    ours = get_peft_model(base, AdaptionPromptConfig(**config()))
    got = ours.get_adapter_state_dict("default")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("kind", KINDS)
def test_generate_with_cache_equals_peft(kind):
    theirs, ours = pair(kind)
    kw = {"max_new_tokens": 6, "do_sample": False, "use_cache": True, "pad_token_id": 0}
    with torch.no_grad():
        expected = theirs.generate(input_ids=IDS, attention_mask=MASK, **kw)
        got = ours.generate(input_ids=IDS, attention_mask=MASK, **kw)
        with ours.disable_adapter():
            base = ours.generate(input_ids=IDS, attention_mask=MASK, **kw)
    assert torch.equal(got, expected)
    assert not torch.equal(got, base)  # the prompt steers generation


def test_left_padded_batch_equals_peft():
    theirs, ours = pair("llama")
    mask = MASK.clone()
    mask[0, :3] = 0
    assert max_diff(logits(ours, mask=mask)[1], logits(theirs, mask=mask)[1]) <= 1e-5
    assert max_diff(logits(ours, mask=mask)[0, 3:], logits(theirs, mask=mask)[0, 3:]) <= 1e-5


# ---------------------------------------------------------------- files both ways
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_files_both_ways(kind, tmp_path):
    theirs, ours = pair(kind)
    theirs.save_pretrained(tmp_path / "peft")
    loaded = PeftModel.from_pretrained(tiny(kind), tmp_path / "peft")
    assert type(loaded.peft_config["default"]) is AdaptionPromptConfig
    assert max_diff(logits(loaded), logits(theirs)) <= 1e-5

    ours.save_pretrained(tmp_path / "ours")
    from safetensors.torch import load_file

    assert load_file(tmp_path / "ours" / "adapter_model.safetensors").keys() == \
        load_file(tmp_path / "peft" / "adapter_model.safetensors").keys()
    ours_json = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_json = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for key in ("peft_type", "task_type", "target_modules", "adapter_len", "adapter_layers", "inference_mode"):
        assert ours_json[key] == peft_json[key], key
    back = peft.PeftModel.from_pretrained(tiny(kind), tmp_path / "ours")
    assert max_diff(logits(back), logits(ours)) <= 1e-5


# ---------------------------------------------------------------- training
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_training_lowers_loss_and_keeps_base_bits(kind):
    model = get_peft_model(tiny(kind), AdaptionPromptConfig(**config()))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adaption_prompt." in n or ".adaption_gate." in n for n in trainable)
    base_before = {k: v for k, v in clone_state(model).items() if ".adaption_" not in k}
    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(input_ids=IDS, labels=IDS).loss.item()

    before = eval_loss()
    model.train()  # dropout on (gpt2): the real training mode
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(20):
        loss = model(input_ids=IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < before - 0.1
    base_after = {k: v for k, v in clone_state(model).items() if ".adaption_" not in k}
    assert state_equal(base_before, base_after)
    assert all(float(p.abs()) > 0 for n, p in model.named_parameters() if n.endswith("adaption_gate.default"))


def test_training_step_equals_peft():
    theirs, ours = pair("llama")
    for m in (theirs, ours):
        m.train()
        m(input_ids=IDS, labels=IDS).loss.backward()
    want = {n: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    got = {n.replace(".default", ""): p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert {n.removeprefix("base_model.model.") for n in want} == {n.removeprefix("base_model.") for n in got}
    for n, g in got.items():
        assert max_diff(g, want["base_model.model." + n.removeprefix("base_model.")]) <= 1e-5


# ---------------------------------------------------------------- several adapters
def test_several_adapters_set_and_delete_like_peft():
    theirs, ours = pair("llama")
    second = config(adapter_len=3, adapter_layers=1)
    theirs.add_adapter("other", peft.AdaptionPromptConfig(**second))
    ours.add_adapter("other", AdaptionPromptConfig(**second))
    # adding does not change the active adapter (PEFT's rule)
    assert ours.active_adapters == theirs.active_adapters == ["default"]
    assert max_diff(logits(ours), logits(theirs)) <= 1e-5
    theirs.set_adapter("other")
    set_gates(theirs, 0.5, prompt_seed=3)
    ours.load_adapter_state_dict("other", peft.get_peft_model_state_dict(theirs, adapter_name="other"))
    ours.set_adapter("other")
    assert max_diff(logits(ours), logits(theirs)) <= 1e-5
    theirs.set_adapter("default")
    ours.set_adapter("default")
    assert max_diff(logits(ours), logits(theirs)) <= 1e-5
    theirs.delete_adapter("default")
    ours.delete_adapter("default")
    assert ours.active_adapters == theirs.active_adapters == ["other"]
    assert max_diff(logits(ours), logits(theirs)) <= 1e-5
    assert not any(".adaption_prompt.default" in n for n, _ in ours.named_parameters())
    ours.delete_adapter("other")
    assert not any(isinstance(m, AdaptedAttention) for m in ours.base_model.modules())
    assert torch.equal(logits(ours), logits(tiny("llama")))


def test_two_active_adapters_add_up():
    """A peft-core extension (PEFT keeps one active): each active adapter's gated output is added."""
    base = logits(tiny("llama"))
    model = get_peft_model(tiny("llama"), AdaptionPromptConfig(**config()))
    model.add_adapter("other", AdaptionPromptConfig(**config(adapter_layers=1)))
    set_gates(model, 0.6, prompt_seed=4)
    a = logits(model)
    model.set_adapter("other")
    b = logits(model)
    model.set_adapter(["default", "other"])
    both = logits(model)
    assert max_diff(both, a) > 1e-3 and max_diff(both, b) > 1e-3 and max_diff(a, base) > 1e-3
    # in the top layer the two deltas add: check it on that layer directly
    layer = model.base_model.get_submodule("model.layers.2.self_attn")
    hidden = torch.randn(1, 5, 32)
    pos = model.base_model.model.rotary_emb(hidden, torch.arange(5)[None])
    kw = {"hidden_states": hidden, "position_embeddings": pos, "attention_mask": None}
    with torch.no_grad():
        out_both = layer(**kw)[0]
        model.set_adapter("default")
        out_a = layer(**kw)[0]
        model.set_adapter("other")
        out_b = layer(**kw)[0]
        with model.disable_adapter():
            out_0 = layer(**kw)[0]
    assert max_diff(out_both, out_a + out_b - out_0) <= 1e-6


def test_mixed_batch_rows_equal_single_adapter_runs():
    model = get_peft_model(tiny("llama"), AdaptionPromptConfig(**config()))
    model.add_adapter("other", AdaptionPromptConfig(**config(adapter_layers=3)))
    set_gates(model, 0.7, prompt_seed=6)
    with torch.no_grad():
        mixed = model(input_ids=IDS, adapter_names=["other", "__base__"]).logits
        model.set_adapter("other")
        other = model(input_ids=IDS).logits
        with model.disable_adapter():
            base = model(input_ids=IDS).logits
    # a row of a 2-row batch against a 1-row run: multi-threaded GEMMs block the two shapes differently (1.7e-6
    # with 2 threads on an AVX-512 EPYC); the wrong adapter would be off by the adapter's whole effect
    assert max_diff(other[0], base[0]) > 1e-2
    assert max_diff(mixed[0], other[0]) <= 1e-5
    assert max_diff(mixed[1], base[1]) <= 1e-5


# ---------------------------------------------------------------- disable, dtypes
@pytest.mark.parametrize("kind", KINDS)
def test_disable_adapter_gives_base_model(kind):
    _, ours = pair(kind)
    with ours.disable_adapter():
        assert torch.equal(logits(ours), logits(tiny(kind)))
    assert max_diff(logits(ours), logits(tiny(kind))) > 1e-2


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_bf16_model_equals_peft(kind):
    theirs, ours = pair(kind, dtype=torch.bfloat16)
    # autocast_adapter_dtype (default True): fp32 adapter weights beside the bf16 model, as in PEFT's tuners
    assert all(p.dtype == torch.float32 for n, p in ours.named_parameters() if ".adaption_" in n)
    got, expected = logits(ours), logits(theirs)
    assert got.dtype == torch.bfloat16
    with theirs.disable_adapter():
        base = logits(theirs)
    assert max_diff(got, expected) <= 1e-2 < max_diff(expected, base)
    kept = get_peft_model(tiny(kind, dtype=torch.bfloat16), AdaptionPromptConfig(**config()),
                          autocast_adapter_dtype=False)
    assert all(p.dtype == torch.bfloat16 for n, p in kept.named_parameters() if ".adaption_" in n)
    kept.load_adapter_state_dict("default", peft.get_peft_model_state_dict(theirs))
    assert torch.equal(logits(kept), expected)  # same dtype everywhere: PEFT's bits


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_autocast_bf16(kind):
    theirs, ours = pair(kind)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = logits(theirs)
        got = logits(ours)
        ours.train()
        loss = ours(input_ids=IDS, labels=IDS).loss
    loss.backward()
    assert max_diff(got.float(), expected.float()) <= 5e-2
    assert max_diff(got.float(), logits(ours.eval()).float()) <= 0.2  # close to the fp32 run
    grads = [p.grad for n, p in ours.named_parameters() if ".adaption_" in n]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------- reporting, errors, registry
@pytest.mark.parametrize("kind", KINDS)
def test_print_trainable_parameters_equals_peft(kind, capsys):
    theirs, ours = pair(kind)
    theirs.print_trainable_parameters()
    expected = capsys.readouterr().out
    ours.print_trainable_parameters()
    assert capsys.readouterr().out == expected


def test_unsupported_model_type_names_it():
    from conftest import tiny_opt

    model = tiny_opt()
    before = clone_state(model)
    with pytest.raises(TargetError, match=r"'opt'.*\['gpt2', 'llama', 'mistral'\]"):
        get_peft_model(model, AdaptionPromptConfig(**config()))
    assert state_equal(clone_state(model), before)
    assert not any(isinstance(m, AdaptedAttention) for m in model.modules())


def test_config_errors():
    with pytest.raises(ConfigError, match="adapter_len"):
        get_peft_model(tiny("llama"), AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_layers=1))
    with pytest.raises(ConfigError, match="adapter_len"):
        AdaptionPromptConfig(adapter_len=0)
    with pytest.raises(TargetError, match=r"adapter_layers=5.*has 3"):
        get_peft_model(tiny("llama"), AdaptionPromptConfig(**config(adapter_layers=5)))
    with pytest.raises(TargetError, match="mlp"):
        get_peft_model(tiny("llama"), AdaptionPromptConfig(**config(target_modules="mlp")))
    with pytest.raises(TargetError, match="'nope'"):
        get_peft_model(tiny("llama"), AdaptionPromptConfig(**config(target_modules="nope")))
    with pytest.raises((ConfigError, AdapterError, ValueError), match=r"SEQ_CLS|task"):
        get_peft_model(tiny("llama"), AdaptionPromptConfig(**config(task_type="SEQ_CLS")))


def test_does_not_merge():
    _, ours = pair("llama")
    with pytest.raises((AdapterError, ValueError), match=r"(?i)merge"):
        ours.merge_and_unload()
    base = ours.unload()
    assert not any(isinstance(m, AdaptedAttention) for m in base.modules())
    assert torch.equal(logits(base), logits(tiny("llama")))


def test_registry_and_list_methods():
    assert peft_core.AdaptionPromptConfig is AdaptionPromptConfig
    assert peft_core.PEFT_TYPE_TO_CONFIG_MAPPING["ADAPTION_PROMPT"] is AdaptionPromptConfig
    out = subprocess.run([sys.executable, "-m", "peft_core.cli", "list-methods", "--json"], capture_output=True,
                         text=True, check=True).stdout
    rows = {m["method"]: m for m in json.loads(out)["methods"]}
    assert "ADAPTION_PROMPT" in rows
    assert rows["ADAPTION_PROMPT"]["mergeable"] is False


def test_composes_with_lora_added_first():
    """LoRA on q/v first, then the adaption prompt wraps those attentions: both apply, and deleting the
    adaption prompt gives the LoRA model back exactly (the other order: see docs/methods/adaption_prompt.md)."""
    from peft_core import LoraConfig

    model = get_peft_model(tiny("llama"), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False))
    lora_only = logits(model)
    model.add_adapter("ap", AdaptionPromptConfig(**config()))
    set_gates(model)
    model.set_adapter(["default", "ap"])
    both = logits(model)
    model.set_adapter("ap")
    ap_only = logits(model)
    assert max_diff(both, lora_only) > 1e-2 and max_diff(both, ap_only) > 1e-2
    model.delete_adapter("ap")
    model.set_adapter("default")
    assert torch.equal(logits(model), lora_only)
