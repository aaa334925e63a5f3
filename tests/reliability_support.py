"""Shared pieces of the reliability battery (tests/test_reliability_*.py): the bounded hypothesis profile,
the "model unchanged" fingerprint, and the counters the battery reports.

The counters are per process. Each reliability module writes the running totals, when it finishes, to
``<pytest basetemp>/reliability-summary.json`` (and to ``$PEFT_CORE_RELIABILITY_SUMMARY`` when set) and
prints them (visible with ``-s``). Under pytest-xdist every worker writes its own.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, settings
from peft_core import PeftCoreError
from torch import nn

# ---------------------------------------------------------------- hypothesis
#: CI: derandomized (the same examples every run, so no flakes), bounded, no deadline (a slow CI machine must
#: not fail a test for being slow). For a deeper local run, PEFT_CORE_FUZZ_EXAMPLES raises the bound and
#: PEFT_CORE_FUZZ_RANDOM=1 draws new examples each run.
PROFILE = "peft-core-reliability"
settings.register_profile(
    PROFILE, derandomize=os.environ.get("PEFT_CORE_FUZZ_RANDOM") != "1", database=None, deadline=None,
    print_blob=True, max_examples=int(os.environ.get("PEFT_CORE_FUZZ_EXAMPLES", "300")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                           HealthCheck.function_scoped_fixture])
FUZZ = settings.get_profile(PROFILE)

#: Builtin classes every peft-core error must also be (so callers can catch either).
BUILTINS = (ValueError, LookupError, TypeError, RuntimeError)

# ---------------------------------------------------------------- counters
STATS: dict[str, Any] = {
    "configs_tried": 0,          # adapter_config.json files generated and loaded
    "files_tried": 0,            # adapter weight files generated and loaded
    "saves_interrupted": 0,      # save_pretrained calls made to fail midway
    "refused": 0,                # inputs (loads, calls) refused with a typed peft-core error
    "loads_accepted": 0,         # generated inputs that turned out valid (the adapter then works)
    "unchanged_checks": 0,       # times the base model was compared with its fingerprint
    "unchanged_failures": 0,     # ... and differed (must stay 0)
    "error_types": Counter(),    # peft-core error class name -> count
    "samples": {},               # (error type, what was mutated) -> one message, for review
}


def record_error(exc: BaseException, what: str) -> None:
    name = type(exc).__name__
    STATS["refused"] += 1
    STATS["error_types"][name] += 1
    STATS["samples"].setdefault(f"{name} <- {what}", str(exc)[:300])


def summary() -> dict[str, Any]:
    out = {k: v for k, v in STATS.items() if k not in {"error_types", "samples"}}
    out["distinct_error_types"] = len(STATS["error_types"])
    out["error_types"] = dict(sorted(STATS["error_types"].items()))
    out["samples"] = dict(sorted(STATS["samples"].items()))
    return out


def write_summary(base: Path) -> Path:
    data = summary()
    path = base / "reliability-summary.json"
    text = json.dumps(data, indent=2, ensure_ascii=True)
    path.write_text(text)
    extra = os.environ.get("PEFT_CORE_RELIABILITY_SUMMARY")
    if extra:
        Path(extra).write_text(text)
    short = {k: v for k, v in data.items() if k != "samples"}
    print(f"\nreliability summary ({path}): {json.dumps(short)}")
    return path


# ---------------------------------------------------------------- the model-unchanged check
def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Everything a failed load must leave as it was: tensors (values, dtypes, devices), the module tree and
    types, requires_grad, train/eval modes, and the hooks registered on every module."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "tree": [(n, type(m).__name__) for n, m in model.named_modules()],
        "grads": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "modes": [m.training for m in model.modules()],
        "hooks": [(len(m._forward_pre_hooks), len(m._forward_hooks), len(m._backward_hooks))
                  for m in model.modules()],
        "attrs": [sorted(vars(m)) for m in model.modules()],
    }


def unchanged(model: nn.Module, before: dict[str, Any]) -> bool:
    now = fingerprint(model)
    same = (before["tree"] == now["tree"] and before["grads"] == now["grads"] and before["modes"] == now["modes"]
            and before["hooks"] == now["hooks"] and before["attrs"] == now["attrs"]
            and before["state"].keys() == now["state"].keys()
            and all(torch.equal(v, now["state"][k]) and v.dtype == now["state"][k].dtype
                    for k, v in before["state"].items()))
    STATS["unchanged_checks"] += 1
    if not same:
        STATS["unchanged_failures"] += 1
    return same


def check_error(exc: BaseException, what: str) -> None:
    """A refused input must raise a typed peft-core error that is also a builtin, with a real message."""
    assert isinstance(exc, PeftCoreError), f"{what}: bare {type(exc).__name__}: {exc}"
    assert isinstance(exc, BUILTINS), f"{what}: {type(exc).__name__} is not also a builtin error class"
    assert len(str(exc)) >= 30, f"{what}: message too short to name a cause and a fix: {exc}"
    assert len(str(exc)) <= 2000, f"{what}: message of {len(str(exc))} characters (values must be shown cut short)"
    record_error(exc, what)


# ---------------------------------------------------------------- a watchdog for code that must not hang
@contextmanager
def watchdog(seconds: float, what: str) -> Iterator[None]:
    """Fail (instead of hanging CI) if the block runs longer than ``seconds``. Uses SIGALRM, which Python's
    regex engine and most loops check, so it interrupts a catastrophic regex too. A no-op off the main
    thread or where SIGALRM does not exist."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"{what} took more than {seconds}s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
