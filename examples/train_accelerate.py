"""LoRA fine-tuning with 🤗 accelerate: one script for one process, several CPU processes, or several GPUs.

Offline by default: it builds a tiny Llama from a config and learns a synthetic task ("count up": each
token is the previous one plus one), so nothing is downloaded. ``--model`` takes any causal LM folder or
Hub id instead. The global batch is the same however many processes run (``split_batches=True``), so a
2-process run ends with the same adapter as a 1-process run, up to float rounding::

    python examples/train_accelerate.py                                             # 1 process
    accelerate launch --multi_gpu --num_processes 2 examples/train_accelerate.py --cpu  # 2 CPU processes (gloo)
    torchrun --nproc_per_node 2 examples/train_accelerate.py --cpu                    # the same, via torchrun
    accelerate launch --multi_gpu --num_processes 2 examples/train_accelerate.py        # 2 GPUs

On one machine without MPI, ``accelerate launch --cpu --num_processes 2`` starts ONE process (accelerate's
multi-CPU launcher is mpirun): the script runs, single-process, and says so. See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from peft_core import LoraConfig, PeftModel, TaskType, get_peft_model
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="causal LM folder or Hub id (default: a tiny Llama from a config)")
    # a temporary folder by default: running the example must not leave files in the working directory
    p.add_argument("--output_dir", default=None, help="where to save the adapter (default: a temporary folder)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--global_batch_size", type=int, default=8, help="rows per step, over all processes together")
    p.add_argument("--seq_len", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--lora_dropout", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="train on CPU even where a GPU exists (gloo between processes)")
    return p.parse_args()


def build_base(args: argparse.Namespace) -> nn.Module:
    """The frozen base model. Every rank must build the same one: seeded, or loaded from the same files."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if args.model is not None:
        return AutoModelForCausalLM.from_pretrained(args.model)
    torch.manual_seed(args.seed)
    return AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=128, pad_token_id=0))


def count_up_data(rows: int, seq_len: int, vocab: int, seed: int) -> TensorDataset:
    """Rows ``s, s+1, s+2, ...`` (wrapping, ids >= 2): learnable by a few LoRA steps, with no tokenizer."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab - 2, (rows, 1), generator=g)
    ids = (start + torch.arange(seq_len)) % (vocab - 2) + 2
    return TensorDataset(ids)


def warn_if_single_process_cpu_launch(accelerator: Accelerator) -> None:
    # `accelerate launch --cpu --num_processes N` on one machine sets MASTER_PORT for N > 1 but starts one
    # process unless mpirun is used; say so instead of silently training alone.
    on_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    launched_for_many = on_cpu and "MASTER_PORT" in os.environ
    if launched_for_many and "WORLD_SIZE" not in os.environ and accelerator.num_processes == 1:
        accelerator.print("note: `accelerate launch --cpu` started a single process (its multi-CPU launcher is "
                          "mpirun). For N CPU processes: accelerate launch --multi_gpu --num_processes N "
                          "examples/train_accelerate.py --cpu")


def main() -> None:
    args = parse_args()
    if args.output_dir is None:  # one path every rank agrees on
        import tempfile

        args.output_dir = os.path.join(tempfile.gettempdir(), "peft-core-train-accelerate-adapter")
    # split_batches: the DataLoader's batch is the global batch, cut into one slice per process, so results
    # do not depend on the number of processes.
    accelerator = Accelerator(cpu=args.cpu, dataloader_config=DataLoaderConfiguration(split_batches=True))
    warn_if_single_process_cpu_launch(accelerator)
    if args.global_batch_size % accelerator.num_processes:
        raise SystemExit(f"--global_batch_size {args.global_batch_size} must divide by the "
                         f"{accelerator.num_processes} processes")
    set_seed(args.seed)  # same LoRA init on every rank (DDP would broadcast rank 0's anyway)

    base = build_base(args)
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=args.r, lora_alpha=2 * args.r,
                        lora_dropout=args.lora_dropout, target_modules="all-linear")
    model = get_peft_model(base, config)
    if accelerator.is_main_process:
        model.print_trainable_parameters()
    data = count_up_data(args.steps * args.global_batch_size, args.seq_len, model.config.vocab_size, args.seed)
    # no shuffling: the rows are random already, and the order must not depend on the process count
    loader = DataLoader(data, batch_size=args.global_batch_size, shuffle=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    # DDP registers only parameters that require grad: the LoRA weights. No find_unused_parameters needed.
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    start = time.perf_counter()
    losses = []
    for step, (ids,) in enumerate(loader):
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(accelerator.reduce(loss.detach(), "mean").item())
        if step % 10 == 0 or step == args.steps - 1:
            accelerator.print(f"step {step:3d}  loss {losses[-1]:.4f}")

    # Saving: call it on every rank. Only the main process writes (save_pretrained's default under
    # torch.distributed; `is_main_process=accelerator.is_main_process` says the same, as with HF PEFT).
    accelerator.wait_for_everyone()
    adapted = accelerator.unwrap_model(model)
    adapted.save_pretrained(args.output_dir)
    accelerator.wait_for_everyone()

    # Every rank should hold the very same adapter: compare them all with rank 0's.
    flat = torch.cat([p.detach().float().flatten() for p in adapted.parameters() if p.requires_grad])
    every_rank = accelerator.gather(flat[None])
    rank_diff = (every_rank - every_rank[0]).abs().max().item()

    result = {"processes": accelerator.num_processes, "steps": len(losses), "first_loss": losses[0],
              "last_loss": losses[-1], "rank_max_abs_diff": rank_diff, "seconds": time.perf_counter() - start}
    if accelerator.is_main_process:
        # The saved folder, loaded into a plain (never wrapped) model, gives the trained model's outputs.
        adapted.eval()
        reloaded = PeftModel.from_pretrained(build_base(args), args.output_dir).eval()
        probe = data.tensors[0][: args.global_batch_size].to(accelerator.device)
        # accelerator.autocast: under --mixed_precision the trained model's forward runs in it, so must this one
        with torch.no_grad(), accelerator.autocast():
            expected = adapted(input_ids=probe).logits.float()
            got = reloaded.to(accelerator.device)(input_ids=probe).logits.float()
        result["reload_max_abs_diff"] = (expected - got).abs().max().item()
        result["saved_files"] = sorted(os.listdir(args.output_dir))
        print("RESULT " + json.dumps(result), flush=True)
    accelerator.end_training()


if __name__ == "__main__":
    main()
