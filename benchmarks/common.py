"""Shared pieces of the benchmark harness: sizes, models built from configs, the two libraries' LoRA
set-up with identical weights, agreement checks, alternating timers, and memory probes."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import os
import re
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*")
warnings.filterwarnings("ignore", category=FutureWarning)

THREADS = 2
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SST2 = os.path.abspath(os.path.join(REPO, "..", "shared", "data", "sst2"))


# ---------------------------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class GridPoint:
    """One model shape of the sweep: the timed cases (B1, B3, B4, B7) run at every point that applies.

    ``varies`` names the one factor that differs from the base point ("" for the base point itself):
    "hidden", "r", "attention" (MHA vs GQA) or "shape" (batch x seq).
    """

    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    r: int
    batch: int
    seq: int
    varies: str = ""

    @property
    def is_base(self) -> bool:
        return self.varies == ""

    def describe(self) -> str:
        attn = "MHA" if self.kv_heads == self.heads else "GQA"
        return (f"hidden {self.hidden} (intermediate {self.intermediate}), {self.heads} heads / {self.kv_heads} kv "
                f"({attn}), LoRA r={self.r}, batch {self.batch} x seq {self.seq}")


@dataclass(frozen=True)
class Scale:
    """Every size the benchmarks use; ``QUICK`` runs each benchmark once at tiny sizes (CI)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    seq: int
    rounds: int
    warmup: int
    # B3/B4
    decode_calls: int  # decode: rounds x decode_calls single-call samples, alternating call by call
    fast_factor: int  # prefill: rounds x fast_factor samples
    mixed_batch: int
    mixed_seq: int
    mixed_counts: tuple[int, ...]
    # B5
    skeleton_layers: int
    set_adapter_counts: tuple[int, ...]
    set_adapter_calls: int
    # B6
    merge_cycles: int
    # B7
    virtual_tokens: int
    # B8
    sst2_train_rows: int
    sst2_dev_rows: int | None  # None: the whole dev set
    sst2_batch: int
    # peak-RSS probes (one subprocess each)
    rss_probes: tuple[str, ...]
    rss_dropouts: tuple[float, ...]
    # torch threads: 2 for measurements; the quick smoke test uses 1 so that a busy CI machine (or pytest-xdist
    # workers) cannot oversubscribe the cores, which makes OpenMP barriers crawl
    threads: int = THREADS
    # LoRA rank of the timed cases (B1, B3, B4); a grid point may change it
    r: int = 16
    # the grid points other than this scale's own shape (the base point): see ``grid_points``
    variants: tuple[GridPoint, ...] = ()
    # where models and batches live ("cpu" for every CPU run; benchmarks/gpu.py sets "cuda")
    device: str = "cpu"

    def base_point(self) -> GridPoint:
        return GridPoint("base", self.hidden, self.intermediate, self.heads, self.kv_heads, self.r, self.batch,
                         self.seq)

    def at(self, point: GridPoint) -> Scale:
        """These sizes with the model shape, rank and batch x seq of ``point``."""
        return dataclasses.replace(self, hidden=point.hidden, intermediate=point.intermediate, heads=point.heads,
                                   kv_heads=point.kv_heads, r=point.r, batch=point.batch, seq=point.seq)


def grid_points(scale: Scale, which: str = "full") -> list[GridPoint]:
    """"base": the base point only; "full": the base point and one point per factor varied from it."""
    if which not in ("base", "full"):
        raise ValueError(f"unknown grid {which!r}: choose base or full")
    return [scale.base_point(), *(scale.variants if which == "full" else ())]


# One factor at a time around the base point (hidden 512, r 16, GQA 8/4 heads, batch 4 x seq 256): every value
# issue 15 lists (hidden 512/1024, r 8/64, MHA/GQA, 4x256/1x1024) is covered without the full product's 16+
# points, which would take hours on 2 cores.
FULL_VARIANTS = (
    GridPoint("h1024", 1024, 2752, 16, 8, 16, 4, 256, varies="hidden"),
    GridPoint("r8", 512, 1376, 8, 4, 8, 4, 256, varies="r"),
    GridPoint("r64", 512, 1376, 8, 4, 64, 4, 256, varies="r"),
    GridPoint("mha", 512, 1376, 8, 8, 16, 4, 256, varies="attention"),
    GridPoint("1x1024", 512, 1376, 8, 4, 16, 1, 1024, varies="shape"),
)
# --quick: the tiny base point and one variant that every gridded benchmark applies, so CI runs the grid code
QUICK_VARIANTS = (GridPoint("h128", 128, 256, 8, 4, 16, 2, 32, varies="hidden"),)


