"""``python -m benchmarks.diagnose [--only dropout,nodrop,mixed,set_adapter,kernels,profile]``: micro-benchmarks and
profiles behind DIAGNOSIS.md, i.e. *why* a target is missed. Not part of the benchmark run.

Every section times alternatives side by side (alternating rounds of ~20 ms samples, 2 threads) on the shapes
of B1 (tokens = 4 x 256, hidden 512, intermediate 1376, r = 16) and reports the best sample: on a shared
machine, noise only ever adds time, so the minimum is the estimate of an op's own cost.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .common import FULL, alternate, set_threads

N, HID, INTER, R = FULL.batch * FULL.seq, FULL.hidden, FULL.intermediate, 16
#: the clock samples are read from: wall time, or (--cpu-time, with 1 thread) this process's CPU time, which a
#: busy shared machine does not inflate
CLOCK: list[Callable[[], float]] = [time.perf_counter]


def table(title: str, fns: dict[str, Callable[[], object]], rounds: int = 21, ref: str | None = None) -> dict:
    clock = CLOCK[0]

    def repeated(f: Callable[[], object]) -> Callable[[], float]:
        f()
        t0 = clock()
        f()
        reps = max(1, int(0.02 / max(clock() - t0, 1e-6)))  # samples of about 20 ms

        def run() -> float:
            t1 = clock()
            for _ in range(reps):
                f()
            return (clock() - t1) / reps
        return run

    t = alternate({k: repeated(f) for k, f in fns.items()}, rounds=rounds, warmup=1)
    ref = ref or next(iter(fns))
    print(f"\n## {title}\n")
    print(f"{'variant':58s} {'best':>10s} {'median':>10s}   best vs {ref[:24]}")
    for k in fns:
        best = min(t.samples[k])
        print(f"{k:58s} {best * 1e3:7.2f} ms {t.median(k) * 1e3:7.2f} ms   {t.best_ratio(k, ref):6.2f}")
    return {k: min(t.samples[k]) for k in fns}


def dropped_positions(n: int, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flat indices of the dropped elements of an n-element Bernoulli(p) mask, drawn directly: the gaps
    between successive drops are Geometric(p), so ~n*p random numbers instead of n."""
    import math

    parts, start = [], -1
    while True:
        est = int(n * p + 6 * math.sqrt(n * p * (1 - p)) + 16)
        gaps = torch.empty(est, dtype=torch.float32).geometric_(p, generator=generator).to(torch.int64)
        pos = torch.cumsum(gaps, 0) + start
        parts.append(pos[pos < n])
        if pos[-1] >= n:
            return torch.cat(parts)
        start = int(pos[-1])


class SparseDropoutLora(torch.autograd.Function):
    """A sketch of LoRA with dropout at the cost of LoRA without it: ``dropout(x) @ A.T`` is
    ``(x @ A.T - x[dropped] A[:, dropped cols].T) / (1 - p)``; only the ~p*n dropped positions are drawn
    and saved (int64), never a full mask. Gradients follow the same identity."""

    @staticmethod
    def forward(ctx, result, x, a, b, scaling, p):
        x2 = x.reshape(-1, x.shape[-1])
        pos = dropped_positions(x2.numel(), p)
        rows, cols = pos // x2.shape[1], pos % x2.shape[1]
        vals = x2.reshape(-1)[pos]
        h = x2 @ a.t()
        h.index_add_(0, rows, -(vals[:, None] * a.t()[cols]))
        h.mul_(1 / (1 - p))
        out = torch.addmm(result.reshape(-1, result.shape[-1]), h, b.t(), alpha=scaling)
        ctx.save_for_backward(x, a, b, h, pos)
        ctx.p, ctx.scaling = p, scaling
        return out.view(result.shape)

    @staticmethod
    def backward(ctx, grad):
        x, a, b, h, pos = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        g2 = grad.reshape(-1, grad.shape[-1])
        gb = (g2 @ b).mul_(ctx.scaling)
        grad_b = (g2.t() @ h).mul_(ctx.scaling)
        rows, cols = pos // x2.shape[1], pos % x2.shape[1]
        vals = x2.reshape(-1)[pos]
        grad_a = gb.t() @ x2
        grad_a.t().index_add_(0, cols, -(gb[rows] * vals[:, None]))
        grad_a.mul_(1 / (1 - ctx.p))
        grad_x = (gb @ a).mul_(1 / (1 - ctx.p))
        grad_x.view(-1)[pos] = 0
        return grad, grad_x.view(x.shape), grad_a, grad_b, None, None


