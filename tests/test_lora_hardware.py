"""peft_lora.hardware: every branch of the kernel-choice table, and every route it can pick giving the same numbers.

The machine is faked by patching the detection (``cpu_flags``, torch's dispatch level); routes are forced by putting
a table row in the choice cache for CPU tensors, so the CUDA row's kernels (dense dropout, no fp32 route) run here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from conftest import model_inputs, tiny_llama
from peft_core import LoraConfig, get_peft_model
from peft_lora import functional, hardware, mixed
from peft_lora.functional import lora_linear
from peft_lora.hardware import TABLE, UNBOUNDED, LoraKernelChoices, choices

CPU = torch.device("cpu")
AVX512 = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"})
CUDA_ROW = TABLE[("cuda", "*")]


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test starts and ends with no cached answer and no override, so no fake machine leaks out."""
    monkeypatch.delenv(hardware.ENV, raising=False)
    hardware.reset()
    yield
    hardware.reset()


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    def fake(flags: set[str] | frozenset[str], capability: str = "AVX2") -> None:
        monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
        monkeypatch.setattr(hardware, "_torch_cpu_capability", lambda: capability)
        hardware.reset()
    return fake


@pytest.fixture
def force(monkeypatch: pytest.MonkeyPatch) -> Callable[[LoraKernelChoices], None]:
    """Make CPU tensors of every float dtype take the kernels of ``row``."""
    def put(row: LoraKernelChoices) -> None:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            monkeypatch.setitem(hardware._CACHE, (CPU, dtype), row)
    return put


# --- the table, one case per branch --------------------------------------------------------------------------------

@pytest.mark.parametrize(("flags", "capability", "dtype", "kind", "fp32_route"), [
    (AVX512 | {"avx512_bf16", "amx_bf16", "amx_tile"}, "AVX512", torch.bfloat16, "AMX", 64),
    (AVX512 | {"avx512_bf16"}, "AVX512", torch.bfloat16, "AVX512_BF16", 64),
    (AVX512, "AVX512", torch.bfloat16, "AVX512", 128),
    ({"avx2", "fma"}, "AVX2", torch.bfloat16, "NONE", UNBOUNDED),
    (AVX512 | {"amx_fp16", "avx512_fp16"}, "AVX512", torch.float16, "AMX", 64),
    (AVX512 | {"avx512_fp16", "amx_bf16"}, "AVX512", torch.float16, "AVX512_FP16", 64),
    # AMX-BF16 and AVX512-BF16 do nothing for fp16: its GEMMs are emulated, as on AVX2
    (AVX512 | {"amx_bf16", "avx512_bf16"}, "AVX512", torch.float16, "NONE", UNBOUNDED),
    ({"fp", "asimd", "bf16"}, "DEFAULT", torch.bfloat16, "NONE", UNBOUNDED),  # an unmeasured (ARM) CPU
    # no /proc/cpuinfo: torch's dispatch level only
    (set(), "AVX512", torch.bfloat16, "AVX512", 128),
    (set(), "AVX512", torch.float16, "NONE", UNBOUNDED),
    (set(), "AVX2", torch.bfloat16, "NONE", UNBOUNDED),
    (AVX512 | {"amx_bf16"}, "AVX512", torch.float32, "*", 0),  # fp32 activations: nothing to route
])
def test_cpu_rows(machine, flags, capability, dtype, kind, fp32_route):
    machine(flags, capability)
    assert hardware.half_gemm_capability(dtype) == kind
    got = choices(CPU, dtype)
    assert got == TABLE[("cpu", kind)]
    # the sparse-dropout limit and the mixed-batch crossover were measured the same on every CPU tier
    assert got == LoraKernelChoices(fp32_route, 0.3, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", ["cuda", "cuda:1", "xpu", "mps", "meta"])
def test_accelerators_take_no_fp32_route_and_dense_dropout(machine, device, dtype):
    machine(AVX512 | {"amx_bf16"}, "AVX512")  # the host CPU does not matter
    got = choices(torch.device(device), dtype)
    assert got == CUDA_ROW
    assert got.fp32_route_max_tokens == 0 and got.sparse_dropout_max_p == 0.0 and got.per_row_min_tokens == 16


def test_cpu_flags_parses_this_machine():
    flags = hardware.cpu_flags()
    assert isinstance(flags, frozenset)
    # whatever the machine, the answer is one of the table's rows
    assert ("cpu", hardware.half_gemm_capability(torch.bfloat16)) in TABLE


def test_answers_are_cached_per_device_and_dtype(machine, monkeypatch):
    machine({"avx2"})
    first = choices(CPU, torch.bfloat16)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: pytest.fail("looked up again"))
    assert choices(CPU, torch.bfloat16) is first
    assert choices(torch.device("cpu"), torch.bfloat16) is first


