"""Prompt tuning against Hugging Face PEFT (the oracle): logits, generation, padding, training, files.

Both libraries get the same prompt weights (PEFT's tensors loaded into ours through the file format),
then must agree to 1e-5. PEFT 0.21's *cached* generation of prompt tuning is wrong with transformers
5.24 (it looks for the cache under ``past_key_values``, now ``cache``, so it takes every step for the
first and inserts the prompt again), so generation is compared with greedy decoding by full forwards of
PEFT's model, and with PEFT's ``generate(use_cache=False)``.
"""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from conftest import (
    PAD_ROWS,
    assert_same_config_json,
    assert_same_tokens,
    clone_state,
    greedy_by_forward,
    max_diff,
    model_inputs,
    padded_rows,
    state_equal,
    tiny_bert_cls,
    tiny_gpt2,
    tiny_gpt2_lively,
    tiny_llama,
    tiny_llama_cls,
    tiny_t5,
    tiny_t5_lively,
)
from peft_core import (
    AdaptedModel,
    AdapterError,
    ConfigError,
    PeftModel,
    PromptTuningConfig,
    get_peft_model,
)

warnings.filterwarnings("ignore", message=".*will not detect padding tokens.*")

N = 4
# name -> (factory, task type, inputs flavour)
CASES = {
    "llama": (tiny_llama, "CAUSAL_LM", "llama"),
    "gpt2": (tiny_gpt2, "CAUSAL_LM", "gpt2"),
    "t5": (tiny_t5, "SEQ_2_SEQ_LM", "t5"),
    # generation tests: the plain tiny models greedily repeat one token whatever the prompt; these do not.
    # Their activations are large (logits ~100), so float32 rounding alone is ~1e-5 there: not for logits tests
    "gpt2_lively": (tiny_gpt2_lively, "CAUSAL_LM", "gpt2"),
    "t5_lively": (tiny_t5_lively, "SEQ_2_SEQ_LM", "t5"),
    "bert_cls": (tiny_bert_cls, "SEQ_CLS", "bert"),
    "llama_cls": (tiny_llama_cls, "SEQ_CLS", "llama"),
}


def pair(name: str, **kwargs):
    """(PEFT model, our model) on equal base models, with PEFT's prompt (and head) weights in ours."""
    factory, task, _ = CASES[name]
    ref = peft.get_peft_model(factory(), peft.PromptTuningConfig(task_type=task, num_virtual_tokens=N, **kwargs))
    ours = get_peft_model(factory(), PromptTuningConfig(task_type=task, num_virtual_tokens=N, **kwargs))
    ours.load_adapter_state_dict("default", {k: v.clone() for k, v in peft.get_peft_model_state_dict(ref).items()})
    return ref, ours


def inputs_for(name: str) -> dict[str, torch.Tensor]:
    return model_inputs(CASES[name][2])


# ---------------------------------------------------------------- forward
@pytest.mark.parametrize("name", [n for n in CASES if not n.endswith("_lively")])
def test_logits_match_peft(name):
    ref, ours = pair(name)
    x = inputs_for(name)
    with torch.no_grad():
        expected, got = ref(**x).logits, ours(**x).logits
        with ours.disable_adapter():
            base = ours(**x).logits
    assert max_diff(got, expected) <= 1e-5
    if name in ("llama", "gpt2"):  # causal LMs return logits for the virtual positions too
        assert got.shape[1] == N + x["input_ids"].shape[1]
    assert base.shape != got.shape or max_diff(base, got) > 1e-3  # the prompt does something


def test_causal_lm_loss_ignores_virtual_tokens():
    ref, ours = pair("llama")
    x = inputs_for("llama")
    labels = x["input_ids"].clone()
    with torch.no_grad():
        assert abs(ours(**x, labels=labels).loss.item() - ref(**x, labels=labels).loss.item()) <= 1e-5


def test_token_classification_labels_skip_the_virtual_tokens():
    from transformers import AutoModelForTokenClassification, BertConfig

    torch.manual_seed(0)
    base = AutoModelForTokenClassification.from_config(BertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
        max_position_embeddings=128, num_labels=3)).eval()
    model = get_peft_model(base, PromptTuningConfig(task_type="TOKEN_CLS", num_virtual_tokens=N))
    x = inputs_for("bert_cls")
    labels = torch.randint(0, 3, x["input_ids"].shape)
    with torch.no_grad():
        out = model(**x, labels=labels)
    assert out.logits.shape == (2, N + 7, 3)
    expected = torch.nn.functional.cross_entropy(out.logits[:, N:].reshape(-1, 3), labels.reshape(-1))
    assert abs(out.loss.item() - expected.item()) <= 1e-6


