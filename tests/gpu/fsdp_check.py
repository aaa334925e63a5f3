"""FSDP2 + LoRA on GPUs (NCCL): what tests/test_distributed.py checks on CPU with gloo, on CUDA devices.

For a maintainer with GPUs (not collected by pytest; needs no download)::

    torchrun --nproc_per_node 2 tests/gpu/fsdp_check.py          # 2 or more GPUs (1 runs too, unsharded)
    torchrun --nproc_per_node 2 tests/gpu/fsdp_check.py --cpu    # the same checks on CPU with gloo

Rank 0 prints one PASS/FAIL/SKIP line per check, with its numbers, and exits with status 1 if any failed:

1. ``fully_shard`` (fp32): LoRA weights are sharded (DTensor), ranks end identical, and equal to unsharded
   training on the same global batch; gradients reduced are the adapter's only.
2. ``save_pretrained`` on every rank: rank 0 writes one full adapter, which loads into a plain model and
   gives the reference's logits.
3. ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: trains, ranks identical, fp32 file.
4. accelerate's FSDP2 plugin (GPU only: on CPU accelerate 1.x wraps with DDP instead): LoRA sharded,
   trains, and HF PEFT's idiom ``save_pretrained(..., state_dict=accelerator.get_state_dict(model))`` works.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from peft_core import LoraConfig, PeftModel, get_peft_model
from torch import nn

STEPS = 4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
results: list[tuple[str, str, str]] = []  # (check, PASS/FAIL/SKIP, numbers)


def report(check: str, ok: bool | None, detail: str) -> None:
    results.append((check, "SKIP" if ok is None else "PASS" if ok else "FAIL", detail))


def base_model(args: argparse.Namespace, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32).to(device)
    torch.manual_seed(0)
    # sizes divisible by 8, so shards have no padding on up to 8 ranks
    return AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=512, max_position_embeddings=256, pad_token_id=0)).to(device)


def lora_model(args: argparse.Namespace, device: torch.device) -> Any:
    model = get_peft_model(base_model(args, device), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    model.train()
    return model


def batches(world: int, vocab: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(2, vocab, (STEPS, 4 * world, 32), generator=g).to(device)


def train(model: Any, data: torch.Tensor, rows: slice, optimizer: torch.optim.Optimizer | None = None) -> list[float]:
    optimizer = optimizer or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for batch in data:
        loss = model(input_ids=batch[rows], labels=batch[rows]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def adapter(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().clone() for k, v in model.get_adapter_state_dict().items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        return float("inf")
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def rank_spread(state: dict[str, torch.Tensor], device: torch.device) -> float:
    """Largest difference between this adapter and any other rank's (0.0: all identical)."""
    flat = torch.cat([v.flatten() for v in state.values()]).to(device)
    every = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(every, flat)
    return max((e - every[0]).abs().max().item() for e in every)


def shard(model: Any, policy: Any) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)  # the root: adapter weights outside the layers are sharded too


