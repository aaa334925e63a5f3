"""A prompt-tuning or prefix adapter and a LoRA adapter active together on one model.

The composed model must equal both applied by hand: (1) Hugging Face PEFT's LoRA merged into the base,
then PEFT's prefix/prompt on that, and (2) our LoRA-only model fed the prefix cache or prompt embeddings
directly. It must survive save/load (one folder, a sub-folder per adapter) exactly, and PEFT must read
each folder. Merging folds the LoRA part only; merge_and_unload refuses while a prompt adapter is active.
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from conftest import clone_state, greedy_by_forward, max_diff, model_inputs, state_equal, tiny_llama, tiny_t5
from peft_core import (
    LoraConfig,
    MergeError,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
)

warnings.filterwarnings("ignore", message=".*Position ids are not supported.*")

N = 3
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
LORA_T5 = {"r": 4, "lora_alpha": 8, "target_modules": ["q", "v"], "init_lora_weights": False}
METHODS = {"prefix": (PrefixTuningConfig, peft.PrefixTuningConfig),
           "prompt": (PromptTuningConfig, peft.PromptTuningConfig)}


def composed(method: str, factory=tiny_llama, task: str = "CAUSAL_LM", lora: dict | None = None):
    """Ours: the prompt/prefix adapter "default" plus LoRA adapter "lora", both active."""
    ours_cls, _ = METHODS[method]
    model = get_peft_model(factory(), ours_cls(task_type=task, num_virtual_tokens=N))
    torch.manual_seed(7)
    model.add_adapter("lora", LoraConfig(task_type=task, **(lora or LORA)))
    model.set_adapter(["default", "lora"])
    return model


def peft_reference(model, method: str, factory=tiny_llama, task: str = "CAUSAL_LM", lora: dict | None = None):
    """PEFT: our LoRA weights merged into a fresh base, then our prompt/prefix weights on top."""
    _, peft_cls = METHODS[method]
    lora_model = peft.get_peft_model(factory(), peft.LoraConfig(task_type=task, **(lora or LORA)))
    peft.set_peft_model_state_dict(lora_model, model.get_adapter_state_dict("lora"))
    merged = lora_model.merge_and_unload()
    ref = peft.get_peft_model(merged, peft_cls(task_type=task, num_virtual_tokens=N))
    peft.set_peft_model_state_dict(ref, model.get_adapter_state_dict("default"))
    return ref


def by_hand(model, method: str, x: dict[str, torch.Tensor]) -> torch.Tensor:
    """Our LoRA-only model, with the prefix cache or the prompt embeddings passed in directly."""
    lora_only = get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", **LORA))
    lora_only.load_adapter_state_dict("default", model.get_adapter_state_dict("lora"))
    ids, batch = x["input_ids"], x["input_ids"].shape[0]
    mask = torch.cat([torch.ones(batch, N, dtype=torch.long), x["attention_mask"]], dim=1)
    store = model.adapter_modules["default"]
    with torch.no_grad():
        if method == "prefix":
            cache = store.fill(None, lora_only.base_model, batch, torch.float32)
            return lora_only(input_ids=ids, attention_mask=mask, cache=cache).logits
        embeds = lora_only.get_input_embeddings()(ids)
        prompt = store.embedding.weight[:N].expand(batch, -1, -1)
        return lora_only(inputs_embeds=torch.cat([prompt, embeds], dim=1), attention_mask=mask).logits


@pytest.mark.parametrize("method", list(METHODS))
def test_composed_output_equals_both_applied_by_hand(method):
    model = composed(method)
    x = model_inputs("llama")
    with torch.no_grad():
        got = model(**x).logits
        expected = peft_reference(model, method)(**x).logits
        model.set_adapter("default")
        prompt_only = model(**x).logits
        model.set_adapter(["lora", "default"])  # activation order does not matter here
        reordered = model(**x).logits
    assert max_diff(got, expected) <= 1e-5
    assert max_diff(got, by_hand(model, method, x)) <= 1e-5
    assert max_diff(got, reordered) <= 1e-6
    assert max_diff(got, prompt_only) > 1e-4  # the LoRA part does something


def test_composed_seq2seq_prefix_equals_peft():
    model = composed("prefix", tiny_t5, "SEQ_2_SEQ_LM", LORA_T5)
    x = model_inputs("t5")
    with torch.no_grad():
        got = model(**x).logits
        expected = peft_reference(model, "prefix", tiny_t5, "SEQ_2_SEQ_LM", LORA_T5)(**x).logits
        model.set_adapter("default")
        prefix_only = model(**x).logits
    assert max_diff(got, expected) <= 1e-5
    assert max_diff(got, prefix_only) > 1e-4


@pytest.mark.parametrize("method", list(METHODS))
def test_composed_greedy_generate(method):
    model = composed(method)
    x = model_inputs("llama")
    expected = greedy_by_forward(peft_reference(model, method), x, 5)
    got = model.generate(**x, max_new_tokens=5, do_sample=False)[:, x["input_ids"].shape[1]:]
    eos = model.base_model.generation_config.eos_token_id
    for g, e in zip(got.tolist(), expected.tolist()):
        stop = e.index(eos) + 1 if eos in e else len(e)
        assert g[:stop] == e[:stop]


@pytest.mark.parametrize("method", list(METHODS))
def test_composed_save_load_exact_and_readable_by_peft(method, tmp_path):
    model = composed(method)
    x = model_inputs("llama")
    with torch.no_grad():
        expected = model(**x).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "lora" / "adapter_config.json").is_file()
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    loaded.load_adapter(tmp_path / "lora", adapter_name="lora")
    loaded.set_adapter(["default", "lora"])
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, expected)
    # PEFT reads each folder: LoRA merged into the base, the prompt/prefix adapter on top
    merged = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora").merge_and_unload()
    ref = peft.PeftModel.from_pretrained(merged, tmp_path)
    with torch.no_grad():
        assert max_diff(ref(**x).logits, expected) <= 1e-5


@pytest.mark.parametrize("method", list(METHODS))
def test_merge_folds_lora_only_and_unload_refuses_prompts(method):
    model = composed(method)
    x = model_inputs("llama")
    weights = clone_state(model.base_model)
    with torch.no_grad():
        before = model(**x).logits
        model.merge_adapter()
        assert model.merged_adapters == ["lora"]
        assert max_diff(model(**x).logits, before) <= 1e-5  # the prompt still acts on the inputs
    with pytest.raises(MergeError, match=r"\['default'\].*cannot be folded"):
        model.merge_and_unload()
    model.unmerge_adapter()
    assert state_equal(weights, clone_state(model.base_model))
    with torch.no_grad():
        assert torch.equal(model(**x).logits, before)
        lora_logits = by_hand_lora_only(model, x)
    model.delete_adapter("default")
    base = model.merge_and_unload()
    with torch.no_grad():
        assert max_diff(base(**x).logits, lora_logits) <= 1e-5


def by_hand_lora_only(model, x: dict[str, torch.Tensor]) -> torch.Tensor:
    lora_only = get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", **LORA))
    lora_only.load_adapter_state_dict("default", model.get_adapter_state_dict("lora"))
    return lora_only(**x).logits


@pytest.mark.parametrize("method", list(METHODS))
def test_composed_training_updates_both_and_never_the_base(method):
    model = composed(method)
    model.train()
    base_before = {k: v for k, v in clone_state(model.base_model).items() if ".lora_" not in k}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("adapter_modules.default.") for n in trainable)
    assert any(".lora_A.lora." in n for n in trainable)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = model_inputs("llama")
    loss = model(**x, labels=x["input_ids"]).loss
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == trainable
    opt.step()
    after = {k: v for k, v in clone_state(model.base_model).items() if ".lora_" not in k}
    assert state_equal(base_before, after)