def test_token_type_ids_and_position_ids():
    """token_type_ids get zeros for the virtual tokens (PEFT); caller positions move past them."""
    ref, ours = pair("bert_cls")
    x = inputs_for("bert_cls")
    types = torch.ones_like(x["input_ids"])
    with torch.no_grad():
        assert max_diff(ours(**x, token_type_ids=types).logits, ref(**x, token_type_ids=types).logits) <= 1e-5
    _, llama = pair("llama")
    x = inputs_for("llama")
    with torch.no_grad():
        plain = llama(**x).logits
        positioned = llama(**x, position_ids=torch.arange(x["input_ids"].shape[1])[None]).logits
    assert max_diff(plain, positioned) <= 1e-6


def _count_base_calls(model) -> list[int]:
    calls: list[int] = []
    model.base_model.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    return calls


def test_shared_prompt_path_matches_peft_in_training():
    """Causal LMs without dropout: the virtual tokens run once at batch 1 (two base-model calls per forward);
    loss, logits and the prompt's gradient still equal PEFT's, which runs them once per row."""
    ref, ours = pair("llama")
    calls = _count_base_calls(ours)
    ref.train()
    ours.train()
    x = inputs_for("llama")
    labels = x["input_ids"].clone()
    labels[0, 2] = -100
    got, expected = ours(**x, labels=labels), ref(**x, labels=labels)
    assert len(calls) == 2  # the batch-1 pass over the virtual tokens, then the batch
    assert got.logits.shape == expected.logits.shape
    assert max_diff(got.logits, expected.logits) <= 1e-5
    assert abs(got.loss.item() - expected.loss.item()) <= 1e-6
    got.loss.backward()
    expected.loss.backward()
    g_ours = ours.adapter_modules["default"].embedding.weight.grad
    g_peft = ref.prompt_encoder["default"].embedding.weight.grad
    assert max_diff(g_ours, g_peft) <= 1e-5 * max(1.0, g_peft.abs().max().item())
    with torch.no_grad():
        for keep in (1, 5, 9):  # logits_to_keep reaching into the virtual positions too
            kept = ours(**x, logits_to_keep=keep).logits
            assert max_diff(kept, expected.logits[:, -keep:]) <= 1e-5
    assert not ours.adapter_modules["default"]._pending  # nothing left waiting


def test_shared_prompt_path_stays_off_where_it_would_change_results():
    _, ours = pair("gpt2")  # GPT-2 has dropout: rows must keep their own dropout masks in training
    calls = _count_base_calls(ours)
    x = inputs_for("gpt2")
    ours.train()
    ours(**x)
    assert len(calls) == 1
    ours.eval()
    with torch.no_grad():
        ours(**x)
        ours(input_ids=x["input_ids"][:1])  # one row: nothing to share
    assert len(calls) == 1 + 2 + 1


# ---------------------------------------------------------------- generation
@pytest.mark.parametrize("name", ["llama", "gpt2_lively", "t5_lively"])
def test_greedy_generate_matches_peft(name):
    ref, ours = pair(name)
    x = inputs_for(name)
    x.pop("decoder_input_ids", None)
    seq2seq = name == "t5_lively"
    steps = 6
    expected = greedy_by_forward(ref, x, steps, seq2seq=seq2seq)
    got = ours.generate(**x, max_new_tokens=steps, do_sample=False)
    got = got[:, 1:] if seq2seq else got[:, x["input_ids"].shape[1]:]
    eos = ours.base_model.generation_config.eos_token_id
    assert_same_tokens(got, expected, eos)
    peft_uncached = ref.generate(**x, max_new_tokens=steps, do_sample=False, use_cache=False)
    assert torch.equal(ours.generate(**x, max_new_tokens=steps, do_sample=False, use_cache=False), peft_uncached)
    if seq2seq:  # PEFT's cached path works for encoder-decoder prompt tuning: compare with it as well
        assert torch.equal(ours.generate(**x, max_new_tokens=steps, do_sample=False),
                           ref.generate(**x, max_new_tokens=steps, do_sample=False))
    with ours.disable_adapter():
        base = ours.generate(**x, max_new_tokens=steps, do_sample=False)
    assert not torch.equal(base, ours.generate(**x, max_new_tokens=steps, do_sample=False))


@pytest.mark.parametrize("name", ["llama", "t5_lively"])
def test_sampling_generate_cached_equals_uncached(name):
    _, ours = pair(name)
    x = inputs_for(name)
    x.pop("decoder_input_ids", None)
    kwargs = {"max_new_tokens": 6, "do_sample": True, "top_k": 20, "num_return_sequences": 2}
    torch.manual_seed(3)
    cached = ours.generate(**x, **kwargs)
    torch.manual_seed(3)
    uncached = ours.generate(**x, **kwargs, use_cache=False)
    assert cached.shape[0] == 2 * x["input_ids"].shape[0]
    assert torch.equal(cached, uncached)


