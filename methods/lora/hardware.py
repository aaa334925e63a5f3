"""LoRA kernel choices that depend on the machine, read from a small table instead of hard-coded constants.

Three choices in :mod:`.functional` and :mod:`.mixed` are faster one way on one machine and the other way on
another. Each route gives the same numbers (up to rounding; the tests force every branch), so the choice is about
speed only, and it is made here from what the device is:

- ``fp32_route_max_tokens``: half-precision activations with fp32 adapters (``autocast_adapter_dtype``) run the
  LoRA branch in fp32, rounding once at the end, up to this many tokens. On a CPU without native half-precision
  GEMMs (AVX2, or fp16 without AVX512-FP16/AMX-FP16) bf16/fp16 matmuls are emulated and 5-15x slower than fp32 at
  every size, so the fp32 route always wins; with native ones it only wins for skinny (decode-sized) GEMMs, whose
  fixed overhead dominates. On CUDA half GEMMs are fast: never (0).
- ``sparse_dropout_max_p``: dropout rates up to this draw only the dropped positions (geometric gaps). That saves
  the dense mask's random numbers, most of a dropout's cost on a CPU, but needs a host sync per draw: on CUDA and
  other accelerators plain dense dropout (0.0, never sparse) is the right kernel.
- ``per_row_min_tokens``: a mixed batch (``adapter_names``) gathers each row's adapter weights and runs one ``bmm``
  per row from this many tokens per row; below it, rows are grouped by adapter and only activations are gathered.

The table (:data:`TABLE`) is keyed by (device type, half-GEMM capability); the capability of a CPU comes from its
instruction-set flags (``/proc/cpuinfo``), else from ``torch.backends.cpu.get_cpu_capability()``. Measurements:
``benchmarks/DIAGNOSIS.md`` ("Machine-dependent kernel choices").

For benchmarking and debugging, ``PEFT_CORE_LORA_KERNELS`` overrides fields on every device, e.g.
``PEFT_CORE_LORA_KERNELS="fp32_route_max_tokens=0,sparse_dropout_max_p=0.5,per_row_min_tokens=4"`` (``max`` for an
unbounded token count). It is read when a (device, dtype) is first seen; :func:`reset` forgets the cache.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from dataclasses import dataclass

import torch

__all__ = ["ENV", "TABLE", "UNBOUNDED", "LoraKernelChoices", "choices", "cpu_flags", "half_gemm_capability",
           "reset"]

ENV = "PEFT_CORE_LORA_KERNELS"
#: a token count no input reaches ("always", for ``fp32_route_max_tokens``)
UNBOUNDED = sys.maxsize


@dataclass(frozen=True)
class LoraKernelChoices:
    """The machine-dependent choices of the LoRA kernels for one device and activation dtype."""

    #: half-precision inputs with fp32 adapters run the LoRA branch in fp32 up to this many tokens (0: never)
    fp32_route_max_tokens: int
    #: dropout rates up to this use the sparse (dropped-positions) kernel (0.0: always dense ``F.dropout``)
    sparse_dropout_max_p: float
    #: mixed batches use the per-row weight gather from this many tokens per row, grouping by adapter below it
    per_row_min_tokens: int


#: (device type, half-GEMM capability) -> choices. The capability is :func:`half_gemm_capability`'s answer for the
#: activation dtype on a CPU, ``"*"`` on other devices (and for fp32 activations, where no fp32 route applies).
#: CPU numbers are one-thread CPU times of a 512->1376, r=16 layer (benchmarks/DIAGNOSIS.md); the instruction sets
#: a machine lacks were measured by capping oneDNN's ISA (``ONEDNN_MAX_CPU_ISA``) on an AMX Xeon. The sparse draw beat
#: a dense mask up to p ~ 0.4 (fp32 and bf16; it uses no half GEMM, so one limit serves every tier), and a whole
#: mixed-batch layer (32 rows, 16 adapters) ran faster grouped up to 8-12 tokens per row and per-row from 16 (fp32
#: and bf16, with AVX-512 and with AVX2 kernels).
TABLE: dict[tuple[str, str], LoraKernelChoices] = {
    # AMX tiles (bf16 on Sapphire Rapids and later, fp16 on Granite Rapids): fp32 route wins up to 64-128 tokens
    ("cpu", "AMX"): LoraKernelChoices(64, 0.3, 16),
    # AVX512-BF16 / AVX512-FP16 dot products without AMX: the same crossover, 64-128 tokens
    ("cpu", "AVX512_BF16"): LoraKernelChoices(64, 0.3, 16),
    ("cpu", "AVX512_FP16"): LoraKernelChoices(64, 0.3, 16),
    # AVX-512 without bf16 instructions: oneDNN converts bf16 to fp32 in its kernels; crossover 128-192 tokens
    ("cpu", "AVX512"): LoraKernelChoices(128, 0.3, 16),
    # no native half GEMM (AVX2, fp16 without AVX512-FP16, an unmeasured ISA): emulated half matmuls are 5-15x
    # slower than the fp32 route at every size measured (1-512 tokens)
    ("cpu", "NONE"): LoraKernelChoices(UNBOUNDED, 0.3, 16),
    # fp32 activations: no fp32 route to choose
    ("cpu", "*"): LoraKernelChoices(0, 0.3, 16),
    # CUDA (and ROCm, which is "cuda" to torch): tensor-core half GEMMs, so no fp32 route; dense dropout (the
    # sparse draw loop syncs with the host); the per-row route gathers r * (in + out) weights per row where
    # grouping moves about tokens * (in + out) activations, and bandwidth decides on a GPU: per-row from ~r tokens
    ("cuda", "*"): LoraKernelChoices(0, 0.0, 16),
}
#: any other device (xpu, mps, hpu, meta, ...): the accelerator answer (no host syncs, no fp32 route)
_OTHER = TABLE[("cuda", "*")]


def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags from ``/proc/cpuinfo`` (x86 ``flags``, ARM ``Features``); empty where
    there is no such file (then :func:`half_gemm_capability` falls back on torch's dispatch level). Not cached:
    it is read once per (device, dtype) looked up, behind :func:`choices`' cache."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def _torch_cpu_capability() -> str:
    """ATen's vector dispatch level ("AVX512", "AVX2", "DEFAULT", "VSX", "ZVECTOR", "SVE256", ...)."""
    return torch.backends.cpu.get_cpu_capability()


