"""B6: bf16 merge/unmerge round trips: the base weights must come back bit-exact (PEFT's drift shown too)."""

from __future__ import annotations

import time

import torch
from torch import nn

from .b1_training import LORA, TOL
from .common import (
    Context,
    Target,
    build_llama,
    clone_model,
    core_lora,
    device_sync,
    fmt_s,
    norm_name,
    peft_lora,
    rel_err,
    sync_adapter,
    token_batch,
    wrapper_prefix,
)


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base layers' weights keyed by their plain model path."""
    prefix = wrapper_prefix(model)
    return {norm_name(n, prefix): p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def drift(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> tuple[int, int, float]:
    """(elements changed, elements in all, max |change|)."""
    changed = total = 0
    worst = 0.0
    for k, b in before.items():
        a = after[k]
        diff = a.view(torch.int16) != b.view(torch.int16) if b.dtype == torch.bfloat16 else a != b
        changed += int(diff.sum())
        total += b.numel()
        worst = max(worst, (a.float() - b.float()).abs().max().item())
    return changed, total, worst


def run_b6(ctx: Context, rounds: int) -> None:
    scale = ctx.scale
    cycles = scale.merge_cycles
    tag = f"bf16, all-linear r=16, {cycles} merge/unmerge cycles"
    with ctx.case(tag):
        base = build_llama(scale, torch.bfloat16)
        theirs = peft_lora(clone_model(base), **LORA).eval()
        ours = core_lora(clone_model(base), **LORA).eval()
        sync_adapter(theirs, ours)
        batch = token_batch(scale, batch=2, seq=16)
        w0 = {"peft-core": base_weights(ours), "peft": base_weights(theirs)}
        ctx.agree_true(f"{tag}: same base weights", w0["peft-core"].keys() == w0["peft"].keys()
                       and all(torch.equal(w0["peft-core"][k], w0["peft"][k]) for k in w0["peft"]),
                       f"{len(w0['peft-core'])} base tensors")
        tol = TOL["bf16"][0]
        with torch.no_grad():
            unmerged = ours(**batch).logits
            ours.merge_adapter()
            theirs.merge_adapter()
            merged_o, merged_t = ours(**batch).logits, theirs(**batch).logits
            ours.unmerge_adapter()
            theirs.unmerge_adapter()
        ctx.agree(f"{tag}: merged logits vs peft's", rel_err(merged_o, merged_t), tol)
        ctx.agree(f"{tag}: merged vs unmerged logits", rel_err(merged_o, unmerged), tol)
        spent = {}
        for lib, model in (("peft-core", ours), ("peft", theirs)):
            device_sync()
            t0 = time.perf_counter()
            for _ in range(cycles - 1):  # one cycle ran above
                model.merge_adapter()
                model.unmerge_adapter()
            device_sync()
            spent[lib] = (time.perf_counter() - t0) / max(cycles - 1, 1)
        d = {lib: drift(w0[lib], base_weights(m)) for lib, m in (("peft-core", ours), ("peft", theirs))}

        def text(changed: int, total: int, worst: float) -> str:
            return "bit-exact" if changed == 0 else f"{changed:,}/{total:,} elements changed (max |Δ| {worst:.2e})"

        ctx.extra["b6_drift"] = d
        ctx.row(tag, "base weights after the round trips", text(*d["peft-core"]), text(*d["peft"]),
                target=Target.exact("bit-exact"), ok=d["peft-core"][0] == 0)
        ctx.row(tag, "one merge+unmerge cycle (reference)", fmt_s(spent["peft-core"]), fmt_s(spent["peft"]),
                ratio=spent["peft-core"] / spent["peft"])