FULL = Scale(name="full", hidden=512, intermediate=1376, layers=4, heads=8, kv_heads=4, vocab=4096, batch=4,
             seq=256, rounds=5, warmup=1, decode_calls=20, fast_factor=4, mixed_batch=32, mixed_seq=32,
             mixed_counts=(1, 4, 16, 32), skeleton_layers=80, set_adapter_counts=(1, 64), set_adapter_calls=200,
             merge_cycles=10, virtual_tokens=200, sst2_train_rows=4000, sst2_dev_rows=None, sst2_batch=32,
             rss_probes=("peft-core", "peft", "floor", "full FT"), rss_dropouts=(0.0, 0.05), variants=FULL_VARIANTS)

QUICK = Scale(name="quick", hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=512, batch=2,
              seq=32, rounds=1, warmup=0, decode_calls=2, fast_factor=1, mixed_batch=8, mixed_seq=8,
              mixed_counts=(1, 4, 16, 32), skeleton_layers=2, set_adapter_counts=(1, 16), set_adapter_calls=5,
              merge_cycles=10, virtual_tokens=200, sst2_train_rows=64, sst2_dev_rows=64, sst2_batch=16,
              rss_probes=("peft-core", "peft"), rss_dropouts=(0.05,), threads=1, variants=QUICK_VARIANTS)

SCALES = {"full": FULL, "quick": QUICK}


# ------------------------------------------------------------------------------------------- results
class AgreementError(AssertionError):
    """The two libraries disagree: the case is not timed."""


@dataclass(frozen=True)
class Target:
    """``kind``: "max_ratio" (peft-core / ref <= value), "min_speedup" (ref / peft-core >= value),
    or "exact" (a yes/no property)."""

    kind: str
    value: float = 0.0
    text: str = ""

    @staticmethod
    def at_most(value: float) -> Target:
        return Target("max_ratio", value, f"≤{value:g}x")

    @staticmethod
    def speedup(value: float) -> Target:
        return Target("min_speedup", value, f"≥{value:g}x faster")

    @staticmethod
    def exact(text: str) -> Target:
        return Target("exact", 0.0, text)

    def judge(self, ratio: float | None, ok: bool | None = None) -> tuple[str, str]:
        """(status, how far off) for a measured ratio (peft-core / reference)."""
        if self.kind == "exact":
            return ("met", "") if ok else ("missed", "")
        if ratio is None or ratio != ratio:
            return "n/a", ""
        if self.kind == "max_ratio":
            if ratio <= self.value:
                return "met", ""
            return "missed", f"by {100 * (ratio / self.value - 1):.0f}% (ratio {ratio:.3f} vs ≤{self.value:g})"
        speed = 1.0 / ratio if ratio > 0 else float("inf")
        if speed >= self.value:
            return "met", ""
        return "missed", f"by {100 * (1 - speed / self.value):.0f}% ({speed:.2f}x faster vs ≥{self.value:g}x)"


@dataclass
class Row:
    bench: str
    case: str
    metric: str
    ours: str
    ref: str
    ref_name: str
    ratio: float | None = None
    spread: str = ""
    target: Target | None = None
    ok: bool | None = None  # for exact targets
    status: str = "info"
    note: str = ""
    point: str = ""  # the grid point measured ("" for a benchmark that runs at one point only)
    group: str = ""  # the case without its grid point: rows of one target over the grid share it

    def __post_init__(self) -> None:
        if not self.group:
            self.group = self.case
        if self.status == "info" and self.target is not None:
            self.status, off = self.target.judge(self.ratio, self.ok)
            if off:
                self.note = f"missed {off}" + (f"; {self.note}" if self.note else "")


@dataclass
class Check:
    bench: str
    name: str
    ok: bool
    detail: str