def test_environment_override(machine, monkeypatch):
    machine(AVX512 | {"amx_bf16"}, "AVX512")
    monkeypatch.setenv(hardware.ENV, " fp32_route_max_tokens=max, sparse_dropout_max_p=0.5,")
    hardware.reset()
    assert choices(CPU, torch.bfloat16) == LoraKernelChoices(UNBOUNDED, 0.5, 16)
    assert choices(torch.device("cuda"), torch.bfloat16) == LoraKernelChoices(UNBOUNDED, 0.5, 16)
    monkeypatch.setenv(hardware.ENV, "per_row_min_tokens=3")
    assert choices(CPU, torch.bfloat16).per_row_min_tokens == 16  # read once, until reset()
    hardware.reset()
    assert choices(CPU, torch.bfloat16).per_row_min_tokens == 3


@pytest.mark.parametrize(("value", "message"), [
    ("per_row=3", "names"), ("per_row_min_tokens", "names"), ("per_row_min_tokens=1.5", "an integer"),
    ("sparse_dropout_max_p=high", "a number"),
])
def test_bad_environment_override_names_the_variable(monkeypatch, value, message):
    monkeypatch.setenv(hardware.ENV, value)
    with pytest.raises(ValueError, match=f"{hardware.ENV}.*{message}"):
        choices(CPU, torch.float32)


def test_choice_is_a_constant_under_torch_compile():
    """The lookup reads a file; torch.compile must take its answer as a constant, not break the graph on it."""
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    a, b, base = torch.randn(4, 32), torch.randn(16, 4), torch.randn(3, 16, dtype=torch.bfloat16)
    fn = torch.compile(lambda base, x: lora_linear(base, x, a, b, 0.5), fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(base, x), lora_linear(base, x, a, b, 0.5), rtol=0, atol=0)


# --- each route gives the same numbers -----------------------------------------------------------------------------

def near(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """Equal up to rounding: 1e-5 in fp32, a few half-precision ulps of the largest magnitude otherwise (sums of
    hundreds of products rounded in bf16 differ by more than an elementwise relative tolerance allows)."""
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        return
    got, want = got.double(), want.double()
    assert (got - want).abs().max() <= 4 * torch.finfo(dtype).eps * want.abs().max()


FP32_ALWAYS = LoraKernelChoices(UNBOUNDED, 0.3, 8)
FP32_NEVER = LoraKernelChoices(0, 0.3, 8)
FP32_UP_TO_1000 = LoraKernelChoices(1000, 0.3, 8)  # a bounded (native-tier) crossover past these sizes


def _fp32_route(base: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    return (base.float() + s * (x.float() @ a.t()) @ b.t()).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 300])  # decode-sized, and past every finite crossover of the table
def test_fp32_route_and_half_route_agree(force, dtype, tokens):
    torch.manual_seed(0)
    x = torch.randn(tokens, 64).to(dtype)
    a, b = (torch.randn(8, 64) * 0.2).requires_grad_(), (torch.randn(32, 8) * 0.2).requires_grad_()
    base = torch.randn(tokens, 32).to(dtype)
    exact = base.double() + 0.5 * (x.double() @ a.detach().double().t()) @ b.detach().double().t()
    outs, grads = {}, {}
    for name, row in (("fp32", FP32_UP_TO_1000), ("half", FP32_NEVER)):
        force(row)
        xx = x.clone().requires_grad_()
        out = lora_linear(base, xx, a, b, 0.5)
        assert out.dtype == dtype and out.shape == base.shape
        outs[name] = out
        grads[name] = torch.autograd.grad(out.float().square().sum(), (xx, a, b))
    # the fp32 route is the formula rounded once; the half route rounds the adapters and the bottleneck too
    assert torch.equal(outs["fp32"], _fp32_route(base, x, a.detach(), b.detach(), 0.5))
    err = {k: (v.double() - exact).abs().max().item() for k, v in outs.items()}
    assert err["fp32"] <= err["half"] + 1e-12
    near(outs["half"], outs["fp32"], dtype)
    for u, v in zip(grads["fp32"], grads["half"]):
        assert u.dtype == v.dtype
        near(u, v, dtype)


