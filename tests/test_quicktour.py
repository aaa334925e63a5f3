"""The quicktour end to end, the PEFT-compatible public API, and the mt0-large headline."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import model_inputs, tiny_bert_cls, tiny_t5

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_public_names():
    import peft_core

    for name in ["LoraConfig", "PromptTuningConfig", "PrefixTuningConfig", "TaskType", "PeftConfig", "PeftModel",
                 "get_peft_model", "PeftModelForCausalLM", "PeftModelForSeq2SeqLM",
                 "PeftModelForSequenceClassification", "PeftModelForTokenClassification",
                 "PeftModelForQuestionAnswering", "PeftModelForFeatureExtraction", "AutoPeftModel",
                 "AutoPeftModelForCausalLM", "AutoPeftModelForSeq2SeqLM", "AutoPeftModelForSequenceClassification",
                 "AutoPeftModelForTokenClassification", "AutoPeftModelForQuestionAnswering",
                 "AutoPeftModelForFeatureExtraction", "AdaptedModel"]:
        if name in ("PromptTuningConfig", "PrefixTuningConfig"):
            continue  # provided by their plugins; tested with them
        assert getattr(peft_core, name) is not None, name


def test_mt0_large_headline_on_meta_device():
    """The quicktour's printed line, on mt0-large's exact shape built on the meta device."""
    from peft_core import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSeq2SeqLM, MT5Config

    config = MT5Config(vocab_size=250112, d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_decoder_layers=24,
                       num_heads=16, feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        model = AutoModelForSeq2SeqLM.from_config(config)
        # mt0-large: encoder and decoder share the embedding; the lm_head has its own weights
        model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.shared.weight))
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, inference_mode=False, r=8,
                                             lora_alpha=32, lora_dropout=0.1))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        model.print_trainable_parameters()
    assert buf.getvalue() == "trainable params: 2,359,296 || all params: 1,231,940,608 || trainable%: 0.1915\n"
    assert all(p.is_meta for p in model.parameters())


def test_quicktour_code_on_tiny_t5(tmp_path):
    from peft_core import AutoPeftModelForSeq2SeqLM, LoraConfig, PeftConfig, PeftModel, TaskType, get_peft_model
    from transformers import AutoModelForSeq2SeqLM

    base_dir = tmp_path / "base"
    tiny_t5().save_pretrained(base_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(base_dir)
    peft_config = LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, inference_mode=False, r=8, lora_alpha=32,
                             lora_dropout=0.1)
    model = get_peft_model(model, peft_config)
    assert peft_config.base_model_name_or_path is None  # the user's config is not mutated
    model.train()
    x = model_inputs("t5")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(**x, labels=x["decoder_input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    torch.set_grad_enabled(False)  # same attention kernels everywhere (SDPA picks by grad mode)
    expected = model(**x).logits
    generated = model.generate(input_ids=x["input_ids"], attention_mask=x["attention_mask"], max_new_tokens=5,
                               do_sample=False)
    model.save_pretrained(tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(base_dir) and saved["task_type"] == "SEQ_2_SEQ_LM"
    config = PeftConfig.from_pretrained(tmp_path / "adapter")
    assert config.peft_type == "LORA" and config.r == 8
    reloaded = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(config.base_model_name_or_path),
                                         tmp_path / "adapter")
    assert type(reloaded).__name__ == "PeftModelForSeq2SeqLM"
    assert torch.equal(reloaded(**x).logits, expected), (reloaded(**x).logits - expected).abs().max()
    auto = AutoPeftModelForSeq2SeqLM.from_pretrained(tmp_path / "adapter")
    assert torch.equal(auto(**x).logits, expected)
    assert torch.equal(auto.generate(input_ids=x["input_ids"], attention_mask=x["attention_mask"], max_new_tokens=5,
                                     do_sample=False), generated)
    assert not any(p.requires_grad for p in auto.parameters())
    torch.set_grad_enabled(True)
    trainable = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(base_dir), tmp_path / "adapter",
                                          is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_sequence_classification_trains_and_saves_its_head(tmp_path):
    from peft_core import AutoPeftModel, LoraConfig, TaskType, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    tiny_bert_cls().save_pretrained(tmp_path / "base")
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=4)
    model = get_peft_model(base, config)
    assert config.modules_to_save is None
    assert set(model.peft_config["default"].modules_to_save) == {"classifier", "score"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"base_model.classifier.modules_to_save.default.weight",
            "base_model.classifier.modules_to_save.default.bias"} <= trainable
    with torch.no_grad():
        model.base_model.classifier.modules_to_save["default"].weight.add_(1.0)
    model.save_pretrained(tmp_path / "adapter")
    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    x = model_inputs("bert")
    auto = AutoPeftModel.from_pretrained(tmp_path / "adapter")
    assert type(auto).__name__ == "PeftModelForSequenceClassification"
    model.eval()
    with torch.no_grad():  # same attention kernels on both sides
        assert torch.equal(auto(**x).logits, model(**x).logits)


def test_push_to_hub_uploads_what_save_pretrained_writes():
    from peft_core import LoraConfig, get_peft_model

    class FakeApi:
        def __init__(self):
            self.calls = []

        def create_repo(self, repo_id, private=None, exist_ok=False):
            self.calls.append(("create_repo", repo_id, exist_ok))

        def upload_folder(self, repo_id, folder_path, commit_message, revision=None):
            self.calls.append(("upload_folder", repo_id, sorted(os.listdir(folder_path)), commit_message))
            return "commit-url"

    api = FakeApi()
    model = get_peft_model(tiny_t5(), LoraConfig(task_type="SEQ_2_SEQ_LM"))
    assert model.push_to_hub("me/my-adapter", api=api) == "commit-url"
    assert api.calls == [("create_repo", "me/my-adapter", True),
                         ("upload_folder", "me/my-adapter", ["adapter_config.json", "adapter_model.safetensors"],
                          "Upload adapter with peft-core")]


def test_hub_ids_resolve_through_the_hub_cache(tmp_path, monkeypatch):
    """A repo id is downloaded with huggingface_hub (here: served from a prepared cache, offline)."""
    from peft_core import LoraConfig, PeftConfig, get_peft_model

    model = get_peft_model(tiny_t5(), LoraConfig(task_type="SEQ_2_SEQ_LM"))
    model.save_pretrained(tmp_path / "src")
    cache = tmp_path / "cache" / "models--me--adapter"
    snap = cache / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("a" * 40)
    for f in os.listdir(tmp_path / "src"):
        (snap / f).write_bytes((tmp_path / "src" / f).read_bytes())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = PeftConfig.from_pretrained("me/adapter", cache_dir=str(tmp_path / "cache"))
    assert config.peft_type == "LORA"
    from peft_core import CheckpointError

    with pytest.raises(CheckpointError, match=r"offline|cache"):
        PeftConfig.from_pretrained("me/not-cached", cache_dir=str(tmp_path / "cache"))


@pytest.mark.slow
def test_readme_demo_runs():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "quicktour.py"), "--epochs", "3"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "trainable params:" in out.stdout and "identical generations" in out.stdout