def check_sparse_dropout() -> float:
    """The sketch equals a dense mask built from the same dropped positions (values and gradients)."""
    torch.manual_seed(0)
    x = torch.randn(64, 48, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 48, dtype=torch.float64, requires_grad=True)
    b = torch.randn(40, 4, dtype=torch.float64, requires_grad=True)
    base = torch.randn(64, 40, dtype=torch.float64)
    state = torch.get_rng_state()
    out = SparseDropoutLora.apply(base, x, a, b, 2.0, 0.1)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, a, b), g)
    torch.set_rng_state(state)
    keep = torch.ones(x.numel(), dtype=torch.float64)
    keep[dropped_positions(x.numel(), 0.1)] = 0
    ref = base + 2.0 * (x * keep.view_as(x) / 0.9) @ a.t() @ b.t()
    ref_grads = torch.autograd.grad(ref, (x, a, b), g)
    return max([(out - ref).abs().max().item()] + [(u - v).abs().max().item() for u, v in zip(grads, ref_grads)])


def dropout_section(dtype: torch.dtype) -> None:
    """Costs inside the LoRA dropout path for one layer's input (N x HID), forward + backward."""
    from peft_lora.functional import lora_linear  # the code under study

    def _mask(shape: torch.Size, p: float, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        # fbda7cd's design, kept here for comparison: a fresh generator and a dense mask in x's dtype
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        return torch.empty(shape, device=device, dtype=dtype).bernoulli_(1.0 - p, generator=gen).mul_(1 / (1 - p))

    name = str(dtype).replace("torch.", "")
    x = torch.randn(N, HID, dtype=dtype)
    p = 0.05
    gen = torch.Generator().manual_seed(0)
    ones = torch.ones_like(x)
    table(f"mask generation, {N}x{HID} {name}", {
        "fbda7cd _mask (new Generator + bernoulli_ in x dtype)": lambda: _mask(x.shape, p, 123, x.device, x.dtype),
        "geometric gaps: dropped positions only": lambda: dropped_positions(x.numel(), p),
        "bernoulli_ on an fp32 buffer, default generator": lambda: torch.empty(x.shape).bernoulli_(1 - p),
        "bernoulli_ in x dtype, default generator": lambda: torch.empty_like(x).bernoulli_(1 - p),
        "torch.rand(fp32) > p (bool mask)": lambda: torch.rand(x.shape, generator=gen) > p,
        "F.dropout(x) (what peft calls)": lambda: F.dropout(x, p, True),
        "x * mask (one multiply, mask precomputed)": lambda: x * ones,
    })
    a32 = torch.randn(R, HID, requires_grad=True)
    b32 = torch.randn(HID, R, requires_grad=True)
    base = torch.randn(N, HID, dtype=dtype)

    def ours(pp: float) -> Callable[[], None]:
        def run() -> None:
            xx = x.detach().requires_grad_(True)
            out = lora_linear(base, xx, a32, b32, 2.0, pp)
            out.sum().backward()
        return run

    def peft_like(pp: float) -> Callable[[], None]:
        def run() -> None:  # PEFT: cast x to the adapter dtype (fp32), dropout, A, B, scale, add, cast back
            xx = x.detach().requires_grad_(True)
            h = F.dropout(xx.to(a32.dtype), pp, True) if pp else xx.to(a32.dtype)
            out = (base + (h @ a32.t() @ b32.t()) * 2.0).to(dtype)
            out.sum().backward()
        return run

    def ours_saved_mask() -> None:  # the alternative suggested: keep a 1-byte mask instead of regenerating
        xx = x.detach().requires_grad_(True)
        m = torch.rand(x.shape, generator=gen) > p
        xd = xx * m * (1 / (1 - p))
        h = xd @ a32.to(dtype).t()
        out = torch.addmm(base, h, b32.to(dtype).t(), alpha=2.0)
        out.sum().backward()

    def sparse_drop() -> None:
        xx = x.detach().requires_grad_(True)
        out = SparseDropoutLora.apply(base, xx, a32.to(dtype), b32.to(dtype), 2.0, p)
        out.sum().backward()

    table(f"one LoRA branch fwd+bwd, {N}x{HID} -> r={R} -> {HID}, {name}", {
        "peft-core p=0": ours(0.0), "peft-core p=0.05 (the tree's lora_linear)": ours(p),
        "peft-like p=0": peft_like(0.0), "peft-like p=0.05": peft_like(p),
        "alternative p=0.05: bool mask from torch.rand, saved": ours_saved_mask,
        "alternative p=0.05: sparse dropped positions (geometric gaps)": sparse_drop,
    })


def profile_step(dtype: torch.dtype, dropout: float, rows: int = 14) -> None:
    """torch.profiler: the ops that take the time in one B1 training step, peft-core vs peft vs the floor."""
    from torch.profiler import ProfilerActivity, profile

    from .b1_training import make_sides, step_fn
    from .common import token_batch

    batch = token_batch(FULL)
    sides = ("peft-core", "peft", "floor") if dropout == 0 else ("peft-core", "peft")
    models = make_sides(FULL, dtype, dropout, sides)
    for side, model in models.items():
        step = step_fn(side, model, batch)
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                step()
        total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 2 / 1e3
        print(f"\n## profile: {side}, {str(dtype).replace('torch.', '')}, dropout {dropout} "
              f"(self CPU total {total:.0f} ms per step)\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40))


def _mixed_variants(x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, idx: torch.Tensor,
                    w_base: torch.Tensor) -> dict[str, Callable[[], object]]:
    rows, seq, _ = x.shape
    n, out = a_stack.shape[0] - 1, b_stack.shape[1]
    order = torch.argsort(idx, stable=True)
    counts = torch.bincount(idx, minlength=n + 1).tolist()
    a_all = a_stack[1:].reshape(n * R, -1)  # every adapter's A at once
    b_cat = b_stack[1:].permute(1, 0, 2).reshape(out, n * R)

    def gather_bmm() -> torch.Tensor:  # what mixed.py does today
        h = torch.bmm(x, a_stack[idx].transpose(1, 2))
        return torch.bmm(h, b_stack[idx].transpose(1, 2))

    def gather_only() -> tuple[torch.Tensor, torch.Tensor]:
        return a_stack[idx], b_stack[idx]

    def grouped() -> torch.Tensor:  # rows sorted by adapter, one matmul pair per adapter on a contiguous slice
        xs = x[order]
        outs, start = [], 0
        for slot in range(1, n + 1):
            c = counts[slot]
            if c:
                outs.append(xs[start:start + c] @ a_stack[slot].t() @ b_stack[slot].t())
                start += c
        res = torch.empty(rows, seq, out)
        res[order] = torch.cat(outs)
        return res

    def all_adapters_masked() -> torch.Tensor:  # x @ [A_1..A_n]^T, keep each row's r columns, one GEMM for B
        h = (x @ a_all.t()).view(rows, seq, n, R)
        keep = F.one_hot(idx - 1, n).to(x.dtype).view(rows, 1, n, 1)
        return (h * keep).view(rows, seq, n * R) @ b_cat.t()

    def base_linear() -> torch.Tensor:
        return x @ w_base.t()

    ref = gather_bmm()
    for f in (grouped, all_adapters_masked):
        assert torch.allclose(f(), ref, rtol=1e-3, atol=1e-2), f.__name__
    return {"mixed.py today: gather A[rows], B[rows] + 2 bmm": gather_bmm,
            "  of which the two gathers alone": gather_only,
            "rows grouped by adapter, 2 matmuls per adapter": grouped,
            "all adapters' A in one GEMM, masked, one GEMM for B": all_adapters_masked,
            "(the base layer's own matmul, for scale)": base_linear}


def mixed_section() -> None:
    """Where the time of a mixed-batch LoRA layer goes (B4 shapes: 32 rows, 16 adapters, hidden 512)."""
    rows, n = 32, 16
    a_stack = torch.randn(n + 1, R, HID)
    b_stack = torch.randn(n + 1, INTER, R)
    idx = torch.arange(rows) % n + 1
    w_base = torch.randn(INTER, HID)
    for seq in (1, 32):
        with torch.no_grad():
            table(f"mixed LoRA delta for one {HID}->{INTER} layer, {rows} rows x seq {seq}, {n} adapters, r={R}",
                  _mixed_variants(torch.randn(rows, seq, HID), a_stack, b_stack, idx, w_base))


def set_adapter_section() -> None:
    """What set_adapter spends its time on with 64 adapters loaded."""
    import cProfile
    import pstats

    import peft_core

    from .b1_training import LORA
    from .common import build_llama, core_lora

    model = core_lora(build_llama(FULL), adapter_name="a0", **{**LORA, "r": 8})
    for i in range(1, 64):
        model.add_adapter(f"a{i}", peft_core.LoraConfig(**{**LORA, "r": 8}))
    pr = cProfile.Profile()
    pr.enable()
    for i in range(100):
        model.set_adapter(f"a{i % 2}")
    pr.disable()
    print("\n## set_adapter x100 with 64 adapters loaded (cProfile, cumulative)\n")
    pstats.Stats(pr).sort_stats("cumulative").print_stats(12)


def _nodrop_variants(dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    from peft_lora.functional import lora_linear

    x = torch.randn(N, HID, dtype=dtype)
    w = torch.randn(INTER, HID, dtype=dtype)
    a32 = torch.randn(R, HID, requires_grad=True)
    b32 = torch.randn(INTER, R, requires_grad=True)
    a_cast = a32.detach().to(dtype).requires_grad_(True)
    b_cast = b32.detach().to(dtype).requires_grad_(True)

    def frozen() -> None:
        xx = x.detach().requires_grad_(True)
        F.linear(xx, w).sum().backward()

    def lora() -> None:
        xx = x.detach().requires_grad_(True)
        lora_linear(F.linear(xx, w), xx, a32, b32, 2.0, 0.0).sum().backward()

    def lora_matmuls_only() -> None:  # the same FLOPs with the weights already in the activation dtype
        xx = x.detach().requires_grad_(True)
        torch.addmm(F.linear(xx, w), xx @ a_cast.t(), b_cast.t(), alpha=2.0).sum().backward()

    return {"frozen base layer (floor)": frozen, "peft-core lora_linear": lora,
            "LoRA with weights pre-cast (no per-step .to)": lora_matmuls_only}


def nodrop_section() -> None:
    """B1 at dropout 0: the LoRA layer's cost over the frozen base layer (one 512->1376 layer)."""
    flops_base = 2 * 2 * N * HID * INTER  # forward + input gradient
    flops_lora = 3 * 2 * N * R * (HID + INTER)  # forward, input gradient, weight gradients of A and B
    for dtype in (torch.float32, torch.bfloat16):
        table(f"one {HID}->{INTER} layer fwd+bwd, {N} tokens, {str(dtype).replace('torch.', '')}: frozen vs LoRA "
              f"(LoRA adds {100 * flops_lora / flops_base:.1f}% FLOPs)", _nodrop_variants(dtype))


def decode_section() -> None:
    """One decode token (4 rows): the LoRA branch of one 512->1376 layer computed in bf16 (peft-core, adapter
    weights cast per call) vs in fp32 (PEFT: the 4 activation rows are cast instead)."""
    from peft_lora.functional import lora_linear

    x = torch.randn(4, 1, HID, dtype=torch.bfloat16)
    w = torch.randn(INTER, HID, dtype=torch.bfloat16)
    a32, b32 = torch.randn(R, HID), torch.randn(INTER, R)
    a16, b16 = a32.to(torch.bfloat16), b32.to(torch.bfloat16)
    with torch.no_grad():
        table("decode: LoRA branch of one 512->1376 bf16 layer, 4 rows x 1 token", {
            "base layer alone": lambda: F.linear(x, w),
            "peft-core: base + lora_linear (bf16, casts A, B)": lambda: lora_linear(F.linear(x, w), x, a32, b32, 2),
            "bf16 with A, B cast once (cached)": lambda: lora_linear(F.linear(x, w), x, a16, b16, 2.0),
            "fp32 branch: cast the 4 rows, not the weights": lambda: F.linear(x, w).add_(
                (x.float() @ a32.t() @ b32.t()).mul_(2.0).to(torch.bfloat16)),
        }, rounds=31)


def python_overhead_section() -> None:
    """cProfile of one forward where Python overhead matters: a mixed 16-adapter decode call, and
    PeftModel.from_pretrained of a saved adapter (B4 / B5 shapes)."""
    import cProfile
    import pstats
    import tempfile

    import peft_core

    from .b3_inference import decode_fn
    from .b4_mixed import build_pair, names_for
    from .common import Context, build_llama, peft_lora, token_batch

    ctx = Context(scale=FULL, log=lambda _: None)
    _, ours, theirs = build_pair(ctx, 16)
    batch = token_batch(FULL, batch=32, seq=32, seed=4)
    names = names_for(16, 32)
    for lib, model in (("peft-core", ours), ("peft", theirs)):
        run, _ = decode_fn(model, batch, adapter_names=names)
        run()
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(20):
            run()
        pr.disable()
        print(f"\n## {lib}: 20 mixed decode calls, 16 adapters in 32 rows (cProfile, tottime)\n")
        pstats.Stats(pr).sort_stats("tottime").print_stats(10)
    base = build_llama(FULL)
    from .b1_training import LORA
    from .common import clone_model

    with tempfile.TemporaryDirectory() as folder:
        peft_lora(clone_model(base), **LORA).save_pretrained(folder)
        peft_core.PeftModel.from_pretrained(clone_model(base), folder)
        copies = [clone_model(base) for _ in range(10)]
        pr = cProfile.Profile()
        pr.enable()
        for m in copies:
            peft_core.PeftModel.from_pretrained(m, folder)
        pr.disable()
    print("\n## peft-core: PeftModel.from_pretrained x10 (cProfile, cumulative)\n")
    pstats.Stats(pr).sort_stats("cumulative").print_stats(22)


def virtual_tokens_section() -> None:
    """B7's headroom: a prompt/prefix-tuning step against the frozen floor with and without 200 extra
    tokens (the floor cannot be beaten by the method; 0.75x of PEFT may sit below it)."""
    import peft
    import peft_core

    from .b1_training import loss_of, step_fn
    from .common import build_llama, clone_model, token_batch

    batch = token_batch(FULL)
    long_batch = token_batch(FULL, seq=FULL.seq + FULL.virtual_tokens)
    base = build_llama(FULL, kv_heads=FULL.heads).train()
    floor = clone_model(base).requires_grad_(False).train()
    fns: dict[str, Callable[[], object]] = {
        f"floor, {FULL.seq} tokens": lambda: loss_of("floor", floor, batch).backward(),
        f"floor, {FULL.seq + FULL.virtual_tokens} tokens": lambda: loss_of("floor", floor, long_batch).backward(),
    }
    for method, cls in (("prompt", "PromptTuningConfig"), ("prefix", "PrefixTuningConfig")):
        kw = {"task_type": "CAUSAL_LM", "num_virtual_tokens": FULL.virtual_tokens}
        if method == "prefix":
            kw["prefix_projection"] = False
        for lib, mod in (("peft", peft), ("peft-core", peft_core)):
            try:
                model = mod.get_peft_model(clone_model(base), getattr(mod, cls)(**kw)).train()
            except Exception as e:
                print(f"{lib} {method}: {type(e).__name__}")
                continue
            fns[f"{lib} {method} tuning step"] = step_fn(lib, model, batch)
    table(f"B7 headroom: train step, batch {FULL.batch} x seq {FULL.seq}", fns, rounds=5)


def _forced(row: object, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with CPU tensors taking the kernels of a peft_lora.hardware table row."""
    from peft_lora import hardware

    def run() -> object:
        saved = dict(hardware._CACHE)
        hardware._CACHE.update({(torch.device("cpu"), d): row for d in (torch.float32, torch.bfloat16, torch.float16)})
        try:
            return fn()
        finally:
            hardware._CACHE.clear()
            hardware._CACHE.update(saved)
    return run


def kernels_section() -> None:
    """The crossovers behind peft_lora.hardware's CPU rows: the fp32 route against half-precision GEMMs (bf16/fp16
    activations, fp32 adapters) by tokens, and a whole mixed-batch layer grouped against per-row by tokens per row.
    Run it again with ``ONEDNN_MAX_CPU_ISA=AVX2`` (or ``AVX512_CORE``, ...) to see a CPU without AMX/bf16 units."""
    import peft_core
    from peft_lora import hardware
    from peft_lora.functional import lora_linear
    from peft_lora.hardware import UNBOUNDED, LoraKernelChoices

    row = hardware.choices(torch.device("cpu"), torch.bfloat16)
    print(f"this CPU: bf16 {hardware.half_gemm_capability(torch.bfloat16)}, "
          f"fp16 {hardware.half_gemm_capability(torch.float16)}, bf16 row {row}")
    a, b = torch.randn(R, HID) * 0.02, torch.randn(INTER, R) * 0.02
    for dtype in (torch.bfloat16, torch.float16):
        for tokens in (1, 64, 128, 512):
            x, res = torch.randn(tokens, HID).to(dtype), torch.randn(tokens, INTER).to(dtype)
            with torch.no_grad():
                table(f"LoRA delta {HID}->{INTER}, {tokens} tokens, {dtype}, fp32 adapters", {
                    route: _forced(LoraKernelChoices(at, 0.3, 16), lambda x=x, res=res: lora_linear(res, x, a, b, 2.0))
                    for route, at in (("fp32 route", UNBOUNDED), ("half-precision GEMMs", 0))}, rounds=7)

    class One(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(HID, INTER)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    for dtype in (torch.float32, torch.bfloat16):
        cfg = {"target_modules": ["proj"], "r": R, "init_lora_weights": False}
        model = peft_core.get_peft_model(One().to(dtype), peft_core.LoraConfig(**cfg), adapter_name="a0")
        for i in range(1, 16):
            model.add_adapter(f"a{i}", peft_core.LoraConfig(**cfg))
        layer = next(m for n, m in model.named_modules() if n.endswith("proj"))
        names = [f"a{i % 16}" for i in range(32)]
        for tokens in (1, 8, 16, 32):
            x = torch.randn(32, tokens, HID, dtype=dtype)

            def call(x: torch.Tensor = x, model: torch.nn.Module = model, layer: torch.nn.Module = layer) -> object:
                with torch.no_grad(), model._runtime.route(names):  # noqa: B023 (names: the same every loop)
                    return layer(x)
            table(f"mixed-batch layer {HID}->{INTER}, 32 rows x {tokens} tokens, 16 adapters, {dtype}", {
                route: _forced(LoraKernelChoices(0, 0.3, at), call)
                for route, at in (("grouped by adapter", UNBOUNDED), ("per-row gather", 1))}, rounds=7)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="dropout,nodrop,mixed,set_adapter,decode,overhead,virtual,profile,kernels")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cpu-time", action="store_true", help="time with process CPU time (use with --threads 1)")
    args = ap.parse_args()
    set_threads(args.threads)
    if args.cpu_time:
        CLOCK[0] = time.process_time
    print(f"threads {args.threads}, clock {'process CPU time' if args.cpu_time else 'wall'}")
    parts = args.only.split(",")
    t0 = time.perf_counter()
    if "dropout" in parts:
        print(f"sparse-dropout sketch vs dense mask from the same positions: max abs diff {check_sparse_dropout():.1e}")
        for dtype in (torch.float32, torch.bfloat16):
            dropout_section(dtype)
    if "nodrop" in parts:
        nodrop_section()
    if "mixed" in parts:
        mixed_section()
    if "set_adapter" in parts:
        set_adapter_section()
    if "virtual" in parts:
        virtual_tokens_section()
    if "decode" in parts:
        decode_section()
    if "overhead" in parts:
        python_overhead_section()
    if "kernels" in parts:
        kernels_section()
    if "profile" in parts:
        profile_step(torch.bfloat16, 0.05)
        profile_step(torch.float32, 0.0)
    print(f"\n(diagnose: {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