def test_unbounded_fp32_route_is_for_inference_only(force):
    """Where half GEMMs are emulated (the table's "always"), training keeps the half route: the fp32 one would save
    an fp32 copy of each adapted layer's input for backward. Inference takes it at any size."""
    force(FP32_ALWAYS)
    torch.manual_seed(0)
    x = torch.randn(300, 64).to(torch.bfloat16)
    a, b = (torch.randn(8, 64) * 0.2).requires_grad_(), (torch.randn(32, 8) * 0.2).requires_grad_()
    base = torch.randn(300, 32).to(torch.bfloat16)
    half = torch.addmm(base, x @ a.detach().bfloat16().t(), b.detach().bfloat16().t(), alpha=0.5)
    assert torch.equal(lora_linear(base, x, a, b, 0.5), half)
    with torch.no_grad():
        assert torch.equal(lora_linear(base, x, a, b, 0.5), _fp32_route(base, x, a, b, 0.5))


def test_no_fp32_route_for_half_adapters(force):
    """Adapters already in the activation dtype stay in it, whatever the table says."""
    force(FP32_ALWAYS)
    torch.manual_seed(0)
    x = torch.randn(5, 64).to(torch.bfloat16)
    a, b, base = torch.randn(8, 64).bfloat16(), torch.randn(32, 8).bfloat16(), torch.randn(5, 32).bfloat16()
    assert torch.equal(lora_linear(base, x, a, b, 0.5), torch.addmm(base, x @ a.t(), b.t(), alpha=0.5))


