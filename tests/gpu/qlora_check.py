"""QLoRA on a CUDA GPU: what tests/test_qlora.py checks on the CPU, where bitsandbytes' CUDA kernels run.

For a maintainer with a GPU (not collected by pytest; needs no download)::

    python tests/gpu/qlora_check.py          # CUDA; prints SKIP and exits 0 without it
    python tests/gpu/qlora_check.py --cpu    # the same checks on the CPU

One PASS/FAIL/SKIP line per check, with its numbers; exit status 1 if any failed. For nf4 (bf16 compute),
fp4 with double quantization, and int8, on a llama built from a config and reloaded quantized:

1. logits equal Hugging Face PEFT's with the same adapter weights;
2. six AdamW steps lower the loss and leave the quantized weights bit-identical;
3. merge_adapter / unmerge_adapter: unmerge restores the quantized weights bit for bit, and the merged model is
   as close to the unmerged one as PEFT's merged model is;
4. B9 on the GPU: a training step's time and peak CUDA memory, peft-core vs PEFT (same model, same batch).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from typing import Any

import torch

results: list[tuple[str, str, str]] = []

KINDS: dict[str, dict[str, Any]] = {
    "nf4-bf16": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.bfloat16},
    "fp4-dq-fp16": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True,
                    "bnb_4bit_compute_dtype": torch.float16},
    "int8": {"load_in_8bit": True},
}
LORA = {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "r": 8, "lora_alpha": 2, "init_lora_weights": False}


def report(check: str, ok: bool | None, detail: str) -> None:
    results.append((check, "SKIP" if ok is None else "PASS" if ok else "FAIL", detail))
    print(f"{results[-1][1]:4}  {check}: {detail}", flush=True)


def quantized_bytes(model: torch.nn.Module) -> dict[str, bytes]:
    return {n.replace("base_model.model.", ""): p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
            for n, p in model.named_parameters() if p.dtype in (torch.uint8, torch.int8)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true", help="run on the CPU instead of CUDA")
    args = ap.parse_args()
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("SKIP  no CUDA device: nothing to check here (use --cpu for the CPU run)")
        return 0
    import peft
    import peft_core
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, pad_token_id=0)
    folder = tempfile.mkdtemp(prefix="qlora-check-")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 512, (4, 64), generator=g).to(device)

    def load(kind: str) -> torch.nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(**KINDS[kind]),
                                                        device_map={"": device}).eval()

    def logits(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids).logits.float()

    for kind in KINDS:
        ours = peft_core.get_peft_model(load(kind), peft_core.LoraConfig(**LORA))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.get_peft_model(load(kind), peft.LoraConfig(**LORA))
        peft.set_peft_model_state_dict(theirs, {k: v.clone() for k, v in ours.get_adapter_state_dict().items()})
        lo, lt = logits(ours), logits(theirs)
        tol = 1e-4 if kind == "int8" else 3e-2
        diff = (lo - lt).abs().max().item()
        report(f"{kind} logits vs peft", diff <= tol * max(1.0, lt.abs().max().item()), f"max abs diff {diff:.2e}")

        unmerged, before = lo, quantized_bytes(ours)
        ours.merge_adapter()
        merged = logits(ours)
        ours.unmerge_adapter()
        exact = quantized_bytes(ours) == before and torch.equal(logits(ours), unmerged)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            their_merged = logits(theirs.merge_and_unload())
        ours_gap, their_gap = (merged - unmerged).abs().max().item(), (their_merged - lt).abs().max().item()
        report(f"{kind} merge/unmerge", exact and ours_gap <= 2 * their_gap + 1e-3,
               f"unmerge exact: {exact}; merged vs unmerged {ours_gap:.2e} (peft {their_gap:.2e})")

        model = peft_core.get_peft_model(peft_core.prepare_model_for_kbit_training(load(kind), False),
                                         peft_core.LoraConfig(target_modules=LORA["target_modules"], r=8))
        before = quantized_bytes(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
        model.train()
        losses = []
        for _ in range(6):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        report(f"{kind} training", losses[-1] < losses[0] and quantized_bytes(model) == before,
               f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; quantized weights unchanged: "
               f"{quantized_bytes(model) == before}")

    if device == "cuda":  # B9 on the GPU: step time and peak memory, nf4 with bf16 compute
        timings = {}
        for side in ("peft-core", "peft"):
            lib = peft_core if side == "peft-core" else peft
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = lib.get_peft_model(lib.prepare_model_for_kbit_training(load("nf4-bf16"), False),
                                           lib.LoraConfig(target_modules="all-linear", r=16, lora_alpha=32))
            model.train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            samples = []
            for i in range(12):
                t0 = time.perf_counter()
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                if i >= 2:
                    samples.append(time.perf_counter() - t0)
            timings[side] = (sorted(samples)[len(samples) // 2], torch.cuda.max_memory_allocated())
            del model, opt
            torch.cuda.empty_cache()
        (t_o, m_o), (t_t, m_t) = timings["peft-core"], timings["peft"]
        report("B9 GPU nf4 train step", True, f"peft-core {t_o * 1e3:.1f} ms vs peft {t_t * 1e3:.1f} ms "
               f"(ratio {t_o / t_t:.3f}); peak memory {m_o / 2**20:.1f} vs {m_t / 2**20:.1f} MiB "
               f"(ratio {m_o / m_t:.3f})")
    failed = [r for r in results if r[1] == "FAIL"]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