@dataclass
class Context:
    """What a benchmark gets: its sizes, a log, and the lists its rows and agreement checks go to."""

    scale: Scale
    bench: str = ""
    rows: list[Row] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    log: Callable[[str], None] = print
    extra: dict[str, Any] = field(default_factory=dict)
    point: GridPoint | None = None  # the grid point ``scale`` is at, for the benchmarks swept over the grid

    @property
    def quick(self) -> bool:
        return self.scale.name == "quick"

    @property
    def device(self) -> str:
        return self.scale.device

    def at_point(self, case: str) -> str:
        """A case name with the grid point it ran at, e.g. "fp32 dropout=0 @ h1024"."""
        return f"{case} @ {self.point.name}" if self.point is not None else case

    def row(self, case: str, metric: str, ours: str, ref: str, ref_name: str = "peft", **kw: Any) -> Row:
        kw.setdefault("point", self.point.name if self.point is not None else "")
        r = Row(self.bench, self.at_point(case), metric, ours, ref, ref_name, group=case, **kw)
        self.rows.append(r)
        mark = f"  [{r.status}{': ' + r.note if r.note else ''}]" if r.status != "info" or r.note else ""
        ratio = f" ratio {r.ratio:.3f}" if r.ratio is not None else ""
        self.log(f"    {self.bench} {r.case} | {metric}: peft-core {ours} | {ref_name} {ref}{ratio}{mark}")
        return r

    def agree(self, name: str, err: float, tol: float, what: str = "max rel err") -> None:
        """Record an agreement check; raise AgreementError when ``err > tol`` (the case is not timed)."""
        ok = bool(err <= tol)
        detail = f"{what} {err:.2e} (tol {tol:.0e})"
        name = self.at_point(name)
        self.checks.append(Check(self.bench, name, ok, detail))
        self.log(f"    check {self.bench} {name}: {'ok' if ok else 'FAILED'} ({detail})")
        if not ok:
            raise AgreementError(f"{name}: {detail}")

    def agree_true(self, name: str, ok: bool, detail: str) -> None:
        name = self.at_point(name)
        self.checks.append(Check(self.bench, name, bool(ok), detail))
        self.log(f"    check {self.bench} {name}: {'ok' if ok else 'FAILED'} ({detail})")
        if not ok:
            raise AgreementError(f"{name}: {detail}")

    @contextlib.contextmanager
    def case(self, name: str) -> Iterator[None]:
        """One case of a benchmark: a disagreement or an error is recorded and the next case runs."""
        point = self.point.name if self.point is not None else ""
        self.log(f"  {self.bench} {self.at_point(name)}")
        try:
            yield
        except AgreementError as e:
            self.rows.append(Row(self.bench, self.at_point(name), "(not timed)", "", "", "", status="FAILED",
                                 note=f"outputs disagree: {e}", point=point, group=name))
        except Exception as e:  # a crash in one case must not hide the others
            import traceback

            tb = traceback.format_exc(limit=-3)
            self.log(tb)
            self.rows.append(Row(self.bench, self.at_point(name), "(error)", "", "", "", status="FAILED",
                                 note=f"{type(e).__name__}: {str(e)[:300]}", point=point, group=name))
        finally:
            if not self.quick:
                gc.collect()
            if device_in_use():
                torch.cuda.empty_cache()


# -------------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Per-side samples (seconds) from alternating rounds."""

    samples: dict[str, list[float]]

    def median(self, side: str) -> float:
        return statistics.median(self.samples[side])

    def paired(self, side: str, ref: str) -> list[float]:
        return [a / b for a, b in zip(self.samples[side], self.samples[ref])]

    def ratio(self, side: str, ref: str) -> float:
        """Median of the per-round ratios: each pair ran back to back, so slow phases of a shared
        machine hit both sides of a pair alike."""
        return statistics.median(self.paired(side, ref))

    def best_ratio(self, side: str, ref: str) -> float:
        """Fastest sample over fastest sample: the other robust estimate on a shared machine (noise only adds)."""
        return min(self.samples[side]) / min(self.samples[ref])

    def spread(self, side: str, ref: str) -> str:
        p = self.paired(side, ref)
        if len(p) < 2:
            return ""
        return f"{min(p):.2f}-{max(p):.2f}; best/best {self.best_ratio(side, ref):.2f}"


