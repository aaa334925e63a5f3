"""B1: LoRA training step (forward, backward, AdamW), all-linear r=16, fp32/bf16, dropout 0/0.05,
against Hugging Face PEFT, the frozen-model floor and full fine-tuning.

B2: saved-activation bytes of the same step (bf16) and, in one subprocess per side, peak RSS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .common import (
    REPO,
    Context,
    SavedActivations,
    Scale,
    Target,
    alternate,
    build_llama,
    clone_model,
    core_lora,
    fmt_bytes,
    fmt_s,
    peft_lora,
    rel_err,
    sync_adapter,
    token_batch,
    trainable_grads,
)

LORA = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}


def lora_kwargs(scale: Scale) -> dict[str, Any]:
    """LORA at the scale's rank (a grid point may change it); alpha = 2 r keeps the scaling factor fixed."""
    return {**LORA, "r": scale.r, "lora_alpha": 2 * scale.r}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (forward rel err, gradient rel err) allowed between the libraries. bf16: PEFT runs the LoRA branch in
# fp32 (it casts the activations to the adapter dtype), peft-core in bf16, so they differ by bf16 rounding.
TOL = {"fp32": (1e-5, 1e-3), "bf16": (2e-2, 1e-1)}
SIDES = ("peft-core", "peft", "floor", "full FT")


def make_sides(scale: Scale, dtype: torch.dtype, dropout: float,
               sides: tuple[str, ...] = SIDES) -> dict[str, nn.Module]:
    """The same base model (same seed) under each side; peft-core gets peft's adapter weights.

    A single side wraps the base model itself (no copy freed behind it: used by the peak-RSS probe).
    """
    base = build_llama(scale, dtype)

    def fresh() -> nn.Module:
        return base if len(sides) == 1 else clone_model(base)

    out: dict[str, nn.Module] = {}
    lora = lora_kwargs(scale)
    theirs = peft_lora(fresh(), lora_dropout=dropout, **lora) if "peft" in sides else None
    if "peft-core" in sides:
        ours = core_lora(fresh(), lora_dropout=dropout, **lora)
        if theirs is not None:
            sync_adapter(theirs, ours)
        out["peft-core"] = ours
    if theirs is not None:
        out["peft"] = theirs
    if "floor" in sides:
        frozen = fresh()
        frozen.requires_grad_(False)
        out["floor"] = frozen
    if "full FT" in sides:
        full = fresh()
        full.requires_grad_(True)
        out["full FT"] = full
    for m in out.values():
        m.train()
    return out


def loss_of(side: str, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    ids = batch["input_ids"]
    if side == "floor":  # nothing trainable: the only gradient needed is the input's
        emb = model.get_input_embeddings()
        with torch.no_grad():
            embeds = emb(ids)
        embeds.requires_grad_(True)
        return model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=ids).loss
    return model(**batch, labels=ids).loss


