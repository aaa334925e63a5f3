"""Prefix tuning against Hugging Face PEFT (the oracle): logits, generation, padding, training, files.

Both libraries get the same prefix weights, then must agree to 1e-5. Where PEFT 0.21 itself fails with
transformers 5.24 the oracle is rebuilt from PEFT's own pieces:

- sequence classification: PEFT looks for ``past_key_values`` in the model's forward (transformers 5
  calls it ``cache``) and raises, so the expected logits are the base model's run with the cache that
  PEFT's ``get_prompt`` builds (which is what its forward would do);
- generation: PEFT's ``prepare_inputs_for_generation`` also looks for ``past_key_values``, so its
  ``generate()`` rebuilds or loses the prefix; the expected tokens are greedy decoding by full forwards
  of PEFT's model.
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
    CheckpointError,
    ConfigError,
    PeftModel,
    PrefixTuningConfig,
    TargetError,
    get_peft_model,
)
from peft_prefix.encoder import layer_rows

warnings.filterwarnings("ignore", message=".*will not detect padding tokens.*")

N = 3
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


def pair(name: str, projection: bool = False, **kwargs):
    """(PEFT model, our model) on equal base models with equal prefix (and head) weights.

    With ``projection`` both train the MLP; its weights go across module to module, since PEFT's file
    holds only the MLP's output.
    """
    factory, task, _ = CASES[name]
    ref = peft.get_peft_model(factory(), peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=N,
                                                                 prefix_projection=projection, **kwargs))
    ours = get_peft_model(factory(), PrefixTuningConfig(task_type=task, num_virtual_tokens=N,
                                                        prefix_projection=projection, **kwargs))
    if projection:
        ours.adapter_modules["default"].load_state_dict(ref.prompt_encoder["default"].state_dict())
        heads = {k: v for k, v in peft.get_peft_model_state_dict(ref).items() if k != "prompt_embeddings"}
        for key, value in heads.items():  # task heads (modules_to_save): base_model.<path>.<param> in PEFT's file
            path, param = key[len("base_model."):].rsplit(".", 1)
            getattr(ours.base_model.get_submodule(path).modules_to_save["default"], param).data.copy_(value)
    else:
        ours.load_adapter_state_dict("default", {k: v.clone() for k, v in peft.get_peft_model_state_dict(ref).items()})
    return ref, ours


def inputs_for(name: str) -> dict[str, torch.Tensor]:
    return model_inputs(CASES[name][2])


def expected_logits(name: str, ref, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        if name.endswith("_cls"):  # PEFT's own forward raises here (see the module docstring)
            batch = x["input_ids"].shape[0]
            mask = torch.cat([torch.ones(batch, N, dtype=torch.long), x["attention_mask"]], dim=1)
            return ref.base_model(input_ids=x["input_ids"], attention_mask=mask, cache=ref.get_prompt(batch)).logits
        return ref(**x).logits


# ---------------------------------------------------------------- forward
@pytest.mark.parametrize("projection", [False, True], ids=["table", "projection"])
@pytest.mark.parametrize("name", [n for n in CASES if not n.endswith("_lively")])
def test_logits_match_peft(name, projection):
    ref, ours = pair(name, projection)
    x = inputs_for(name)
    expected = expected_logits(name, ref, x)
    with torch.no_grad():
        got = ours(**x).logits
        with ours.disable_adapter():
            base = ours(**x).logits
    assert max_diff(got, expected) <= 1e-5
    assert max_diff(base, got) > 1e-4  # the prefix does something


def test_inference_layout_matches_peft_inference_mode():
    """Loaded for inference, a projected prefix is a plain table in both libraries."""
    ref = peft.get_peft_model(tiny_llama(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                                                    prefix_projection=True, inference_mode=True))
    ours = get_peft_model(tiny_llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                                           prefix_projection=True, inference_mode=True))
    assert ours.adapter_modules["default"].transform is None
    ours.load_adapter_state_dict("default", peft.get_peft_model_state_dict(ref))
    x = inputs_for("llama")
    with torch.no_grad():
        assert max_diff(ours(**x).logits, ref(**x).logits) <= 1e-5


def test_gqa_uses_key_value_heads_like_peft():
    ref, ours = pair("llama")
    theirs, mine = ref.peft_config["default"], ours.peft_config["default"]
    assert (mine.token_dim, mine.num_attention_heads, mine.encoder_hidden_size) == (16, 2, 16)  # 2 kv heads x 8
    assert (theirs.token_dim, theirs.num_attention_heads) == (mine.token_dim, mine.num_attention_heads)


def test_encoder_decoder_layer_layout_matches_peft():
    """PEFT's seq2seq layout (decoder layer i reads rows 4i mod 2L): checked on an odd layer count, where it
    is a permutation rather than a plain order."""
    from transformers import AutoModelForSeq2SeqLM, T5Config

    def t5_three_layers():
        torch.manual_seed(0)
        return AutoModelForSeq2SeqLM.from_config(T5Config(
            d_model=32, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=3, num_heads=4, vocab_size=128,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()

    assert layer_rows(3, 2) == ((0, 1), (4, 5), (2, 3)) and layer_rows(2, 1) == ((0, 1), (2, 3))
    ref = peft.get_peft_model(t5_three_layers(), peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM",
                                                                         num_virtual_tokens=N))
    ours = get_peft_model(t5_three_layers(), PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N))
    ours.load_adapter_state_dict("default", peft.get_peft_model_state_dict(ref))
    theirs = ref.get_prompt(2)
    mine = ours.adapter_modules["default"].fill(None, ours.base_model, 2, torch.float32)
    for a, b in zip(theirs.self_attention_cache.layers, mine.self_attention_cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert mine.cross_attention_cache.get_seq_length() == 0
    x = inputs_for("t5")
    with torch.no_grad():
        assert max_diff(ours(**x).logits, ref(**x).logits) <= 1e-5


def test_projection_runs_once_per_forward_not_per_row():
    _, ours = pair("llama", projection=True)
    calls: list[tuple[int, ...]] = []
    ours.adapter_modules["default"].transform.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    ids = torch.randint(2, 128, (8, 5))
    ours(input_ids=ids)
    assert calls == [(N, 16)]


# ---------------------------------------------------------------- generation
@pytest.mark.parametrize("name", ["llama", "gpt2_lively", "t5_lively"])
def test_greedy_generate_matches_peft(name):
    ref, ours = pair(name)
    x = inputs_for(name)
    x.pop("decoder_input_ids", None)
    seq2seq = name == "t5_lively"
    steps = 6
    expected = greedy_by_forward(ref, x, steps, seq2seq=seq2seq)
    for use_cache in (True, False):
        got = ours.generate(**x, max_new_tokens=steps, do_sample=False, use_cache=use_cache)
        got = got[:, 1:] if seq2seq else got[:, x["input_ids"].shape[1]:]
        assert_same_tokens(got, expected, ours.base_model.generation_config.eos_token_id)
    with ours.disable_adapter():
        base = ours.generate(**x, max_new_tokens=steps, do_sample=False)
    assert not torch.equal(base, ours.generate(**x, max_new_tokens=steps, do_sample=False))


@pytest.mark.parametrize("name", ["llama", "t5_lively"])
def test_sampling_generate_cached_equals_uncached(name):
    _, ours = pair(name, projection=True)
    x = inputs_for(name)
    x.pop("decoder_input_ids", None)
    kwargs = {"max_new_tokens": 6, "do_sample": True, "top_p": 0.9, "num_return_sequences": 2}
    torch.manual_seed(5)
    cached = ours.generate(**x, **kwargs)
    torch.manual_seed(5)
    uncached = ours.generate(**x, **kwargs, use_cache=False)
    assert cached.shape[0] == 2 * x["input_ids"].shape[0]
    assert torch.equal(cached, uncached)


# ---------------------------------------------------------------- padding
@pytest.mark.parametrize("name", ["llama", "gpt2", "t5", "bert_cls", "llama_cls"])
def test_right_padded_batch_equals_rows_alone(name):
    _, ours = pair(name)
    ids, mask = padded_rows("right")
    extra = {"decoder_input_ids": torch.tensor([[0, 3, 4]] * len(PAD_ROWS))} if name == "t5" else {}
    with torch.no_grad():
        batch = ours(input_ids=ids, attention_mask=mask, **extra).logits
        for i, row in enumerate(PAD_ROWS):
            alone = ours(input_ids=torch.tensor([row]), **{k: v[i:i + 1] for k, v in extra.items()}).logits
            if name in ("llama", "gpt2"):
                assert max_diff(batch[i, : len(row)], alone[0]) <= 1e-5
            else:
                assert max_diff(batch[i], alone[0]) <= 1e-5


@pytest.mark.parametrize("name", ["llama", "gpt2_lively"])
def test_left_padded_generate_equals_rows_alone(name):
    _, ours = pair(name)
    ids, mask = padded_rows("left")
    got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for i, row in enumerate(PAD_ROWS):
        alone = ours.generate(input_ids=torch.tensor([row]), max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert got[i, ids.shape[1]:].tolist()[: alone.shape[1] - len(row)] == alone[0, len(row):].tolist()


# ---------------------------------------------------------------- training
@pytest.mark.parametrize("projection", [False, True], ids=["table", "projection"])
def test_training_lowers_loss_and_leaves_base_bit_identical(projection):
    base = tiny_gpt2_lively()
    before = clone_state(base)
    model = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                                    prefix_projection=projection))
    model.train()
    names = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert all(n.startswith("adapter_modules.default.") for n in names) and len(names) == (5 if projection else 1)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.3)
    ids = torch.tensor([[3, 9, 27, 81, 3, 9, 27, 81, 3, 9]] * 2)
    labels = torch.full_like(ids, 7)  # the toy task: always answer token 7, which only the prefix can teach
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert state_equal(before, clone_state(base))
    assert all(p.grad is None for p in base.parameters())


# ---------------------------------------------------------------- files
@pytest.mark.parametrize("name,projection", [("llama", False), ("llama", True), ("t5", False), ("gpt2", True),
                                             ("bert_cls", False)])
def test_files_load_both_ways(name, projection, tmp_path):
    ref, ours = pair(name, projection)
    factory, _, _ = CASES[name]
    x = inputs_for(name)
    with torch.no_grad():
        expected = ours(**x).logits
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "peft")
    assert_same_config_json(json.loads((tmp_path / "ours" / "adapter_config.json").read_text()),
                            json.loads((tmp_path / "peft" / "adapter_config.json").read_text()))
    from safetensors.torch import load_file

    ours_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert ours_file.keys() == peft_file.keys()
    assert all(max_diff(ours_file[k], peft_file[k]) <= 1e-6 for k in ours_file)  # the MLP output, if projected
    loaded_by_ours = PeftModel.from_pretrained(factory(), tmp_path / "peft")
    with torch.no_grad():
        assert max_diff(loaded_by_ours(**x).logits, expected) <= 1e-5
        if not name.endswith("_cls"):  # PEFT cannot run prefix tuning on classifiers with transformers 5.24
            loaded_by_peft = peft.PeftModel.from_pretrained(factory(), tmp_path / "ours")
            assert max_diff(loaded_by_peft(**x).logits, expected) <= 1e-5
        else:
            loaded_by_peft = peft.PeftModel.from_pretrained(factory(), tmp_path / "ours")
            assert max_diff(expected_logits(name, loaded_by_peft, x), expected) <= 1e-5


def test_projected_prefix_cannot_resume_as_an_mlp(tmp_path):
    _, ours = pair("llama", projection=True)
    ours.save_pretrained(tmp_path)
    base = tiny_llama()
    before = clone_state(base)
    with pytest.raises(CheckpointError, match="is_trainable=False"):
        PeftModel.from_pretrained(base, tmp_path, is_trainable=True)
    assert state_equal(before, clone_state(base))
    again = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True,
                                      config=PrefixTuningConfig.from_pretrained(tmp_path).replace(
                                          prefix_projection=False))
    assert [n for n, p in again.named_parameters() if p.requires_grad] == ["adapter_modules.default.embedding.weight"]


# ---------------------------------------------------------------- configs and errors
def test_config_is_completed_in_a_copy_and_zero_init():
    config = PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=2, init_weights="zero")
    model = get_peft_model(tiny_t5(), config)
    assert config.num_layers is None and config.token_dim is None
    stored = model.peft_config["default"]
    assert (stored.num_layers, stored.token_dim, stored.num_attention_heads, stored.num_transformer_submodules,
            stored.encoder_hidden_size) == (2, 32, 4, 2, 32)
    assert not model.adapter_modules["default"].embedding.weight.any()
    with pytest.raises(ConfigError, match="init_weights"):
        PrefixTuningConfig(num_virtual_tokens=2, init_weights="ones")


def test_errors_name_the_culprit_and_the_fix():
    with pytest.raises(ConfigError, match="num_virtual_tokens is not set"):
        get_peft_model(tiny_llama(), PrefixTuningConfig())  # PEFT's habit: built first, filled later
    with pytest.raises(ConfigError, match="2 heads of width 8"):
        get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=2, token_dim=32, num_attention_heads=4))
    with pytest.raises(ConfigError, match="num_layers=5"):
        get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=2, num_layers=5))
    checkpointed = tiny_llama()
    checkpointed.gradient_checkpointing_enable()
    with pytest.raises(ConfigError, match="gradient_checkpointing_disable"):
        get_peft_model(checkpointed, PrefixTuningConfig(num_virtual_tokens=2))

    class NoCache(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = tiny_llama()
            self.config = self.inner.config

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=input_ids).logits

    with pytest.raises(TargetError, match=r"NoCache\.forward takes no `cache`"):
        AdaptedModel(NoCache(), PrefixTuningConfig(num_virtual_tokens=2))


def test_refuses_what_it_cannot_do():
    model = AdaptedModel(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=2))
    x = inputs_for("llama")
    with pytest.raises(AdapterError, match="2D padding"):
        model(input_ids=x["input_ids"], attention_mask=torch.ones(2, 1, 7, 7))
    from peft_core import PromptTuningConfig

    model.add_adapter("prompt", PromptTuningConfig(num_virtual_tokens=2))
    model.set_adapter(["default", "prompt"])
    with pytest.raises(AdapterError, match="one prompt or prefix adapter at a time"):
        model(**x)


def test_caller_positions_and_masks_that_count_the_prefix():
    """Positions the caller gives count its own tokens (moved by n); a mask that already covers the prefix
    is taken as is."""
    _, ours = pair("llama")
    x = inputs_for("llama")
    with torch.no_grad():
        plain = ours(**x).logits
        positioned = ours(**x, position_ids=torch.arange(7)[None]).logits
        full_mask = ours(input_ids=x["input_ids"], attention_mask=torch.ones(2, N + 7, dtype=torch.long)).logits
    assert max_diff(plain, positioned) <= 1e-6 and max_diff(plain, full_mask) <= 1e-6