class QuietGate:
    """Waits, between samples, until the rest of the machine is idle enough to time anything.

    On a shared box another process taking one of two cores slows a 2-thread OpenMP op far more than 2x
    (its threads wait for each other at every barrier). Before a round (at most every ``every`` seconds)
    the gate samples ``/proc/stat`` for ``sample`` seconds while this process is idle; if others keep
    more than ``busy`` of all CPUs busy it sleeps and retries, up to ``max_wait`` seconds per gate.
    """

    def __init__(self) -> None:
        self.enabled = False
        self.every, self.sample, self.busy, self.max_wait = 2.0, 0.3, 0.25, 30.0
        self.checks = self.waits = self.gave_up = 0
        self.waited = 0.0
        self._last = 0.0

    @staticmethod
    def _cpu() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields) - idle, sum(fields)

    def busy_fraction(self) -> float:
        b0, t0 = self._cpu()
        time.sleep(self.sample)
        b1, t1 = self._cpu()
        return (b1 - b0) / max(t1 - t0, 1)

    def __call__(self, force: bool = False) -> None:
        if not self.enabled or (not force and time.perf_counter() - self._last < self.every):
            return
        self.checks += 1
        start = time.perf_counter()
        try:
            while self.busy_fraction() > self.busy:
                if time.perf_counter() - start > self.max_wait:
                    self.gave_up += 1
                    return
                self.waits += 1
                time.sleep(1.0)
        except (OSError, ValueError, IndexError):
            return
        finally:
            self.waited += time.perf_counter() - start
            self._last = time.perf_counter()

    def summary(self) -> str:
        if not self.enabled:
            return "quiet gate off"
        return (f"quiet gate: {self.checks} checks, {self.waits} waits, {self.waited:.0f} s waited in all, "
                f"{self.gave_up} time(s) timed anyway after {self.max_wait:.0f} s")


GATE = QuietGate()


def device_in_use() -> bool:
    """Whether this process has put work on a CUDA device (never true in a CPU run: nothing initializes CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def device_sync() -> None:
    """Wait for the device's queued kernels, so that a wall-clock interval covers the work (a no-op on CPU)."""
    if device_in_use():
        torch.cuda.synchronize()


def alternate(fns: dict[str, Callable[[], float | None]], rounds: int, warmup: int = 1) -> Timing:
    """Run every side once per round, in an order that flips each round (ABBA...), the garbage collector off
    while a sample runs (so no collection of another side's garbage lands in it).

    A side's callable may return its own elapsed seconds (to exclude set-up it must redo per call; it must then
    call ``device_sync`` around its own interval); otherwise its wall time is used. On a CUDA device the
    device is synchronized before and after each sample, so a sample is the work, not its launch.
    """
    keys = list(fns)
    for _ in range(warmup):
        for k in keys:
            fns[k]()
    samples: dict[str, list[float]] = {k: [] for k in keys}
    gc.collect()
    GATE(force=True)
    for r in range(rounds):
        GATE()
        order = keys if r % 2 == 0 else keys[::-1]
        for k in order:
            gc.disable()
            try:
                device_sync()
                t0 = time.perf_counter()
                own = fns[k]()
                device_sync()
                elapsed = time.perf_counter() - t0
            finally:
                gc.enable()
            samples[k].append(float(own) if own is not None else elapsed)
    return Timing(samples)


def fmt_s(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


# -------------------------------------------------------------------------------------------- models
def llama_config(scale: Scale, *, kv_heads: int | None = None, vocab: int | None = None) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=scale.hidden, intermediate_size=scale.intermediate,
                       num_hidden_layers=scale.layers, num_attention_heads=scale.heads,
                       num_key_value_heads=kv_heads or scale.kv_heads, vocab_size=vocab or scale.vocab,
                       max_position_embeddings=2048, pad_token_id=0, tie_word_embeddings=False)


def build_llama(scale: Scale, dtype: torch.dtype = torch.float32, seed: int = 0, **kw: Any) -> nn.Module:
    """Built (and initialized) on the CPU, so every device starts from the same weights, then moved to
    ``scale.device``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(llama_config(scale, **kw), dtype=dtype)
    if scale.device != "cpu":
        model = model.to(scale.device)
    return model.eval()


def token_batch(scale: Scale, batch: int | None = None, seq: int | None = None, seed: int = 1,
                vocab: int | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab or scale.vocab, (batch or scale.batch, seq or scale.seq), generator=g)
    ids = ids.to(scale.device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# ----------------------------------------------------------------------------------------- libraries
def peft_lora(model: nn.Module, adapter_name: str = "default", seed: int = 0, **kw: Any) -> nn.Module:
    """Hugging Face PEFT LoRA with non-zero B (a trained-looking adapter), so outputs differ from base."""
    import peft

    kw.setdefault("init_lora_weights", False)
    pm = peft.get_peft_model(model, peft.LoraConfig(**kw), adapter_name=adapter_name)
    randomize_lora(pm, adapter_name, seed=seed)
    return pm


def peft_add_lora(pm: nn.Module, adapter_name: str, seed: int, **kw: Any) -> None:
    import peft

    kw.setdefault("init_lora_weights", False)
    pm.add_adapter(adapter_name, peft.LoraConfig(**kw))
    randomize_lora(pm, adapter_name, seed=seed)


def randomize_lora(pm: nn.Module, adapter_name: str, seed: int, std_b: float = 0.02) -> None:
    """A: kaiming (peft's own init); B: small gaussian, deterministic per adapter."""
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if f".lora_B.{adapter_name}." in name:  # drawn on the CPU: the same values on every device
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std_b)