def step_fn(side: str, model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step() -> None:
        loss = loss_of(side, model, batch)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def check_agreement(ctx: Context, tag: str, dtype_name: str, ours: nn.Module, theirs: nn.Module,
                    batch: dict[str, torch.Tensor], dropout: float) -> None:
    fwd_tol, grad_tol = TOL[dtype_name]
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        lo = ours(**batch).logits
        lt = theirs(**batch).logits
    ctx.agree(f"{tag} eval logits", rel_err(lo, lt), fwd_tol)
    ours.train()
    theirs.train()
    if dropout == 0.0:
        loss_o = loss_of("peft-core", ours, batch)
        loss_t = loss_of("peft", theirs, batch)
        ctx.agree(f"{tag} train loss", rel_err(loss_o, loss_t), fwd_tol)
        loss_o.backward()
        loss_t.backward()
        go, gt = trainable_grads(ours), trainable_grads(theirs)
        ctx.agree_true(f"{tag} same trainable tensors", go.keys() == gt.keys() and len(go) > 0,
                       f"{len(go)} vs {len(gt)} trainable tensors with gradients")
        ctx.agree(f"{tag} adapter grads", max(rel_err(go[k], gt[k]) for k in go), grad_tol)
    else:
        # masks differ between libraries; check that dropout is live (train != eval) and the loss is sane
        with torch.no_grad():
            train_o = loss_of("peft-core", ours, batch).item()
            ours.eval()
            eval_o = loss_of("peft-core", ours, batch).item()
            ours.train()
            train_t = loss_of("peft", theirs, batch).item()
        ctx.agree_true(f"{tag} dropout active", train_o != eval_o and abs(train_o - train_t) < 0.05 * abs(train_t),
                       f"train loss {train_o:.5f} (eval {eval_o:.5f}; peft train {train_t:.5f})")
    for m in (ours, theirs):
        m.zero_grad(set_to_none=True)


def run_b1(ctx: Context, rounds: int) -> None:
    scale = ctx.scale
    batch = token_batch(scale)
    for dtype_name, dtype in DTYPES.items():
        for dropout in (0.0, 0.05):
            tag = f"{dtype_name} dropout={dropout:g}"
            with ctx.case(tag):
                sides = SIDES if dropout == 0.0 else ("peft-core", "peft")
                models = make_sides(scale, dtype, dropout, sides)
                check_agreement(ctx, tag, dtype_name, models["peft-core"], models["peft"], batch, dropout)
                steps = {s: step_fn(s, m, batch) for s, m in models.items()}
                timing = alternate(steps, rounds=rounds, warmup=scale.warmup)
                o = timing.median("peft-core")
                target = Target.at_most(0.95 if dropout == 0.0 else 0.70)
                ctx.row(tag, "train step", fmt_s(o), fmt_s(timing.median("peft")), "peft",
                        ratio=timing.ratio("peft-core", "peft"), spread=timing.spread("peft-core", "peft"),
                        target=target)
                if "floor" in models:
                    ctx.row(tag, "train step", fmt_s(o), fmt_s(timing.median("floor")), "frozen floor",
                            ratio=timing.ratio("peft-core", "floor"), spread=timing.spread("peft-core", "floor"),
                            target=Target.at_most(1.05))
                    ctx.row(tag, "train step (reference)", fmt_s(o), fmt_s(timing.median("full FT")), "full FT",
                            ratio=timing.ratio("peft-core", "full FT"),
                            spread=timing.spread("peft-core", "full FT"),
                            note=f"peft/full FT {timing.ratio('peft', 'full FT'):.3f}")
                ctx.extra.setdefault("b1_timing", {})[ctx.at_point(tag)] = timing.samples
                del models, steps


def saved_bytes(side: str, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    with SavedActivations(model) as sa:
        loss = loss_of(side, model, batch)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sa.nbytes, len(sa.storages)


def run_b2(ctx: Context, rounds: int = 1) -> None:
    scale = ctx.scale
    batch = token_batch(scale)
    for dropout in (0.0, 0.05):
        tag = f"bf16 dropout={dropout:g}"
        with ctx.case(tag):
            models = make_sides(scale, torch.bfloat16, dropout)
            check_agreement(ctx, tag, "bf16", models["peft-core"], models["peft"], batch, dropout)
            nbytes = {}
            for side, model in models.items():
                torch.manual_seed(0)
                nbytes[side] = saved_bytes(side, model, batch)
            ctx.extra.setdefault("b2_saved", {})[tag] = nbytes
            o = nbytes["peft-core"][0]
            ctx.row(tag, "saved activations", fmt_bytes(o), fmt_bytes(nbytes["peft"][0]), "peft",
                    ratio=o / nbytes["peft"][0], target=Target.at_most(0.70),
                    note=f"{nbytes['peft-core'][1]} vs {nbytes['peft'][1]} storages")
            ctx.row(tag, "saved activations", fmt_bytes(o), fmt_bytes(nbytes["full FT"][0]), "full FT",
                    ratio=o / nbytes["full FT"][0], target=Target.at_most(1.0))
            ctx.row(tag, "saved activations (reference)", fmt_bytes(o), fmt_bytes(nbytes["floor"][0]),
                    "frozen floor", ratio=o / nbytes["floor"][0])
            del models
    with ctx.case("peak RSS"):
        run_rss(ctx)


def run_rss(ctx: Context) -> None:
    """Peak RSS of one training step per side, each side in its own fresh process."""
    scale = ctx.scale
    jobs = [(side, p) for p in scale.rss_dropouts for side in scale.rss_probes]
    results: dict[tuple[str, float], dict[str, Any]] = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(scale.threads),
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    pending = list(jobs)
    running: list[tuple[tuple[str, float], subprocess.Popen[str]]] = []
    parallel = 2  # CPU contention between probes changes their time, not their peak memory
    while pending or running:
        while pending and len(running) < parallel:
            side, p = pending.pop(0)
            cmd = [sys.executable, "-m", "benchmarks.rss_probe", "--scale", scale.name, "--side", side,
                   "--dropout", str(p)]
            running.append(((side, p), subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                                        stderr=subprocess.PIPE, text=True)))
        key, proc = running.pop(0)
        out, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"rss probe {key} failed: {err.strip().splitlines()[-1:]}")
        results[key] = json.loads(out.strip().splitlines()[-1])
    ctx.extra["b2_rss"] = {f"{s} dropout={p:g}": v for (s, p), v in results.items()}
    for p in scale.rss_dropouts:
        tag = f"bf16 dropout={p:g}"
        o = results[("peft-core", p)]
        for ref in [s for s in scale.rss_probes if s != "peft-core"]:
            r = results[(ref, p)]
            ctx.row(tag, "peak RSS over the step (reference)", fmt_bytes(o["delta_kib"] * 1024),
                    fmt_bytes(r["delta_kib"] * 1024), ref, ratio=o["delta_kib"] / max(r["delta_kib"], 1),
                    note=f"process peak {o['peak_kib'] / 2**20:.2f} vs {r['peak_kib'] / 2**20:.2f} GiB")