def half_gemm_capability(dtype: torch.dtype) -> str:
    """How a CPU multiplies ``dtype`` matrices: "AMX", "AVX512_BF16", "AVX512_FP16", "AVX512" (bf16 converted
    inside AVX-512 kernels), "NONE" (emulated), or "*" for a dtype that is not half precision."""
    if dtype not in (torch.bfloat16, torch.float16):
        return "*"
    flags = cpu_flags()
    if not flags:
        # no flags to read (not Linux): only torch's dispatch level is known, and AVX-512 implies bf16 kernels
        # in oneDNN but not fp16 ones
        return "AVX512" if dtype == torch.bfloat16 and _torch_cpu_capability() == "AVX512" else "NONE"
    if dtype == torch.bfloat16:
        if "amx_bf16" in flags:
            return "AMX"
        if "avx512_bf16" in flags:
            return "AVX512_BF16"
        # oneDNN's avx512_core: the ISA from which it has (converting) bf16 GEMM kernels
        return "AVX512" if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags else "NONE"
    if "amx_fp16" in flags:
        return "AMX"
    # without AVX512-FP16, fp16 GEMMs measured as slow as on AVX2 (emulated), AVX-512 or not
    return "AVX512_FP16" if "avx512_fp16" in flags else "NONE"


def _override(found: LoraKernelChoices) -> LoraKernelChoices:
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return found
    fields = {f.name for f in dataclasses.fields(LoraKernelChoices)}
    changes: dict[str, float | int] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        name, _, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if name not in fields or not value:
            raise ValueError(f"{ENV}={raw!r}: expected comma-separated name=value with names {sorted(fields)}")
        try:
            if isinstance(getattr(found, name), float):
                changes[name] = float(value)
            else:
                changes[name] = UNBOUNDED if value.lower() == "max" else int(value)
        except ValueError:
            wanted = "a number" if isinstance(getattr(found, name), float) else "an integer (or max)"
            raise ValueError(f"{ENV}={raw!r}: {name} takes {wanted}, not {value!r}") from None
    return dataclasses.replace(found, **changes)


@functools.cache
def _lookup(device_type: str, index: int | None, dtype: torch.dtype) -> LoraKernelChoices:
    # index: devices of one type may one day answer differently (measured at first use); the table does not yet
    del index
    if device_type == "cpu":
        found = TABLE[("cpu", half_gemm_capability(dtype))]
    else:
        found = TABLE.get((device_type, "*"), _OTHER)
    return _override(found)


#: (device, dtype) -> choices, filled on first use: the kernels ask on every layer call, and a dict lookup on
#: these two keys is the cheapest answer (decoding is dominated by per-layer Python work)
_CACHE: dict[tuple[torch.device, torch.dtype], LoraKernelChoices] = {}


# torch.compile calls this at trace time and keeps the answer as a constant (it reads a file and the environment,
# which dynamo cannot trace, and fills a cache that dynamo would otherwise guard on); the answer cannot change
# while the process runs, short of reset()
@torch.compiler.assume_constant_result
def choices(device: torch.device, dtype: torch.dtype) -> LoraKernelChoices:
    """The kernel choices for activations of ``dtype`` on ``device``."""
    found = _CACHE.get((device, dtype))
    if found is None:
        found = _CACHE[(device, dtype)] = _lookup(device.type, device.index, dtype)
    return found


def reset() -> None:
    """Forget every answer (after changing :data:`ENV`, or in tests that fake another machine)."""
    _CACHE.clear()
    _lookup.cache_clear()
