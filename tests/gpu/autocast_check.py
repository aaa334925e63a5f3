"""Mixed precision on CUDA: what tests/test_autocast.py checks on CPU, under bf16 and fp16 autocast on a GPU.

For a maintainer with a GPU (not collected by pytest; needs no download; well under 2 minutes)::

    python tests/gpu/autocast_check.py          # one CUDA device; exits 0 with a message when there is none
    python tests/gpu/autocast_check.py --cpu    # the same checks on CPU (CPU autocast, bf16 and fp16)

Each case builds a tiny model twice, wraps it with peft-core and with Hugging Face PEFT (the oracle) holding
the SAME adapter weights, runs the forward under ``torch.autocast(device, dtype)`` and the backward outside
it (as the Trainer and Accelerate do), and compares loss, logits and the adapter's gradients. fp16 runs the
backward through ``torch.amp.GradScaler``, as fp16 training must (tiny gradients underflow fp16 otherwise).
Cases: LoRA on Linear (llama q/v, dropout 0 and 0.1), on Conv1D (gpt2 c_attn), on Embedding; prompt tuning;
prefix tuning with and without the projection; a LoRA mixed batch (``adapter_names``). With LoRA dropout in
train mode no two libraries draw the same mask: that case checks finite, non-zero gradients only.

One PASS/FAIL line per case, with its numbers; exit status 1 if any case failed.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")  # transformers' deprecation notices would bury the one line per case

#: bf16 rounds to 2**-9 relative, fp16 to 2**-12: tolerances for the tiny models' loss (~4.9) and logits
LOSS_TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}
LOGIT_TOL = {torch.bfloat16: 5e-2, torch.float16: 1e-2}
#: relative norm of the gradient difference: rounding through every half-precision layer of the backward.
#: The bound used is the larger of this and 2.5x PEFT's own distance from fp32 (what two implementations
#: each within 1.5x of that distance may differ by): all-linear LoRA in bf16 measures ~0.15 on CPU
GRAD_TOL = 0.2
N_VIRTUAL = 3
LORA = {"r": 4, "lora_alpha": 16, "init_lora_weights": False}


def tiny_llama() -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=128, pad_token_id=0, attention_dropout=0.0))


def tiny_gpt2() -> nn.Module:
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    # the base model's own dropout off: the two libraries need not draw its masks alike
    return AutoModelForCausalLM.from_config(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256,
                                                       n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
                                                       attn_pdrop=0.0, bos_token_id=1, eos_token_id=1))


# case -> (model builder, method, config fields, LoRA dropout, mode)
CASES: dict[str, tuple[Callable[[], nn.Module], str, dict[str, Any], float, str]] = {
    "lora_linear p=0 train": (tiny_llama, "lora", {**LORA, "target_modules": ["q_proj", "v_proj"]}, 0.0, "train"),
    "lora_linear p=0.1 eval": (tiny_llama, "lora", {**LORA, "target_modules": ["q_proj", "v_proj"]}, 0.1, "eval"),
    "lora_linear p=0.1 train": (tiny_llama, "lora", {**LORA, "target_modules": ["q_proj", "v_proj"]}, 0.1, "train"),
    "lora_all_linear p=0 train": (tiny_llama, "lora", {**LORA, "target_modules": "all-linear"}, 0.0, "train"),
    "lora_conv1d p=0 train": (tiny_gpt2, "lora", {**LORA, "target_modules": ["c_attn"], "fan_in_fan_out": True},
                              0.0, "train"),
    "lora_embedding p=0.1 train": (tiny_llama, "lora", {**LORA, "target_modules": ["embed_tokens"]}, 0.1, "train"),
    "prompt train": (tiny_llama, "prompt", {"num_virtual_tokens": N_VIRTUAL}, 0.0, "train"),
    "prefix train": (tiny_llama, "prefix", {"num_virtual_tokens": N_VIRTUAL}, 0.0, "train"),
    "prefix_projection train": (tiny_llama, "prefix", {"num_virtual_tokens": N_VIRTUAL, "prefix_projection": True,
                                                       "encoder_hidden_size": 32}, 0.0, "train"),
}
results: list[tuple[str, bool, str]] = []


def configs(method: str, fields: dict[str, Any], dropout: float) -> tuple[Any, Any]:
    import peft
    from peft_core import LoraConfig, PrefixTuningConfig, PromptTuningConfig

    kw = dict(fields, task_type="CAUSAL_LM")
    if method == "lora":
        kw["lora_dropout"] = dropout
    ours = {"lora": LoraConfig, "prompt": PromptTuningConfig, "prefix": PrefixTuningConfig}[method]
    theirs = {"lora": peft.LoraConfig, "prompt": peft.PromptTuningConfig, "prefix": peft.PrefixTuningConfig}[method]
    return ours(**kw), theirs(**kw)


def copy_weights(theirs: Any, ours: Any, adapter: str = "default") -> None:
    """PEFT's adapter into ours: through the file format, or module to module for prefix tuning's MLP (PEFT's
    file holds only its output)."""
    import peft

    if getattr(theirs.peft_config[adapter], "prefix_projection", False):
        ours.adapter_modules[adapter].load_state_dict(theirs.prompt_encoder[adapter].state_dict())
    else:
        weights = peft.get_peft_model_state_dict(theirs, adapter_name=adapter)
        ours.load_adapter_state_dict(adapter, {k: v.clone() for k, v in weights.items()})


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters under one name in both libraries (PEFT nests the model one level deeper and
    calls the prompt modules ``prompt_encoder``)."""
    import peft

    is_peft = isinstance(model, peft.PeftModel)
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            if is_peft:
                name = name.replace("base_model.model.", "", 1).replace("prompt_encoder.", "adapter_modules.", 1)
            else:
                name = name.replace("base_model.", "", 1)
            out[name] = p
    return out


