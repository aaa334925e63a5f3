"""QLoRA: LoRA on quantized base models (bitsandbytes 4-bit and 8-bit, torchao int8), against Hugging Face PEFT.

Tiny llama and OPT models are saved from configs and reloaded quantized on the CPU (bitsandbytes 0.50 runs
there). The quantized layers are taught to LoRA by the ``lora_quantized`` extension plugin, through LoRA's
``lora_make_layer`` hook.
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from conftest import model_inputs
from peft_core import (
    LoraConfig,
    PeftModel,
    TargetError,
    get_peft_model,
    get_registry,
    prepare_model_for_kbit_training,
)
from safetensors.torch import load_file
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

# bitsandbytes' CPU kernels work in blocks of 64 input features: hidden sizes of 64 and up
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                              max_position_embeddings=128, pad_token_id=0),
    "opt": lambda: transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                          vocab_size=128, max_position_embeddings=128, word_embed_proj_dim=64,
                                          pad_token_id=1),
}
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "opt": ["q_proj", "v_proj", "fc2"]}
KINDS = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32},
    "fp4-dq-bf16": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True,
                    "bnb_4bit_compute_dtype": torch.bfloat16},
    "int8": {"load_in_8bit": True},
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized-bases")
    for name, config in CONFIGS.items():
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(config()).save_pretrained(root / name)
    return root


def load(saved, name: str, kind: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "torchao-int8":
            from torchao.quantization import Int8WeightOnlyConfig
            from transformers import TorchAoConfig

            qc = TorchAoConfig(quant_type=Int8WeightOnlyConfig())
        else:
            qc = transformers.BitsAndBytesConfig(**KINDS[kind])
        model = transformers.AutoModelForCausalLM.from_pretrained(saved / name, quantization_config=qc,
                                                                  device_map={"": "cpu"})
    return model.eval()


def pair(saved, name: str, kind: str, **kw):
    """peft-core and PEFT on two loads of the same quantized model, with the same (non-zero) adapter."""
    cfg = {"target_modules": TARGETS[name], "r": 4, "lora_alpha": 8, "init_lora_weights": False, **kw}
    ours = get_peft_model(load(saved, name, kind), LoraConfig(**cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(load(saved, name, kind), peft.LoraConfig(**cfg))
    peft.set_peft_model_state_dict(theirs, {k: v.clone() for k, v in ours.get_adapter_state_dict().items()})
    return ours, theirs


def logits(model: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    """Eval logits without autograd. bitsandbytes' CPU 4-bit matmul takes another route (and converts its
    scales to bf16, for good) on the first forward whose input does not require grad, so comparing a model
    with trainable adapters against one without would compare two kernels: every comparison runs here."""
    with torch.no_grad():
        return model(**x).logits


def tol(kind: str) -> float:
    # with a bf16 compute dtype the base layers compute in bf16; PEFT runs the LoRA branch in fp32, we in the
    # activation dtype: rounding-level differences
    return 2e-2 if "bf16" in kind else 1e-5


def quantized_bytes(model: nn.Module) -> dict[str, bytes]:
    out = {}
    for n, p in model.named_parameters():
        if p.dtype in (torch.uint8, torch.int8) or type(p).__name__ in ("Params4bit", "Int8Params"):
            out[n.replace("base_model.model.", "")] = p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    return out


KIND_LIST = ["nf4", "fp4-dq-bf16", "int8"]


def test_the_extension_is_an_installed_plugin():
    records = {r.name: r for r in get_registry().extensions()}
    assert "lora_quantized" in records and records["lora_quantized"].distribution == "peft-core"


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("kind", KIND_LIST)
def test_logits_match_peft_on_a_quantized_base(saved, name, kind):
    ours, theirs = pair(saved, name, kind)
    x = model_inputs(name)
    a, b = logits(ours, x), logits(theirs, x)
    assert (a - b).abs().max() <= tol(kind) * max(1.0, b.abs().max().item())
    with ours.disable_adapter():
        base = logits(ours, x)
    assert (a - base).abs().max() > 10 * tol(kind)  # the adapter really acts
    kinds = {type(m).__name__ for m in ours.modules() if hasattr(m, "lora_A")}
    assert kinds == {"LoraLinear8bitLt" if kind == "int8" else "LoraLinear4bit"}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_files_load_both_ways(saved, tmp_path, name, kind):
    ours, theirs = pair(saved, name, kind)
    x = model_inputs(name)
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    from_peft = PeftModel.from_pretrained(load(saved, name, kind), tmp_path / "peft")
    assert (logits(from_peft, x) - logits(theirs, x)).abs().max() <= 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_ours = peft.PeftModel.from_pretrained(load(saved, name, kind), tmp_path / "ours")
    assert (logits(from_ours, x) - logits(ours, x)).abs().max() <= 1e-5


def test_auto_peft_model_loads_a_quantized_base_and_its_adapter(saved, tmp_path):
    from peft_core import AutoPeftModelForCausalLM

    ours, _ = pair(saved, "llama", "nf4")
    ours.save_pretrained(tmp_path)  # base_model_name_or_path: the quantized model's folder
    qc = transformers.BitsAndBytesConfig(**KINDS["nf4"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path, quantization_config=qc, device_map={"": "cpu"})
    assert {type(m).__name__ for m in auto.modules() if hasattr(m, "lora_A")} == {"LoraLinear4bit"}
    x = model_inputs("llama")
    assert (logits(auto, x) - logits(ours, x)).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", KIND_LIST)
def test_training_lowers_the_loss_and_leaves_quantized_weights_bit_identical(saved, kind):
    model = prepare_model_for_kbit_training(load(saved, "llama", kind), use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(target_modules=TARGETS["llama"], r=4, lora_alpha=8))
    before = quantized_bytes(model)
    assert before
    ids = model_inputs("llama", batch=4, seq=12)["input_ids"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses
    assert quantized_bytes(model) == before
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("kind", KIND_LIST)
def test_merge_and_unload_matches_peft_and_unmerge_is_exact(saved, kind):
    # a trained-sized update (scaling 1/8): requantising W + delta rounds it like any quantized weight
    ours, theirs = pair(saved, "llama", kind, lora_alpha=0.5)
    x = model_inputs("llama")
    unmerged = logits(ours, x)
    before = quantized_bytes(ours)
    ours.merge_adapter()
    merged = logits(ours, x)
    ours.unmerge_adapter()
    assert quantized_bytes(ours) == before  # exact: the original quantized weights are back
    assert torch.equal(logits(ours, x), unmerged)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        their_merged = logits(theirs.merge_and_unload(), x)
    # PEFT's own merged-vs-unmerged gap (the requantisation's rounding) is the yardstick
    their_gap = (their_merged - unmerged).abs().max().item()
    our_gap = (merged - unmerged).abs().max().item()
    assert our_gap <= 2 * their_gap + 1e-4, (our_gap, their_gap)
    assert (merged - their_merged).abs().max() <= our_gap + their_gap + 1e-5
    plain = ours.merge_and_unload()
    assert not any("lora_" in n for n, _ in plain.named_parameters())
    assert (logits(plain, x) - merged).abs().max() <= 1e-5


def test_several_adapters_mixed_batches_disable_and_unload(saved):
    base = load(saved, "llama", "nf4")
    reference = logits(base, model_inputs("llama"))
    model = get_peft_model(base, LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False, r=2))
    x = model_inputs("llama")
    with torch.no_grad():
        mixed = model(**x, adapter_names=["default", "b"]).logits
    rows = []
    for i, name in enumerate(["default", "b"]):
        model.set_adapter(name)
        rows.append(logits(model, {k: v[i:i + 1] for k, v in x.items()}))
    assert (mixed - torch.cat(rows)).abs().max() <= 1e-5
    with model.disable_adapter():
        assert torch.equal(logits(model, x), reference)
    assert torch.equal(logits(model.unload(), x), reference)


def test_torchao_int8_weights_match_peft_and_train(saved):
    pytest.importorskip("torchao")
    ours, theirs = pair(saved, "llama", "torchao-int8")
    x = model_inputs("llama")
    assert (logits(ours, x) - logits(theirs, x)).abs().max() <= 1e-5
    assert {type(m).__name__ for m in ours.modules() if hasattr(m, "lora_A")} == {"LoraTorchaoLinear"}
    ours.train()
    ids = x["input_ids"]
    ours(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in ours.named_parameters() if p.requires_grad)
    ours.eval()
    before = logits(ours, x)
    ours.merge_adapter()
    assert (logits(ours, x) - before).abs().max() <= 5e-2
    ours.unmerge_adapter()
    assert torch.equal(logits(ours, x), before)


def test_prepare_model_for_kbit_training_like_peft(saved):
    ours = prepare_model_for_kbit_training(load(saved, "llama", "nf4"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.prepare_model_for_kbit_training(load(saved, "llama", "nf4"))
    assert not any(p.requires_grad for p in ours.parameters())
    assert {n: p.dtype for n, p in ours.named_parameters()} == {n: p.dtype for n, p in theirs.named_parameters()}
    assert ours.is_gradient_checkpointing and theirs.is_gradient_checkpointing
    # checkpointed blocks over a frozen base still give LoRA its gradients (the input embeddings require grad)
    model = get_peft_model(ours, LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    model.train()
    ids = model_inputs("llama")["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_the_transformers_trainer_trains_a_quantized_model_with_adapters(saved, tmp_path):
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Rows(Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = (torch.arange(2, 14) + i) % 120 + 2
            return {"input_ids": ids, "labels": ids}

    base = prepare_model_for_kbit_training(load(saved, "llama", "nf4"), use_gradient_checkpointing=False)
    with pytest.raises(ValueError, match="purely quantized"):  # transformers' own check, before adapters
        Trainer(model=base, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True),
                train_dataset=Rows())
    model = get_peft_model(base, LoraConfig(target_modules=["q_proj", "v_proj"]))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, report_to=[],
                             use_cpu=True, learning_rate=1e-2, save_strategy="no", disable_tqdm=True)
    before = {k: v.clone() for k, v in model.get_adapter_state_dict().items()}
    Trainer(model=model, args=args, train_dataset=Rows()).train()
    after = model.get_adapter_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in after)


class FakeGPTQLinear(nn.Module):
    """Stands for a GPTQ layer (PEFT adapts those; peft-core does not yet)."""

    def __init__(self) -> None:
        super().__init__()
        self.qweight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int32), requires_grad=False)


FakeGPTQLinear.__module__ = "auto_gptq.nn_modules.qlinear.qlinear_exllama"


def test_quantized_layer_types_not_supported_yet_are_a_clear_target_error():
    net = nn.Sequential()
    net.add_module("proj", FakeGPTQLinear())
    with pytest.raises(TargetError, match=r"'proj' is a auto_gptq.*FakeGPTQLinear \(GPTQ.*not support yet"):
        get_peft_model(net, LoraConfig(target_modules=["proj"]))
    assert type(net.proj) is FakeGPTQLinear


def test_without_the_extension_a_quantized_layer_says_what_to_install(saved, monkeypatch):
    from peft_core.registry import reset_registry

    monkeypatch.setenv("PEFT_CORE_PLUGINS", "lora")
    try:
        reset_registry()
        model = load(saved, "llama", "nf4")
        with pytest.raises(TargetError, match=r"Linear4bit.*peft-core\[bnb\]"):
            get_peft_model(model, LoraConfig(target_modules=["q_proj"]))
    finally:
        monkeypatch.delenv("PEFT_CORE_PLUGINS")
        reset_registry()


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_dora_on_a_quantized_base_matches_peft_and_merges(saved, kind, tmp_path):
    """QDoRA: the magnitude and norms come from the dequantized weight, as in PEFT.

    int8: equal to PEFT. nf4: PEFT is no oracle on a CPU. After the first forward without grad, bitsandbytes'
    CPU path stores the 4-bit scales in bf16, and PEFT's DoRA then dequantizes a weight 0.13 away from the one
    the kernel uses. So each layer is checked against the formula on the dequantized weight instead."""
    torch.manual_seed(0)  # the adapter's draws, whatever ran before in this process
    # a trained-sized update (scaling 1/8), as in the plain merge test: requantising rounds it like any weight
    ours, theirs = pair(saved, "llama", kind, use_dora=True, lora_alpha=0.5)
    assert any("lora_magnitude_vector" in n for n, _ in ours.named_parameters())
    x = model_inputs("llama")
    expected = logits(theirs, x) if kind == "int8" else logits(ours, x)
    if kind == "int8":
        assert (logits(ours, x) - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max().item())
    else:
        layer = ours.get_base_model().model.layers[0].self_attn.q_proj
        h = torch.randn(2, 3, layer.in_features)
        with torch.no_grad():
            w, a, b = layer.dense_weight(), layer.lora_A["default"].weight, layer.lora_B["default"].weight
            s = layer.scaling["default"]
            f = layer.lora_magnitude_vector["default"].weight / (w + s * b @ a).norm(dim=1)
            by_hand = f * (layer.base_layer(h) + s * (h @ a.t() @ b.t()))
            assert (layer(h) - by_hand).abs().max() <= 1e-5
    unmerged = logits(ours, x)
    before = quantized_bytes(ours)
    ours.merge_adapter()
    # requantized after the merge, as in PEFT: within quantization error of the unmerged output
    assert (logits(ours, x) - unmerged).abs().max() <= 0.1 * max(1.0, unmerged.abs().max().item())
    ours.unmerge_adapter()
    assert quantized_bytes(ours) == before
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    assert load_file(tmp_path / "ours" / "adapter_model.safetensors").keys() == load_file(
        tmp_path / "theirs" / "adapter_model.safetensors").keys()
    reloaded = PeftModel.from_pretrained(load(saved, "llama", kind), tmp_path / "ours")
    assert (logits(reloaded, x) - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max().item())
