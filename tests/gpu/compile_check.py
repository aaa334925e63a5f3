"""torch.compile (inductor) on CUDA: what tests/test_compile.py and tests/test_hotswap.py check on CPU with Dynamo's
test backends, compiled for real on a GPU.

For a maintainer with a GPU (not collected by pytest; needs no download; about a minute)::

    python tests/gpu/compile_check.py          # one CUDA device; exits 0 with a message when there is none
    python tests/gpu/compile_check.py --cpu    # the same checks on CPU (inductor's C++ backend)

On CUDA the model-wide adapter gates stay 0-d CPU tensors (they act as scalars), and the per-row gates of a mixed
batch come from a custom operator when the graph runs; this checks that inductor (and its CUDA graphs under
``mode="reduce-overhead"``) take both. Cases, each compiled once and then switched without recompiling:
``set_adapter``, ``disable_adapter``, mixed batches, a hot-swap after ``prepare_model_for_compiled_hotswap``;
fp32 and bf16. One PASS/FAIL line per case; exit status 1 if any failed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable

import torch


def _tiny(device: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, pad_token_id=0)
    return AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype).eval()


def _save(folder: str, device: str, dtype: torch.dtype, seed: int, r: int, alpha: float) -> None:
    import peft_core

    model = peft_core.get_peft_model(_tiny(device, dtype), peft_core.LoraConfig(
        r=r, lora_alpha=alpha, target_modules="all-linear"))
    torch.manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_" in n:
            torch.nn.init.normal_(p, std=0.05)
    model.save_pretrained(folder)


def check(device: str, dtype: torch.dtype, mode: str | None) -> list[tuple[str, bool, str]]:
    import peft_core
    from torch._dynamo.utils import counters

    tol = 1e-4 if dtype == torch.float32 else 5e-2
    out: list[tuple[str, bool, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, seed, r, alpha in (("a", 1, 4, 8), ("b", 2, 4, 8), ("c", 3, 8, 4)):
            _save(f"{tmp}/{name}", device, dtype, seed, r, alpha)
        model = peft_core.PeftModel.from_pretrained(_tiny(device, dtype), f"{tmp}/a", adapter_name="a")
        model.load_adapter(f"{tmp}/b", adapter_name="b")
        x = torch.randint(0, 128, (2, 16), device=device)
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model.base_model, mode=mode)

        def compare(label: str, run: Callable[[], torch.Tensor], want: Callable[[], torch.Tensor]) -> None:
            with torch.no_grad():
                got, expected = run().float(), want().float()
            err = (got - expected).abs().max().item()
            out.append((label, err <= tol, f"max abs err {err:.2e} (tol {tol:.0e})"))

        compare("first call", lambda: compiled(input_ids=x).logits, lambda: model(input_ids=x).logits)
        model.set_adapter("b")
        compare("set_adapter", lambda: compiled(input_ids=x).logits, lambda: model(input_ids=x).logits)
        with model.disable_adapter():
            compare("disable_adapter", lambda: compiled(input_ids=x).logits, lambda: model(input_ids=x).logits)
        plain_graphs = counters["stats"]["unique_graphs"]
        out.append(("no recompile on set_adapter/disable", plain_graphs == 1, f"{plain_graphs} graph(s)"))
        def one_by_one(names: list[str]) -> torch.Tensor:
            """Each row with its adapter alone: the reference (eager's batched mixed route rounds differently)."""
            rows = []
            for i, name in enumerate(names):
                if name == peft_core.BASE_ROW:
                    with model.disable_adapter():
                        rows.append(model(input_ids=x[i:i + 1]).logits)
                else:
                    model.set_adapter(name)
                    rows.append(model(input_ids=x[i:i + 1]).logits)
            return torch.cat(rows)

        for names in (["a", "b"], ["b", peft_core.BASE_ROW]):
            def routed(names: list[str] = names) -> torch.Tensor:
                with model._runtime.route(names):
                    return compiled(input_ids=x).logits
            compare(f"mixed batch {names}", routed, lambda names=names: one_by_one(names))
        mixed_graphs = counters["stats"]["unique_graphs"]
        out.append(("mixed batches: one graph more, once", mixed_graphs == 2, f"{mixed_graphs} graph(s)"))

        torch._dynamo.reset()
        counters.clear()
        server = peft_core.PeftModel.from_pretrained(_tiny(device, dtype), f"{tmp}/a")
        peft_core.prepare_model_for_compiled_hotswap(server, target_rank=8)
        network = torch.compile(server.base_model, mode=mode)
        with torch.no_grad():
            network(input_ids=x)
        for name in ("c", "b"):
            peft_core.hotswap_adapter(server, f"{tmp}/{name}", "default", torch_device=device)
            fresh = peft_core.PeftModel.from_pretrained(_tiny(device, dtype), f"{tmp}/{name}")
            compare(f"hot-swap to {name}", lambda: network(input_ids=x).logits,
                    lambda fresh=fresh: fresh(input_ids=x).logits)
        graphs = counters["stats"]["unique_graphs"]
        out.append(("no recompile on hot-swap", graphs == 1, f"{graphs} graph(s)"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run on CPU (inductor C++)")
    args = ap.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: nothing checked (use --cpu for the CPU run)")
        return 0
    device = "cpu" if args.cpu else "cuda"
    failed = 0
    start = time.perf_counter()
    runs = [(torch.float32, None), (torch.bfloat16, None)]
    if device == "cuda":
        runs.append((torch.bfloat16, "reduce-overhead"))  # CUDA graphs
    for dtype, mode in runs:
        for label, ok, detail in check(device, dtype, mode):
            failed += not ok
            print(f"{'PASS' if ok else 'FAIL'}  {device} {str(dtype).removeprefix('torch.')} mode={mode}: {label}: "
                  f"{detail}", flush=True)
    print(f"{'all passed' if not failed else f'{failed} failed'} in {time.perf_counter() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