def batch(vocab: int, device: torch.device, rows: int = 2, seq: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(2, vocab, (rows, seq), generator=g).to(device)


def step(model: nn.Module, ids: torch.Tensor, device: torch.device, dtype: torch.dtype | None,
         **kw: Any) -> tuple[float, torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, logits, gradients) of one forward (under autocast unless ``dtype`` is None) and backward."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model(input_ids=ids, labels=ids, **kw)
    if dtype == torch.float16:
        scaler = torch.amp.GradScaler(device.type, init_scale=2.0**12)
        scaler.scale(out.loss).backward()
        inv = 1.0 / scaler.get_scale()
        grads = {k: p.grad.float() * inv for k, p in trainable(model).items() if p.grad is not None}
    else:
        out.loss.backward()
        grads = {k: p.grad.float() for k, p in trainable(model).items() if p.grad is not None}
    return out.loss.item(), out.logits.detach().float(), grads


def rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        return math.inf
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)).item() for k in a)


def grads_ok(model: nn.Module, grads: dict[str, torch.Tensor]) -> bool:
    """Every trainable parameter has a finite, not all-zero gradient."""
    names = trainable(model).keys()
    return names == grads.keys() and bool(names) and all(
        bool(torch.isfinite(g).all()) and g.abs().max().item() > 0 for g in grads.values())


def adapter_effect(model: Any, ids: torch.Tensor, device: torch.device, dtype: torch.dtype,
                   logits: torch.Tensor, **kw: Any) -> float:
    """How far the adapter moves the logits (on the input positions; prompt tuning adds virtual ones)."""
    with torch.no_grad(), model.disable_adapter(), torch.autocast(device.type, dtype=dtype):
        base = model(input_ids=ids, **kw).logits.float()
    return (logits[:, -ids.shape[1]:] - base).abs().max().item()


