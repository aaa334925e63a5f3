"""B11: ``torch.compile`` (inductor): the compiled LoRA training step and one-token decode, against the same model
eager and against Hugging Face PEFT compiled the same way. fp32, all-linear r=16.

(The compile issue called this row B10; B10 was already DoRA's.) Compile time is not timed: every side runs its
warm-up calls first, which compile. Agreement checks compare each compiled side with its eager self and the two
libraries with each other.
"""

from __future__ import annotations

import torch

from .b1_training import LORA, TOL, step_fn
from .b3_inference import decode_fn
from .common import (
    Context,
    Target,
    alternate,
    build_llama,
    clone_model,
    core_lora,
    fmt_s,
    peft_lora,
    rel_err,
    sync_adapter,
    token_batch,
)


def run_b11(ctx: Context, rounds: int) -> None:
    scale = ctx.scale
    batch = token_batch(scale)
    tag = f"fp32 batch={scale.batch} seq={scale.seq}"
    torch._dynamo.reset()
    with ctx.case(tag):
        base = build_llama(scale, torch.float32)
        theirs = peft_lora(clone_model(base), **LORA)
        ours = core_lora(clone_model(base), **LORA)
        sync_adapter(theirs, ours)
        del base
        compiled = {"peft-core": torch.compile(ours), "peft": torch.compile(theirs)}
        tol = TOL["fp32"][0]
        # decode first: the training steps below change the weights (the eager side's steps only ours)
        for m in (ours, theirs):
            m.eval()
        dec = {"peft-core compiled": decode_fn(compiled["peft-core"], batch),
               "peft compiled": decode_fn(compiled["peft"], batch), "peft-core eager": decode_fn(ours, batch)}
        ctx.agree(f"{tag} compiled decode logits vs eager",
                  rel_err(dec["peft-core compiled"][1](), dec["peft-core eager"][1]()), tol)
        ctx.agree(f"{tag} compiled decode logits vs peft compiled",
                  rel_err(dec["peft-core compiled"][1](), dec["peft compiled"][1]()), tol)
        t = alternate({k: v[0] for k, v in dec.items()}, rounds * scale.decode_calls, max(scale.warmup, 2))
        ctx.row(tag, "decode (1 token, KV cache), compiled", fmt_s(t.median("peft-core compiled")),
                fmt_s(t.median("peft compiled")), "peft compiled",
                ratio=t.ratio("peft-core compiled", "peft compiled"),
                spread=t.spread("peft-core compiled", "peft compiled"), target=Target.at_most(1.0))
        ctx.row(tag, "decode, compiled (reference)", fmt_s(t.median("peft-core compiled")),
                fmt_s(t.median("peft-core eager")), "peft-core eager",
                ratio=t.ratio("peft-core compiled", "peft-core eager"),
                spread=t.spread("peft-core compiled", "peft-core eager"))
        del dec
        for m in (ours, theirs):
            m.train()
        with torch.no_grad():
            eager_loss = ours(**batch, labels=batch["input_ids"]).loss
            ctx.agree(f"{tag} compiled train loss vs eager", rel_err(
                compiled["peft-core"](**batch, labels=batch["input_ids"]).loss, eager_loss), tol)
            ctx.agree(f"{tag} compiled train loss vs peft compiled", rel_err(
                compiled["peft-core"](**batch, labels=batch["input_ids"]).loss,
                compiled["peft"](**batch, labels=batch["input_ids"]).loss), tol)
        steps = {"peft-core compiled": step_fn("peft-core", compiled["peft-core"], batch),
                 "peft compiled": step_fn("peft", compiled["peft"], batch),
                 "peft-core eager": step_fn("peft-core", ours, batch)}
        t = alternate(steps, rounds, warmup=max(scale.warmup, 2))  # the warm-up calls compile
        ctx.row(tag, "train step, compiled", fmt_s(t.median("peft-core compiled")), fmt_s(t.median("peft compiled")),
                "peft compiled", ratio=t.ratio("peft-core compiled", "peft compiled"),
                spread=t.spread("peft-core compiled", "peft compiled"), target=Target.at_most(1.0))
        ctx.row(tag, "train step, compiled (reference)", fmt_s(t.median("peft-core compiled")),
                fmt_s(t.median("peft-core eager")), "peft-core eager",
                ratio=t.ratio("peft-core compiled", "peft-core eager"),
                spread=t.spread("peft-core compiled", "peft-core eager"))
        del steps
    torch._dynamo.reset()