# ---------------------------------------------------------------- padding
@pytest.mark.parametrize("name", ["llama", "gpt2", "t5", "bert_cls"])
def test_right_padded_batch_equals_rows_alone(name):
    _, ours = pair(name)
    ids, mask = padded_rows("right")
    extra = {"decoder_input_ids": torch.tensor([[0, 3, 4]] * len(PAD_ROWS))} if name == "t5" else {}
    with torch.no_grad():
        batch = ours(input_ids=ids, attention_mask=mask, **{k: v for k, v in extra.items()}).logits
        for i, row in enumerate(PAD_ROWS):
            alone = ours(input_ids=torch.tensor([row]), **{k: v[i:i + 1] for k, v in extra.items()}).logits
            if name in ("llama", "gpt2"):
                assert max_diff(batch[i, : N + len(row)], alone[0]) <= 1e-5
            else:
                assert max_diff(batch[i], alone[0]) <= 1e-5


def test_left_padded_classifier_with_positions_equals_rows_alone():
    """Decoder-only classifiers read the last position (inputs_embeds hide the padding from them):
    pad on the left, and give positions so that padding does not shift the tokens."""
    _, ours = pair("llama_cls")
    ids, mask = padded_rows("left")
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batch = ours(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        for i, row in enumerate(PAD_ROWS):
            assert max_diff(batch[i], ours(input_ids=torch.tensor([row])).logits[0]) <= 1e-5


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_left_padded_generate_equals_rows_alone(name):
    _, ours = pair(name)
    ids, mask = padded_rows("right" if name == "t5" else "left")
    got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for i, row in enumerate(PAD_ROWS):
        alone = ours.generate(input_ids=torch.tensor([row]), max_new_tokens=5, do_sample=False, pad_token_id=0)
        new = got[i, 1:] if name == "t5" else got[i, ids.shape[1]:]
        new_alone = alone[0, 1:] if name == "t5" else alone[0, len(row):]
        assert new.tolist()[: len(new_alone)] == new_alone.tolist()


# ---------------------------------------------------------------- training
def test_training_lowers_loss_and_leaves_base_bit_identical():
    base = tiny_gpt2_lively()
    before = clone_state(base)
    model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["adapter_modules.default.embedding.weight"]
    opt = torch.optim.Adam(trainable, lr=0.3)
    ids = torch.tensor([[3, 9, 27, 81, 3, 9, 27, 81, 3, 9]] * 2)
    labels = torch.full_like(ids, 7)  # the toy task: always answer token 7, which only the prompt can teach
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert state_equal(before, clone_state(base))
    assert all(p.grad is None for n, p in base.named_parameters())


# ---------------------------------------------------------------- files
@pytest.mark.parametrize("name", ["llama", "t5", "bert_cls"])
def test_files_load_both_ways(name, tmp_path):
    ref, ours = pair(name)
    factory, _, _ = CASES[name]
    x = inputs_for(name)
    with torch.no_grad():
        expected = ours(**x).logits
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "peft")
    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert_same_config_json(ours_cfg, peft_cfg)
    from safetensors.torch import load_file

    ours_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert state_equal(ours_file, peft_file)
    loaded_by_peft = peft.PeftModel.from_pretrained(factory(), tmp_path / "ours")
    loaded_by_ours = PeftModel.from_pretrained(factory(), tmp_path / "peft")
    with torch.no_grad():
        assert max_diff(loaded_by_peft(**x).logits, expected) <= 1e-5
        assert max_diff(loaded_by_ours(**x).logits, expected) <= 1e-5
    assert not any(p.requires_grad for p in loaded_by_ours.parameters())


def _tokenizer_folder(path) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "classify", "the", "sentiment", "of", "this", "review"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(path)
    return str(path)


def test_text_init_from_a_local_tokenizer_matches_peft(tmp_path):
    folder = _tokenizer_folder(tmp_path / "tok")
    kwargs = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "classify the sentiment",
              "tokenizer_name_or_path": folder, "tokenizer_kwargs": {"trust_remote_code": True}}
    ref = peft.get_peft_model(tiny_llama(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5,
                                                                    **kwargs))
    ours = get_peft_model(tiny_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, **kwargs))
    got = ours.adapter_modules["default"].embedding.weight
    expected = ref.prompt_encoder["default"].embedding.weight
    assert torch.equal(got, expected)
    emb = ours.get_input_embeddings().weight
    assert torch.equal(got[0], emb[2]) and torch.equal(got[3], emb[2])  # 3 text tokens, repeated to fill 5
    with pytest.raises(ConfigError, match="tokenizer_name_or_path"):
        get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT",
                                                        prompt_tuning_init_text="x",
                                                        tokenizer_name_or_path=str(tmp_path / "missing")))


