"""B7: prompt tuning and prefix tuning training steps with 200 virtual tokens.

Skipped with a "not installed" row while peft-core has no such plugin; picked up as soon as
``peft_core.PromptTuningConfig`` / ``PrefixTuningConfig`` resolve.

Over the grid B7 varies hidden size and batch x seq; it has no LoRA rank and always uses multi-head attention,
so the r and MHA points do not apply. Reference rows time the frozen floor (the base model, nothing trainable,
``inputs_embeds`` requiring grad) at seq + virtual tokens: all that prompt tuning must pay, and more than
prefix tuning must (its virtual tokens are keys/values only); for prefix tuning also at seq alone, a bound it
cannot beat (the whole model still runs forward and backward over the real tokens).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .b1_training import step_fn
from .common import Context, Row, Target, alternate, build_llama, clone_model, fmt_s, rel_err, token_batch

METHODS = {"prompt tuning": "PromptTuningConfig", "prefix tuning": "PrefixTuningConfig"}


def core_config_class(name: str) -> tuple[type | None, str]:
    """(peft-core's config class, "") or (None, why it is not available)."""
    import peft_core
    from peft_core.errors import MethodNotInstalledError

    try:
        return getattr(peft_core, name), ""
    except (AttributeError, MethodNotInstalledError) as e:
        return None, f"{type(e).__name__}: {e}"


def config_kwargs(method: str, scale_tokens: int) -> dict[str, Any]:
    kw: dict[str, Any] = {"task_type": "CAUSAL_LM", "num_virtual_tokens": scale_tokens}
    if method == "prefix tuning":
        kw["prefix_projection"] = False
    return kw


def adapter_delta(model: nn.Module, before: dict[str, torch.Tensor], sd_fn: Any) -> dict[str, torch.Tensor]:
    after = sd_fn(model)
    return {k: (after[k].float() - before[k].float()) for k in before}


def run_b7(ctx: Context, rounds: int) -> None:
    scale = ctx.scale
    batch = token_batch(scale)
    for method, cls_name in METHODS.items():
        tag = f"{method}, {scale.virtual_tokens} virtual tokens, fp32"
        core_cls, why = core_config_class(cls_name)
        if core_cls is None:
            ctx.log(f"  {ctx.bench} {tag}: skipped, not installed ({why})")
            ctx.rows.append(Row(ctx.bench, ctx.at_point(tag), "train step", "not installed", "", "peft",
                                status="skipped", group=tag, point=ctx.point.name if ctx.point else "",
                                note=f"peft_core.{cls_name} is not available ({why.splitlines()[0][:160]}); "
                                     "this row is filled in automatically once the plugin is installed"))
            continue
        with ctx.case(tag):
            import peft
            import peft_core

            # multi-head attention (kv heads = heads): prefix tuning's key/value layout is unambiguous
            base = build_llama(scale, kv_heads=scale.heads)
            kw = config_kwargs(method, scale.virtual_tokens)
            theirs = peft.get_peft_model(clone_model(base), getattr(peft, cls_name)(**kw))
            ours = peft_core.get_peft_model(clone_model(base), core_cls(**kw))
            sd_t = peft.get_peft_model_state_dict(theirs)
            ours.load_adapter_state_dict("default", {k: v.detach().clone() for k, v in sd_t.items()})
            theirs.train()
            ours.train()

            def sd_core(m: nn.Module) -> dict[str, torch.Tensor]:
                return {k: v.detach().clone() for k, v in m.get_adapter_state_dict().items()}

            def sd_peft(m: nn.Module) -> dict[str, torch.Tensor]:
                return {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(m).items()}

            b_o, b_t = sd_core(ours), sd_peft(theirs)
            ctx.agree_true(f"{tag}: same adapter tensors", b_o.keys() == b_t.keys(),
                           f"{sorted(b_o)} vs {sorted(b_t)}")
            ctx.agree(f"{tag}: same adapter weights", max(rel_err(b_o[k], b_t[k]) for k in b_t), 0.0)
            losses = []
            for model in (ours, theirs):  # one plain SGD step (lr 1): the weight change is the gradient
                opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
                loss = model(**batch, labels=batch["input_ids"]).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.detach())
            ctx.agree(f"{tag}: train loss", rel_err(losses[0], losses[1]), 1e-5)
            d_o, d_t = adapter_delta(ours, b_o, sd_core), adapter_delta(theirs, b_t, sd_peft)
            ctx.agree(f"{tag}: gradients (SGD step deltas)", max(rel_err(d_o[k], d_t[k]) for k in d_t), 1e-3)
            frozen = clone_model(base).train().requires_grad_(False)
            long_batch = token_batch(scale, seq=scale.seq + scale.virtual_tokens)
            floors = {f"frozen floor at seq + {scale.virtual_tokens}": long_batch}
            if method == "prefix tuning":
                floors["frozen floor at seq"] = batch
            fns = {"peft-core": step_fn("peft-core", ours, batch), "peft": step_fn("peft", theirs, batch),
                   **{name: step_fn("floor", frozen, b) for name, b in floors.items()}}
            t = alternate(fns, rounds, scale.warmup)
            ctx.row(tag, "train step", fmt_s(t.median("peft-core")), fmt_s(t.median("peft")),
                    ratio=t.ratio("peft-core", "peft"), spread=t.spread("peft-core", "peft"),
                    target=Target.at_most(0.75))
            for name in floors:
                peft_vs_floor = t.ratio("peft", name)
                ctx.row(tag, "train step (reference)", fmt_s(t.median("peft-core")), fmt_s(t.median(name)), name,
                        ratio=t.ratio("peft-core", name), spread=t.spread("peft-core", name),
                        note=f"peft/floor {peft_vs_floor:.3f}: the 0.75x target needs peft-core at "
                             f"{0.75 * peft_vs_floor:.2f}x this floor")