def count_reduce_scatter() -> dict[str, int]:
    counts = {"bytes": 0}
    for name in ("reduce_scatter_single", "reduce_scatter_tensor"):
        original = getattr(dist, name, None)
        if original is None:
            continue

        def counting(output: torch.Tensor, input: torch.Tensor, *a: Any, _f: Any = original, **k: Any) -> Any:
            counts["bytes"] += input.numel() * input.element_size()
            return _f(output, input, *a, **k)

        setattr(dist, name, counting)
    return counts


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--cpu", action="store_true", help="run the checks on CPU with gloo")
    p.add_argument("--model", default=None, help="a causal LM folder instead of the built-in tiny Llama")
    p.add_argument("--skip_accelerate", action="store_true")
    args = p.parse_args()
    use_cuda = torch.cuda.is_available() and not args.cpu
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 comparisons must not hide TF32 rounding
        torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=180))
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = slice(rank * 4, (rank + 1) * 4)
    tol = 1e-4 if use_cuda else 1e-5  # CUDA kernels may sum in another order when batch shapes differ
    from torch.distributed.fsdp import MixedPrecisionPolicy

    # the reference: unsharded, the whole global batch, on this rank's device (every rank computes it alike)
    ref = lora_model(args, device)
    data = batches(world, ref.config.vocab_size, device)
    ref_losses = train(ref, data, slice(None))
    ref_state = adapter(ref)
    adapter_bytes = sum(p.numel() * p.element_size() for p in ref.parameters() if p.requires_grad)
    ref.eval()
    with torch.no_grad():
        ref_logits = ref(input_ids=data[0]).logits.float().cpu()

    folder = Path(tempfile.mkdtemp(prefix="fsdp-check-")) if rank == 0 else None
    shared = [str(folder)]
    dist.broadcast_object_list(shared, src=0)
    out = Path(shared[0])

    # 1. fp32 fully_shard
    counts = count_reduce_scatter()
    model = lora_model(args, device)
    shard(model, MixedPrecisionPolicy())
    lora_type = type(model.get_parameter(next(n for n, q in model.named_parameters() if q.requires_grad))).__name__
    train(model, data, rows)
    state = adapter(model)
    spread, diff = rank_spread(state, device), max_diff(state, ref_state)
    report("fsdp2 fp32 train", lora_type == "DTensor" and spread == 0.0 and diff < tol
           and counts["bytes"] == STEPS * adapter_bytes,
           f"LoRA param type {lora_type}; max |rank - rank0| {spread:.3g}; max |fsdp - unsharded| {diff:.3g} "
           f"(tol {tol}); reduce-scatter {counts['bytes']} B vs adapter {STEPS} x {adapter_bytes} B")

    # 2. save on every rank, rank 0 writes, reload into a plain model
    model.save_pretrained(out / "fp32")
    dist.barrier()
    if rank == 0:
        from safetensors.torch import load_file

        on_disk = load_file(out / "fp32" / "adapter_model.safetensors")
        plain = PeftModel.from_pretrained(base_model(args, device), out / "fp32").eval()
        with torch.no_grad():
            logits = plain(input_ids=data[0]).logits.float().cpu()
        file_diff, logit_diff = max_diff(on_disk, ref_state), (logits - ref_logits).abs().max().item()
        report("fsdp2 save + reload", file_diff < tol and logit_diff < 10 * tol,
               f"files {sorted(os.listdir(out / 'fp32'))}; max |file - unsharded| {file_diff:.3g}; "
               f"max |reloaded logits - reference| {logit_diff:.3g}")

    # 3. bf16 compute, fp32 shards and reduction
    mixed = lora_model(args, device)
    shard(mixed, MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    losses = train(mixed, data, rows)
    mixed.save_pretrained(out / "bf16")
    spread = rank_spread(adapter(mixed), device)
    loss_gap = max(abs(a - b) for a, b in zip(losses, ref_losses))  # this rank's half vs the global batch
    if rank == 0:
        from safetensors.torch import load_file

        dtypes = sorted({str(t.dtype) for t in load_file(out / "bf16" / "adapter_model.safetensors").values()})
        report("fsdp2 bf16 mixed precision", spread == 0.0 and dtypes == ["torch.float32"] and loss_gap < 0.5,
               f"max |rank - rank0| {spread:.3g}; file dtypes {dtypes}; rank-0 loss vs global fp32 loss "
               f"within {loss_gap:.3g}")

    # 4. accelerate's FSDP2 plugin
    if args.skip_accelerate:
        report("accelerate fsdp2", None, "--skip_accelerate")
    else:
        check_accelerate(args, device, data, rows, ref_state, out, tol)

    dist.barrier()
    failed = False
    if rank == 0:
        print(f"world size {world}, device {device.type}, torch {torch.__version__}")
        for check, status, detail in results:
            print(f"{status:4s}  {check}: {detail}")
            failed |= status == "FAIL"
    dist.destroy_process_group()
    return 1 if failed else 0


def check_accelerate(args: argparse.Namespace, device: torch.device, data: torch.Tensor, rows: slice,
                     ref_state: dict[str, torch.Tensor], out: Path, tol: float) -> None:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
                                            state_dict_type="FULL_STATE_DICT")
    accelerator = Accelerator(cpu=args.cpu, fsdp_plugin=plugin)
    if accelerator.distributed_type != DistributedType.FSDP:
        report("accelerate fsdp2", None, f"accelerate chose {accelerator.distributed_type} here (FSDP is GPU-only)")
        return
    model = lora_model(args, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)  # FSDP2: model and optimizer together
    inner = accelerator.unwrap_model(model)
    lora_type = type(inner.get_parameter(next(n for n, q in inner.named_parameters() if q.requires_grad))).__name__
    train(model, data, rows, optimizer)
    full = accelerator.get_state_dict(model)  # a collective: every rank
    inner.save_pretrained(out / "accelerate", is_main_process=accelerator.is_main_process, state_dict=full)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from safetensors.torch import load_file

        diff = max_diff(load_file(out / "accelerate" / "adapter_model.safetensors"), ref_state)
        report("accelerate fsdp2", lora_type == "DTensor" and diff < tol,
               f"LoRA param type {lora_type}; max |file - unsharded| {diff:.3g}")


if __name__ == "__main__":
    sys.exit(main())
