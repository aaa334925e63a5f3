"""B10: DoRA training step (forward, backward, AdamW), all-linear r=16, against Hugging Face PEFT's DoRA step
(whose speed is a known complaint: each forward rebuilds ``B A`` through an identity matrix and forms
``W + s B A`` for the norm) and against plain LoRA on the same side."""

from __future__ import annotations

import torch

from .b1_training import check_agreement, step_fn
from .common import (
    Context,
    Target,
    alternate,
    build_llama,
    clone_model,
    core_lora,
    fmt_s,
    peft_lora,
    sync_adapter,
    token_batch,
)

DORA = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", "use_dora": True}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def run_b10(ctx: Context, rounds: int) -> None:
    scale = ctx.scale
    batch = token_batch(scale)
    for dtype_name, dtype in DTYPES.items():
        tag = f"{dtype_name} DoRA"
        with ctx.case(tag):
            base = build_llama(scale, dtype)
            theirs = peft_lora(clone_model(base), **DORA)
            ours = core_lora(clone_model(base), **DORA)
            sync_adapter(theirs, ours)
            plain = core_lora(base, **{**DORA, "use_dora": False})
            models = {"peft-core": ours, "peft": theirs, "peft-core LoRA": plain}
            for m in models.values():
                m.train()
            check_agreement(ctx, tag, dtype_name, ours, theirs, batch, 0.0)
            steps = {s: step_fn(s if s != "peft-core LoRA" else "peft-core", m, batch) for s, m in models.items()}
            timing = alternate(steps, rounds=rounds, warmup=scale.warmup)
            o = timing.median("peft-core")
            ctx.row(tag, "train step", fmt_s(o), fmt_s(timing.median("peft")), "peft DoRA",
                    ratio=timing.ratio("peft-core", "peft"), spread=timing.spread("peft-core", "peft"),
                    target=Target.at_most(0.95))
            ctx.row(tag, "train step (reference)", fmt_s(o), fmt_s(timing.median("peft-core LoRA")),
                    "peft-core plain LoRA", ratio=timing.ratio("peft-core", "peft-core LoRA"),
                    spread=timing.spread("peft-core", "peft-core LoRA"))
            del models, steps
