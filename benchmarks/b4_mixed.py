"""B4: mixed-adapter batches (``model(..., adapter_names=[...])``, one adapter name per row) with 1, 4,
16 and 32 distinct adapters in the batch; prefill and one-token decode.

Over the grid B4 varies hidden size, rank and MHA/GQA; its batch x seq (32 x 32 full) is its own and does not
follow the grid's. At points other than the base point only the adapter counts with a target run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .b1_training import lora_kwargs
from .b3_inference import decode_fn
from .common import (
    Context,
    Target,
    alternate,
    build_llama,
    clone_model,
    core_lora,
    fmt_s,
    peft_add_lora,
    peft_lora,
    rel_err,
    sync_adapter,
    token_batch,
)

# issue 15: with 16 distinct adapters in the batch, >=2x faster than PEFT in prefill and >=4x in decode
TARGETS = {16: {"prefill": Target.speedup(2.0), "decode": Target.speedup(4.0)}}


def names_for(count: int, rows: int) -> list[str]:
    return [f"adapter{i % count}" for i in range(rows)]


def prefill_fn(model: nn.Module, batch: dict[str, torch.Tensor], names: list[str]) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            model(**batch, use_cache=True, adapter_names=names)

    return run


def base_prefill_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            model(**batch, use_cache=True)

    return run


def build_pair(ctx: Context, count: int) -> tuple[nn.Module, nn.Module, nn.Module]:
    import peft_core

    lora = lora_kwargs(ctx.scale)
    base = build_llama(ctx.scale)
    theirs = peft_lora(clone_model(base), adapter_name="adapter0", seed=0, **lora)
    ours = core_lora(clone_model(base), adapter_name="adapter0", **lora)
    sync_adapter(theirs, ours, "adapter0")
    for i in range(1, count):
        name = f"adapter{i}"
        peft_add_lora(theirs, name, seed=i, **lora)
        ours.add_adapter(name, peft_core.LoraConfig(**lora))
        sync_adapter(theirs, ours, name)
    return base, ours.eval(), theirs.eval()


def adapter_counts(ctx: Context) -> tuple[int, ...]:
    """Every count at the base point (or without a grid); elsewhere only the counts with a target."""
    if ctx.point is None or ctx.point.is_base:
        return ctx.scale.mixed_counts
    return tuple(c for c in ctx.scale.mixed_counts if c in TARGETS)


def run_b4(ctx: Context, rounds: int) -> None:
    scale = ctx.scale
    counts = adapter_counts(ctx)
    with ctx.case(f"set-up: {max(counts)} adapters, all-linear r={scale.r}"):
        base, ours, theirs = build_pair(ctx, max(counts))
        ctx.extra["b4_models"] = (base, ours, theirs)
    if "b4_models" not in ctx.extra:
        return
    base, ours, theirs = ctx.extra.pop("b4_models")
    rows = scale.mixed_batch
    batch = token_batch(scale, batch=rows, seq=scale.mixed_seq, seed=4)
    with torch.no_grad():
        base_logits = base(**batch).logits
    for count in counts:
        tag = f"{count} adapter{'s' if count > 1 else ''} in a batch of {rows} (seq {scale.mixed_seq})"
        with ctx.case(tag):
            names = names_for(count, rows)
            with torch.no_grad():
                lo = ours(**batch, adapter_names=names).logits
                lt = theirs(**batch, adapter_names=names).logits
            ctx.agree(f"{count} adapters: prefill logits", rel_err(lo, lt), 1e-5)
            ctx.agree_true(f"{count} adapters: adapters change the output", rel_err(lo, base_logits) > 1e-3,
                           "mixed output differs from the base model's")
            dec = {"peft-core": decode_fn(ours, batch, adapter_names=names),
                   "peft": decode_fn(theirs, batch, adapter_names=names)}
            ctx.agree(f"{count} adapters: decode logits", rel_err(dec["peft-core"][1](), dec["peft"][1]()), 1e-5)
            targets = TARGETS.get(count, {})
            prefill = {"peft-core": prefill_fn(ours, batch, names), "peft": prefill_fn(theirs, batch, names)}
            decode = {k: v[0] for k, v in dec.items()}
            if targets:  # the bound a mixed batch is up against: the same batch through the base model alone
                prefill["base model"] = base_prefill_fn(base, batch)
                decode["base model"] = decode_fn(base, batch)[0]
            for metric, fns, n in (("prefill", prefill, rounds * scale.fast_factor),
                                   ("decode", decode, rounds * scale.decode_calls)):
                t = alternate(fns, n, scale.warmup)
                ctx.row(tag, f"mixed {metric}", fmt_s(t.median("peft-core")), fmt_s(t.median("peft")),
                        ratio=t.ratio("peft-core", "peft"), spread=t.spread("peft-core", "peft"),
                        target=targets.get(metric),
                        note=f"{1 / t.ratio('peft-core', 'peft'):.2f}x faster" if metric not in targets else "")
                if "base model" in fns:
                    peft_vs_base = t.ratio("peft", "base model")
                    ctx.row(tag, f"mixed {metric} (reference)", fmt_s(t.median("peft-core")),
                            fmt_s(t.median("base model")), "base model (no adapters)",
                            ratio=t.ratio("peft-core", "base model"), spread=t.spread("peft-core", "base model"),
                            note=f"peft/base {peft_vs_base:.3f}: at best (adapters free) peft-core would be "
                                 f"{peft_vs_base:.2f}x faster than peft")