def core_lora(model: nn.Module, adapter_name: str = "default", **kw: Any) -> nn.Module:
    import peft_core

    return peft_core.get_peft_model(model, peft_core.LoraConfig(**kw), adapter_name=adapter_name)


def sync_adapter(src_peft: nn.Module, dst_core: nn.Module, adapter_name: str = "default") -> int:
    """Copy Hugging Face PEFT's adapter tensors into ours, through the file format (disk keys)."""
    import peft

    sd = peft.get_peft_model_state_dict(src_peft, adapter_name=adapter_name)
    dst_core.load_adapter_state_dict(adapter_name, {k: v.detach().clone() for k, v in sd.items()})
    return len(sd)


_ADAPTER_TAG = re.compile(r"\.(default|adapter\d+|a\d+)(?=\.|$)")


def wrapper_prefix(model: nn.Module) -> str:
    """What a library's wrapper puts before the base model's own parameter names."""
    import peft

    return "base_model.model." if isinstance(model, peft.PeftModel) else "base_model."


def norm_name(name: str, prefix: str) -> str:
    """A parameter name without the wrapper's prefix, LoRA's ``base_layer`` level and the adapter name:
    comparable across the libraries."""
    if name.startswith(prefix):
        name = name[len(prefix):]
    return _ADAPTER_TAG.sub("", name.replace(".base_layer", ""))


def trainable_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    prefix = wrapper_prefix(model)
    return {norm_name(n, prefix): p.grad.detach().float().clone() for n, p in model.named_parameters()
            if p.requires_grad and p.grad is not None}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    if a.shape != b.shape:
        return float("inf")
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def dict_rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys() or not a:
        missing = sorted(set(a) ^ set(b))[:3]
        raise AgreementError(f"different tensor sets ({len(a)} vs {len(b)}), e.g. {missing}")
    return max(rel_err(a[k], b[k]) for k in a)


def set_threads(threads: int = THREADS) -> None:
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(threads)


def clone_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


# -------------------------------------------------------------------------------------------- memory
class SavedActivations:
    """Bytes autograd saves for backward during the block, each storage counted once; parameters,
    buffers (and anything in ``exclude``) are not activations and are left out."""

    def __init__(self, *modules: nn.Module) -> None:
        self._exclude = {t.untyped_storage().data_ptr() for m in modules
                         for t in (*m.parameters(), *m.buffers())}
        self.storages: dict[int, int] = {}
        self.count = 0
        self._ctx: Any = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.count += 1
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return t
        ptr = st.data_ptr()
        if ptr and ptr not in self._exclude and ptr not in self.storages:
            self.storages[ptr] = st.nbytes()
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())

    def __enter__(self) -> SavedActivations:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


def proc_status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return -1


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def machine_summary() -> dict[str, str]:
    import platform

    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    mem = proc_meminfo_gib()
    return {"cpu": cpu, "cores": str(os.cpu_count()), "flags": ", ".join(cpu_flags()) or "unknown",
            "torch CPU capability": cpu_capability(), "memory": f"{mem:.0f} GiB",
            "os": platform.platform(), "python": platform.python_version()}


# the instruction-set extensions that decide which CPU kernels run (matmul, bf16/fp16 conversion, AMX tiles)
ISA_FLAGS = ("sse4_2", "fma", "f16c", "avx", "avx2", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512dq",
             "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")


def cpu_flags() -> list[str]:
    """The ISA_FLAGS that /proc/cpuinfo lists for the first CPU, in ISA_FLAGS' order."""
    have: set[str] = set()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    break
    return [x for x in ISA_FLAGS if x in have]


def cpu_capability() -> str:
    """What torch's CPU kernels dispatch to on this machine (e.g. AVX512, AVX2, DEFAULT)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


def proc_meminfo_gib() -> float:
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    return 0.0


def git_state() -> str:
    """The commit measured, and whether the library's files differ from it."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "core", "methods"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}" + (f" + {len(dirty)} uncommitted change(s) under core/ and methods/" if dirty else " (clean)")


def versions() -> dict[str, str]:
    import peft
    import peft_core
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "peft-core": peft_core.__version__}
