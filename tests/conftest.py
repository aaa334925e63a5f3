"""Tiny models built from configs (no downloads) and helpers shared by the tests."""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*")

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")
SST2 = os.path.abspath(os.path.join(SHARED, "data", "sst2"))


@pytest.fixture(autouse=True)
def _grad_mode_restored():
    """A test that switches grad mode off globally and then fails must not leave every later test of its worker
    without autograd (one quicktour failure once turned into six unrelated 'does not require grad' errors)."""
    enabled = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(enabled)


def _seeded(fn: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build(seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return fn().eval()
    return build


@_seeded
def tiny_llama() -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    return AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=128, pad_token_id=0))


@_seeded
def tiny_llama_cls() -> nn.Module:
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    return AutoModelForSequenceClassification.from_config(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=128, pad_token_id=0, num_labels=2))


@_seeded
def tiny_gpt2() -> nn.Module:
    from transformers import AutoModelForCausalLM, GPT2Config

    return AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128,
                                                       n_positions=128))


@_seeded
def tiny_t5() -> nn.Module:
    from transformers import AutoModelForSeq2SeqLM, T5Config

    return AutoModelForSeq2SeqLM.from_config(T5Config(
        d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=128,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


@_seeded
def tiny_bert_cls() -> nn.Module:
    from transformers import AutoModelForSequenceClassification, BertConfig

    return AutoModelForSequenceClassification.from_config(BertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
        max_position_embeddings=128, num_labels=2))


@_seeded
def tiny_opt() -> nn.Module:
    from transformers import AutoModelForCausalLM, OPTConfig

    return AutoModelForCausalLM.from_config(OPTConfig(
        hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
        max_position_embeddings=128, word_embed_proj_dim=32, pad_token_id=1))


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "t5": tiny_t5, "bert": tiny_bert_cls, "opt": tiny_opt}


def model_inputs(name: str, batch: int = 2, seq: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 128, (batch, seq), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if name == "t5":
        inputs["decoder_input_ids"] = torch.randint(2, 128, (batch, 5), generator=g)
    return inputs


def state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def module_tree(model: nn.Module) -> list[tuple[str, str]]:
    return [(n, type(m).__name__) for n, m in model.named_modules()]


def copy_adapter_weights(src_peft: nn.Module, dst_core: nn.Module, adapter: str = "default") -> int:
    """Copy every adapter tensor from a Hugging Face peft model into ours, through the file format."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(src_peft, adapter_name=adapter)
    dst_core.load_adapter_state_dict(adapter, {k: v.clone() for k, v in sd.items()})
    return len(sd)


@pytest.fixture
def fresh_registry():
    """A registry rebuilt from entry points, restored to a fresh one after the test."""
    from peft_core.registry import reset_registry

    reg = reset_registry()
    yield reg
    reset_registry()


__all__ = ["MODELS", "SST2", "clone_state", "copy", "copy_adapter_weights", "model_inputs", "module_tree",
           "state_equal"]


# ---------------------------------------------------------------- prompt learning (prompt/prefix tuning) helpers
@_seeded
def tiny_gpt2_lively() -> nn.Module:
    """tiny_gpt2 with a larger init: the default one greedily repeats its last token whatever the prompt,
    which would make generation tests pass vacuously."""
    from transformers import AutoModelForCausalLM, GPT2Config

    return AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128,
                                                       n_positions=128, initializer_range=0.5))


@_seeded
def tiny_t5_lively() -> nn.Module:
    """tiny_t5 with a larger init, for the same reason as tiny_gpt2_lively."""
    from transformers import AutoModelForSeq2SeqLM, T5Config

    return AutoModelForSeq2SeqLM.from_config(T5Config(
        d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=128,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, initializer_factor=5.0))


def greedy_by_forward(model: nn.Module, inputs: dict[str, torch.Tensor], steps: int,
                      seq2seq: bool = False) -> torch.Tensor:
    """Greedy decoding with one full forward per token (no KV cache): the reference for ``generate()``.

    Returns the new tokens only (batch, steps). Rows must not be padded.
    """
    inputs = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
    start = getattr(model.config, "decoder_start_token_id", 0) or 0
    batch = inputs["input_ids"].shape[0]
    new = torch.empty(batch, 0, dtype=torch.long)
    with torch.no_grad():
        for _ in range(steps):
            if seq2seq:
                dec = torch.cat([torch.full((batch, 1), start, dtype=torch.long), new], dim=1)
                logits = model(**inputs, decoder_input_ids=dec).logits
            else:
                ids = torch.cat([inputs["input_ids"], new], dim=1)
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            new = torch.cat([new, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return new


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.detach().float() - b.detach().float()).abs().max().item()


#: Two rows of different lengths, for padded-batch tests.
PAD_ROWS = [[5, 6, 7, 8, 9], [11, 12, 13]]


def padded_rows(side: str, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """PAD_ROWS as one batch padded on ``side`` ("left" or "right"): (input_ids, attention_mask)."""
    width = max(map(len, PAD_ROWS))
    ids = torch.full((len(PAD_ROWS), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(PAD_ROWS):
        cols = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[i, cols] = torch.tensor(row)
        mask[i, cols] = 1
    return ids, mask


def assert_same_tokens(got: torch.Tensor, expected: torch.Tensor, eos: int | None) -> None:
    """Row by row up to the first end-of-sequence token (generate stops there, greedy_by_forward does not)."""
    for g, e in zip(got.tolist(), expected.tolist()):
        stop = e.index(eos) + 1 if eos is not None and eos in e else len(e)
        assert g[:stop] == e[:stop]


def assert_same_config_json(ours: dict, theirs: dict) -> None:
    """Same adapter_config.json fields and values, but for peft_version; PEFT lists the task heads of
    modules_to_save twice for prompt methods, so that field is compared as a set."""
    assert set(ours) == set(theirs)
    for key in ours:
        if key == "peft_version":
            continue
        if key == "modules_to_save" and ours[key] is not None:
            assert set(ours[key]) == set(theirs[key])
        else:
            assert ours[key] == theirs[key], key