def test_sample_vocab_init_uses_vocabulary_rows():
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="SAMPLE_VOCAB"))
    emb = model.get_input_embeddings().weight
    for row in model.adapter_modules["default"].embedding.weight:
        assert any(torch.equal(row, e) for e in emb)


# ---------------------------------------------------------------- configs and errors
def test_config_is_completed_in_a_copy_and_validated():
    config = PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3)
    model = get_peft_model(tiny_t5(), config)
    assert config.token_dim is None and config.num_transformer_submodules is None  # the user's object
    stored = model.peft_config["default"]
    assert (stored.token_dim, stored.num_layers, stored.num_attention_heads, stored.num_transformer_submodules) == \
           (32, 2, 4, 2)
    assert model.adapter_modules["default"].embedding.weight.shape == (6, 32)  # PEFT's 2n rows
    with pytest.raises(ConfigError, match="num_virtual_tokens is not set"):
        get_peft_model(tiny_llama(), PromptTuningConfig())  # PEFT's habit: built first, filled later
    with pytest.raises(ConfigError, match="tokenizer_name_or_path"):
        PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi")
    with pytest.raises(ConfigError, match="tokenizer_kwargs"):
        PromptTuningConfig(num_virtual_tokens=3, tokenizer_kwargs={"use_fast": True})
    with pytest.raises(ConfigError, match="token_dim=7"):
        get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=3, token_dim=7))
    with pytest.raises(ConfigError, match="does not support task_type=QUESTION_ANS"):
        get_peft_model(tiny_llama(), PromptTuningConfig(task_type="QUESTION_ANS", num_virtual_tokens=3))


def test_refuses_what_it_cannot_do():
    model = AdaptedModel(tiny_llama(), PromptTuningConfig(num_virtual_tokens=3))
    x = inputs_for("llama")
    with pytest.raises(AdapterError, match="2D padding"):
        model(input_ids=x["input_ids"], attention_mask=torch.ones(2, 1, 7, 7))
    with pytest.raises(AdapterError, match="length 5"):
        model(input_ids=x["input_ids"], attention_mask=torch.ones(2, 5, dtype=torch.long))
    model.add_adapter("other", PromptTuningConfig(num_virtual_tokens=2))
    model.set_adapter(["default", "other"])
    with pytest.raises(AdapterError, match="one prompt or prefix adapter at a time"):
        model(**x)
    model.set_adapter("default")
    model.eval()
    with pytest.raises(AdapterError, match="mixed-batch"):
        model(**x, adapter_names=["default", "other"])


def test_unload_and_delete_restore_the_base_model_exactly():
    base = tiny_t5()
    x = inputs_for("t5")
    with torch.no_grad():
        reference = base(**x).logits
    model = get_peft_model(base, PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3))
    model.add_adapter("second", PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=2))
    with torch.no_grad():
        assert max_diff(model(**x).logits, reference) > 1e-4
        model.delete_adapter("default")  # "second" becomes active
        model.delete_adapter("second")
        assert torch.equal(model(**x).logits, reference)
    assert not base.get_encoder()._forward_pre_hooks
    assert model.unload() is base
    with torch.no_grad():
        assert torch.equal(base(**x).logits, reference)


def test_works_without_the_other_method_plugins(monkeypatch):
    """An independent plugin: selected alone it works, and neither method plugin imports the other."""
    import ast
    import pathlib

    from peft_core.registry import reset_registry

    root = pathlib.Path(__file__).resolve().parents[1] / "methods"
    for package, others in (("prompt_tuning", {"peft_prefix", "peft_lora"}), ("prefix", {"peft_prompt_tuning",
                                                                                          "peft_lora"})):
        for path in (root / package).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                assert not {n.split(".")[0] for n in names} & others, f"{path} imports {names}"
    monkeypatch.setenv("PEFT_CORE_PLUGINS", "prompt_tuning")
    try:
        registry = reset_registry()
        assert [spec.name for spec, _ in registry.methods()] == ["PROMPT_TUNING"]
        model = get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=2))
        with torch.no_grad():
            assert model(input_ids=torch.tensor([[3, 4]])).logits.shape[1] == 4
    finally:
        monkeypatch.delenv("PEFT_CORE_PLUGINS")
        reset_registry()
