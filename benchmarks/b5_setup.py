"""B5: set-up costs. ``get_peft_model`` on a llama-70B-shaped skeleton on the meta device (all-linear),
loading a saved adapter into a realistic small model, and ``set_adapter`` with 1 vs 64 adapters loaded."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn

from .b1_training import LORA
from .common import (
    Context,
    Scale,
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

#: set_adapter is "flat" in the number of loaded adapters when 64 loaded cost at most this much more than 1.
FLAT = 1.2


def skeleton_config(scale: Scale):  # a transformers config
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=scale.skeleton_layers,
                       num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=8192, tie_word_embeddings=False)


def skeleton(scale: Scale) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(skeleton_config(scale))


def wrap_fn(scale: Scale, lib: str) -> Callable[[], float]:
    """Time only the wrapping; a fresh skeleton is built (untimed) for every call."""
    import peft
    import peft_core

    mod = peft_core if lib == "peft-core" else peft

    def run() -> float:
        model = skeleton(scale)
        t0 = time.perf_counter()
        mod.get_peft_model(model, mod.LoraConfig(r=16, target_modules="all-linear"))
        return time.perf_counter() - t0

    return run


def load_fn(base: nn.Module, folder: str, lib: str) -> Callable[[], float]:
    import peft
    import peft_core

    mod = peft_core if lib == "peft-core" else peft

    def run() -> float:
        model = clone_model(base)
        t0 = time.perf_counter()
        mod.PeftModel.from_pretrained(model, folder)
        return time.perf_counter() - t0

    return run


def set_adapter_fn(model: nn.Module, names: list[str], calls: int) -> Callable[[], float]:
    def run() -> float:
        t0 = time.perf_counter()
        for i in range(calls):
            model.set_adapter(names[i % len(names)])
        return (time.perf_counter() - t0) / calls

    return run


def run_b5(ctx: Context, rounds: int) -> None:
    scale = ctx.scale
    tag = f"llama-70B skeleton on meta ({scale.skeleton_layers} layers), all-linear r=16"
    with ctx.case(tag):
        import peft

        theirs = peft.get_peft_model(skeleton(scale), peft.LoraConfig(r=16, target_modules="all-linear"))
        ours = core_lora(skeleton(scale), r=16, target_modules="all-linear")
        st = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(theirs).items()}
        so = {k: tuple(v.shape) for k, v in ours.get_adapter_state_dict().items()}
        ctx.agree_true(f"{tag}: same adapter tensors", st == so and len(st) == 14 * scale.skeleton_layers,
                       f"{len(so)} vs {len(st)} tensors, same keys and shapes: {st == so}")
        del theirs, ours
        t = alternate({"peft-core": wrap_fn(scale, "peft-core"), "peft": wrap_fn(scale, "peft")}, rounds,
                      scale.warmup)
        ctx.row(tag, "get_peft_model", fmt_s(t.median("peft-core")), fmt_s(t.median("peft")),
                ratio=t.ratio("peft-core", "peft"), spread=t.spread("peft-core", "peft"), target=Target.at_most(0.3))

    tag = f"load a saved adapter (llama hidden {scale.hidden}, {scale.layers} layers, all-linear r=16)"
    with ctx.case(tag), tempfile.TemporaryDirectory() as folder:
        import peft
        import peft_core

        base = build_llama(scale)
        peft_lora(clone_model(base), **LORA).save_pretrained(folder)
        batch = token_batch(scale, batch=2, seq=16)
        with torch.no_grad():
            lt = peft.PeftModel.from_pretrained(clone_model(base), folder).eval()(**batch).logits
            lo = peft_core.PeftModel.from_pretrained(clone_model(base), folder).eval()(**batch).logits
        ctx.agree(f"{tag}: logits after loading", rel_err(lo, lt), 1e-5)
        t = alternate({"peft-core": load_fn(base, folder, "peft-core"), "peft": load_fn(base, folder, "peft")},
                      rounds, scale.warmup)
        ctx.row(tag, "PeftModel.from_pretrained", fmt_s(t.median("peft-core")), fmt_s(t.median("peft")),
                ratio=t.ratio("peft-core", "peft"), spread=t.spread("peft-core", "peft"), target=Target.at_most(0.5))

    lo_count, hi_count = scale.set_adapter_counts
    tag = f"set_adapter, {lo_count} vs {hi_count} adapters loaded (all-linear r=8)"
    with ctx.case(tag):
        import peft_core

        cfg = {**LORA, "r": 8}
        base = build_llama(scale)
        models: dict[str, nn.Module] = {}
        counts = sorted({lo_count, 2, hi_count})
        for count in counts:
            theirs = peft_lora(clone_model(base), adapter_name="a0", **cfg)
            ours = core_lora(clone_model(base), adapter_name="a0", **cfg)
            sync_adapter(theirs, ours, "a0")
            for i in range(1, count):
                peft_add_lora(theirs, f"a{i}", seed=i, **cfg)
                ours.add_adapter(f"a{i}", peft_core.LoraConfig(**cfg))
                sync_adapter(theirs, ours, f"a{i}")
            models[f"peft-core {count}"] = ours.eval()
            models[f"peft {count}"] = theirs.eval()
        batch = token_batch(scale, batch=2, seq=16)
        last = f"a{hi_count - 1}"
        for lib in ("peft-core", "peft"):
            models[f"{lib} {hi_count}"].set_adapter(last)
        with torch.no_grad():
            err = rel_err(models[f"peft-core {hi_count}"](**batch).logits, models[f"peft {hi_count}"](**batch).logits)
        ctx.agree(f"{tag}: logits after set_adapter({last!r})", err, 1e-5)
        for m in models.values():
            m.set_adapter("a0")
        # the same call with 1 and with 64 adapters loaded: re-activating "a0" (equal work if flat), and a
        # real switch a0 <-> a1 with 2 and with 64 loaded (each switch updates two adapters, not one)
        fns = {}
        for lib in ("peft-core", "peft"):
            for count in (lo_count, hi_count):
                fns[f"{lib} {count} same"] = set_adapter_fn(models[f"{lib} {count}"], ["a0"], scale.set_adapter_calls)
            for count in (2, hi_count):
                fns[f"{lib} {count} switch"] = set_adapter_fn(models[f"{lib} {count}"], ["a1", "a0"],
                                                              scale.set_adapter_calls)
        t = alternate(fns, rounds, scale.warmup)

        def peft_note(a: str, b: str) -> str:
            return f"peft: {fmt_s(t.median(a))} vs {fmt_s(t.median(b))}, {t.ratio(a, b):.2f}x"

        hi, lo = f"peft-core {hi_count} same", f"peft-core {lo_count} same"
        ctx.row(tag, f"set_adapter('a0'), {hi_count} vs {lo_count} loaded", fmt_s(t.median(hi)), fmt_s(t.median(lo)),
                f"peft-core with {lo_count} loaded", ratio=t.ratio(hi, lo), spread=t.spread(hi, lo),
                target=Target(kind="max_ratio", value=FLAT, text=f"flat (≤{FLAT:g}x)"),
                note=peft_note(f"peft {hi_count} same", f"peft {lo_count} same"))
        hi, lo = f"peft-core {hi_count} switch", "peft-core 2 switch"
        ctx.row(tag, f"switch a0<->a1, {hi_count} vs 2 loaded (reference)", fmt_s(t.median(hi)), fmt_s(t.median(lo)),
                "peft-core with 2 loaded", ratio=t.ratio(hi, lo), spread=t.spread(hi, lo),
                note=peft_note(f"peft {hi_count} switch", "peft 2 switch"))
        ctx.row(tag, f"switch a0<->a1 with {hi_count} loaded (reference)", fmt_s(t.median(hi)),
                fmt_s(t.median(f"peft {hi_count} switch")), ratio=t.ratio(hi, f"peft {hi_count} switch"))