def _mask_and_output(p: float, seed: int, a: torch.Tensor, b: torch.Tensor, x: torch.Tensor,
                     base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The dropout mask a call draws (read off an identity adapter under the same seed), and that call's output."""
    eye = torch.eye(x.shape[-1], dtype=x.dtype)
    torch.manual_seed(seed)
    seen = lora_linear(torch.zeros_like(x), x.detach(), eye, eye, 1.0, p=p)
    torch.manual_seed(seed)
    out = lora_linear(base, x, a, b, 0.5, p=p)
    return seen != 0, out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("route", ["sparse", "dense"])
def test_sparse_and_dense_dropout_are_the_same_dropout(force, monkeypatch, dtype, route):
    """Either kernel: a Bernoulli(p) mask scaled by 1/(1-p), the same output and gradients as the textbook
    formula with that mask, and (for the dense one) no sparse draw at all."""
    p = 0.25
    force(LoraKernelChoices(0, 0.3 if route == "sparse" else 0.0, 8))
    if route == "dense":
        monkeypatch.setattr(functional, "dropped_positions", lambda *a: pytest.fail("sparse draw on the dense route"))
    torch.manual_seed(0)
    x = (torch.rand(6, 7, 64) + 0.5).to(dtype).requires_grad_()  # no zeros: a zero output means dropped
    a = torch.randn(4, 64, dtype=dtype, requires_grad=True)
    b = torch.randn(16, 4, dtype=dtype, requires_grad=True)
    base = torch.randn(6, 7, 16, dtype=dtype, requires_grad=True)
    keep, out = _mask_and_output(p, 123, a, b, x, base)
    rate = 1 - keep.float().mean().item()
    assert abs(rate - p) < 5 * (p * (1 - p) / keep.numel()) ** 0.5
    ref = base + 0.5 * ((x * keep / (1 - p)) @ a.t()) @ b.t()
    near(out, ref, dtype)
    g = torch.randn_like(out)
    for u, v in zip(torch.autograd.grad(out, (x, a, b, base), g), torch.autograd.grad(ref, (x, a, b, base), g)):
        near(u, v, dtype)


def test_sparse_and_dense_dropout_statistics_match(force):
    """Over many draws both kernels drop each element independently with probability p (rate, and neighbours)."""
    p, x = 0.3, torch.ones(1, 200_000)
    eye = torch.eye(1)
    for row in (LoraKernelChoices(0, 0.3, 8), CUDA_ROW):
        force(row)
        torch.manual_seed(1)
        kept = lora_linear(torch.zeros(200_000, 1), x.t(), eye, eye, 1.0, p=p).view(-1) != 0
        n = kept.numel()
        assert abs((~kept).float().mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5
        both = (~kept[1:] & ~kept[:-1]).float().mean().item()
        assert abs(both - p * p) < 5 * (p * p / n) ** 0.5 + 1e-4


@pytest.mark.parametrize("seq", [1, 5, 16])
def test_per_row_and_grouped_mixed_batches_agree(force, monkeypatch, seq):
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(target_modules=["q_proj", "o_proj"], r=2, init_lora_weights=False))
    x = model_inputs("llama", batch=6, seq=seq)
    rows = ["b", "__base__", "default", "b", "b", "default"]
    calls = []
    per_row = mixed._per_row
    monkeypatch.setattr(mixed, "_per_row", lambda *a: calls.append(1) or per_row(*a))
    logits = {}
    for name, at in (("per_row", 1), ("grouped", UNBOUNDED)):
        force(LoraKernelChoices(0, 0.3, at))
        calls.clear()
        with torch.no_grad():
            logits[name] = model(**x, adapter_names=rows).logits
        assert bool(calls) == (name == "per_row")
    assert (logits["per_row"] - logits["grouped"]).abs().max() <= 1e-6


def test_cuda_row_kernels_run_correctly_on_cpu_tensors(force, monkeypatch):
    """What a CUDA device gets (no fp32 route, dense dropout, per-row from 16 tokens) is correct maths anywhere."""
    force(CUDA_ROW)
    monkeypatch.setattr(functional, "dropped_positions", lambda *a: pytest.fail("sparse draw on the CUDA row"))
    torch.manual_seed(0)
    x = torch.randn(2, 64).to(torch.bfloat16)
    a, b, base = torch.randn(8, 64), torch.randn(32, 8), torch.randn(2, 32).to(torch.bfloat16)
    # no fp32 route: the adapters are cast to the activation dtype and the maths runs in bf16
    half = torch.addmm(base, x @ a.bfloat16().t(), b.bfloat16().t(), alpha=0.5)
    assert torch.equal(lora_linear(base, x, a, b, 0.5), half)
    # dense dropout, gradients flow
    xx = x.float().requires_grad_()
    out = lora_linear(base.float(), xx, a, b, 0.5, p=0.1)
    out.sum().backward()
    assert xx.grad is not None and torch.isfinite(xx.grad).all()
    # mixed batches: grouped below 16 tokens per row, per-row from 16, equal to the single-adapter runs
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    calls = []
    per_row = mixed._per_row
    monkeypatch.setattr(mixed, "_per_row", lambda *a: calls.append(1) or per_row(*a))
    for seq, want_per_row in ((15, False), (16, True)):
        calls.clear()
        inputs = model_inputs("llama", batch=2, seq=seq)
        with torch.no_grad():
            got = model(**inputs, adapter_names=["default", "__base__"]).logits
            single = model(**inputs).logits
            with model.disable_adapter():
                plain = model(**inputs).logits
        assert bool(calls) == want_per_row
        assert (got[0] - single[0]).abs().max() <= 1e-5 and (got[1] - plain[1]).abs().max() <= 1e-5