def run_case(name: str, device: torch.device, dtype: torch.dtype) -> None:
    import peft
    from peft_core import get_peft_model

    build, method, fields, dropout, mode = CASES[name]
    ours_cfg, theirs_cfg = configs(method, fields, dropout)
    theirs = peft.get_peft_model(build().to(device), theirs_cfg)
    ours = get_peft_model(build().to(device), ours_cfg)
    copy_weights(theirs, ours)
    for m in (ours, theirs):
        m.train(mode == "train")
    ids = batch(ours.config.vocab_size, device)
    label = f"{str(dtype)[6:]:8s} {name}"
    loss_o, logits_o, grads_o = step(ours, ids, device, dtype)
    finite = math.isfinite(loss_o) and grads_ok(ours, grads_o)
    if mode == "train" and dropout > 0 and "embedding" not in name:  # an embedding applies no LoRA dropout
        results.append((label, finite, f"loss {loss_o:.4f}; gradients finite and non-zero: {finite}"))
        return
    loss_t, logits_t, grads_t = step(theirs, ids, device, dtype)
    _, _, grads_f = step(theirs, ids, device, None)  # the exact (fp32) gradients, for scale
    d_loss, d_logits, d_grad = abs(loss_o - loss_t), (logits_o - logits_t).abs().max().item(), rel(grads_o, grads_t)
    peft_error = rel(grads_t, grads_f)
    effect = adapter_effect(ours, ids, device, dtype, logits_o)
    ok = (finite and d_loss <= LOSS_TOL[dtype] and d_logits <= LOGIT_TOL[dtype]
          and d_grad <= max(GRAD_TOL, 2.5 * peft_error)
          # no further from fp32 than PEFT under the same autocast (bf16/fp16 rounding may differ, not more)
          and rel(grads_o, grads_f) <= 1.5 * peft_error + 1e-2
          and effect > 2 * LOGIT_TOL[dtype])  # an adapter ignored under autocast would pass the rest
    results.append((label, ok, f"|loss - peft| {d_loss:.2e}  |logits - peft| {d_logits:.2e}  "
                               f"grad rel {d_grad:.2e} (peft vs fp32 {peft_error:.2e})  adapter effect {effect:.2f}"))


def run_mixed(device: torch.device, dtype: torch.dtype) -> None:
    """``adapter_names=["a", "b"]`` under autocast (eval), against PEFT's mixed batch."""
    import peft
    from peft_core import get_peft_model

    ours_a, theirs_a = configs("lora", {**LORA, "target_modules": ["q_proj", "v_proj"]}, 0.0)
    ours_b, theirs_b = configs("lora", {**LORA, "r": 2, "target_modules": ["q_proj", "o_proj"]}, 0.0)
    theirs = peft.get_peft_model(tiny_llama().to(device), theirs_a, adapter_name="a")
    ours = get_peft_model(tiny_llama().to(device), ours_a, adapter_name="a")
    theirs.add_adapter("b", theirs_b)
    ours.add_adapter("b", ours_b)
    for n in ("a", "b"):
        copy_weights(theirs, ours, n)
    ours.eval()
    theirs.eval()
    ids = batch(ours.config.vocab_size, device)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
        got = ours(input_ids=ids, adapter_names=["a", "b"]).logits.float()
        expected = theirs(input_ids=ids, adapter_names=["a", "b"]).logits.float()
        # each row's own adapter: different from the other adapter's logits for that row
        ours.set_adapter("b")
        only_b = ours(input_ids=ids).logits.float()
    diff = (got - expected).abs().max().item()
    routed, row_b = (got[0] - only_b[0]).abs().max().item(), (got[1] - only_b[1]).abs().max().item()
    tol = LOGIT_TOL[dtype]
    ok = diff <= tol and routed > 2 * tol and row_b <= tol
    results.append((f"{str(dtype)[6:]:8s} lora mixed batch eval", ok,
                    f"|logits - peft| {diff:.2e}  row 0 (a) vs adapter b {routed:.2f}"))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--cpu", action="store_true", help="run the checks on CPU (CPU autocast)")
    args = p.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print("autocast_check: SKIP, no CUDA device (use --cpu to run the checks on CPU)")
        return 0
    device = torch.device("cpu") if args.cpu else torch.device("cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must not hide TF32 rounding
        torch.backends.cudnn.allow_tf32 = False
    start = time.perf_counter()
    for dtype in (torch.bfloat16, torch.float16):
        for name in CASES:
            try:
                run_case(name, device, dtype)
            except Exception as e:  # one broken case must not hide the others' results
                results.append((f"{str(dtype)[6:]:8s} {name}", False, f"{type(e).__name__}: {e}"))
        try:
            run_mixed(device, dtype)
        except Exception as e:
            results.append((f"{str(dtype)[6:]:8s} lora mixed batch eval", False, f"{type(e).__name__}: {e}"))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, {time.perf_counter() - start:.1f} s")
    for label, ok, detail in results:
        print(f"{'PASS' if ok else 'FAIL'}  {label:36s} {detail}")
    failed = [r for r in results if not r[1]]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
