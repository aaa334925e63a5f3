"""B9: QLoRA — LoRA on a 4-bit (nf4, bf16 compute) base — against bf16 LoRA and Hugging Face PEFT's QLoRA.

One llama from config is saved once and loaded three ways: nf4 with bf16 compute under peft-core and under
PEFT (the same adapter weights, copied through the file format), and plain bf16 under peft-core. Rows:

- weight memory (parameters and buffers as stored: packed 4-bit weights count their bytes);
- training-step memory: weights + saved activations (autograd's saved tensors, each storage once) +
  gradients and AdamW state of the trainable parameters — what a step holds at its peak, by construction;
- step time (forward, backward, AdamW), the sides alternating round by round.
"""

from __future__ import annotations

import tempfile
import warnings
from typing import Any

import torch
from torch import nn

from .b1_training import step_fn
from .common import Context, SavedActivations, Target, alternate, build_llama, fmt_bytes, fmt_s, rel_err, token_batch

LORA = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", "init_lora_weights": False}


def _stored_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def _optimizer_bytes(model: nn.Module) -> int:
    # gradient + AdamW's two moments, in the parameters' dtype
    return sum(3 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def _saved_bytes(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    with SavedActivations(model) as saved:
        loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return saved.nbytes


def _load(folder: str, quantized: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw: dict[str, Any] = {"dtype": torch.bfloat16}
    if quantized:
        kw = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                        bnb_4bit_compute_dtype=torch.bfloat16),
              "device_map": {"": "cpu"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(folder, **kw)


def run_b9(ctx: Context, rounds: int) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        ctx.row("nf4 QLoRA", "train step", "not installed", "", status="skipped",
                note=f"bitsandbytes is not installed ({e}); pip install 'peft-core[bnb]'")
        return
    import peft
    import peft_core

    scale = ctx.scale
    batch = token_batch(scale, batch=2, seq=min(scale.seq, 128))
    seq = batch["input_ids"].shape[1]
    tag = f"llama hidden {scale.hidden}, {scale.layers} layers, nf4 bf16 compute, all-linear r=16, batch 2 x seq {seq}"
    with ctx.case(tag), tempfile.TemporaryDirectory(prefix="b9-") as folder:
        build_llama(scale).save_pretrained(folder)
        theirs = peft.get_peft_model(peft.prepare_model_for_kbit_training(_load(folder, True), False),
                                     peft.LoraConfig(**LORA))
        ours = peft_core.get_peft_model(peft_core.prepare_model_for_kbit_training(_load(folder, True), False),
                                        peft_core.LoraConfig(**LORA))
        ours.load_adapter_state_dict("default", {k: v.detach().clone()
                                                 for k, v in peft.get_peft_model_state_dict(theirs).items()})
        bf16 = peft_core.get_peft_model(_load(folder, False), peft_core.LoraConfig(**LORA))
        bf16.load_adapter_state_dict("default", ours.get_adapter_state_dict())
        sides = {"peft-core QLoRA": ours, "peft QLoRA": theirs, "peft-core bf16 LoRA": bf16}
        for m in sides.values():
            m.train()
        ctx.agree(f"{tag}: train loss vs peft", rel_err(ours(**batch, labels=batch["input_ids"]).loss,
                                                         theirs(**batch, labels=batch["input_ids"]).loss), 2e-2)
        weights = {k: _stored_bytes(m) for k, m in sides.items()}
        step_mem = {k: weights[k] + _saved_bytes(m, batch) + _optimizer_bytes(m) for k, m in sides.items()}
        ctx.row(tag, "weight memory", fmt_bytes(weights["peft-core QLoRA"]), fmt_bytes(weights["peft QLoRA"]),
                "peft QLoRA", ratio=weights["peft-core QLoRA"] / weights["peft QLoRA"], target=Target.at_most(1.0))
        ctx.row(tag, "weight memory", fmt_bytes(weights["peft-core QLoRA"]), fmt_bytes(weights["peft-core bf16 LoRA"]),
                "bf16 LoRA", ratio=weights["peft-core QLoRA"] / weights["peft-core bf16 LoRA"])
        ctx.row(tag, "training-step memory", fmt_bytes(step_mem["peft-core QLoRA"]),
                fmt_bytes(step_mem["peft QLoRA"]), "peft QLoRA",
                ratio=step_mem["peft-core QLoRA"] / step_mem["peft QLoRA"], target=Target.at_most(1.0),
                note="weights + saved activations + grads/AdamW state")
        ctx.row(tag, "training-step memory", fmt_bytes(step_mem["peft-core QLoRA"]),
                fmt_bytes(step_mem["peft-core bf16 LoRA"]), "bf16 LoRA",
                ratio=step_mem["peft-core QLoRA"] / step_mem["peft-core bf16 LoRA"])
        steps = {k: step_fn("peft-core" if "peft-core" in k else "peft", m, batch) for k, m in sides.items()}
        t = alternate(steps, rounds=rounds, warmup=scale.warmup)
        ctx.row(tag, "train step", fmt_s(t.median("peft-core QLoRA")), fmt_s(t.median("peft QLoRA")), "peft QLoRA",
                ratio=t.ratio("peft-core QLoRA", "peft QLoRA"), spread=t.spread("peft-core QLoRA", "peft QLoRA"),
                target=Target.at_most(1.0))
        ctx.row(tag, "train step", fmt_s(t.median("peft-core QLoRA")), fmt_s(t.median("peft-core bf16 LoRA")),
                "bf16 LoRA", ratio=t.ratio("peft-core QLoRA", "peft-core bf16 LoRA"),
                spread=t.spread("peft-core QLoRA", "peft-core bf16 LoRA"))
