"""``python -m benchmarks.gpu``: the timed benchmarks on one CUDA device, written to benchmarks/RESULTS-GPU.md.

Runs B1 (fp32/bf16 training step vs PEFT and the frozen floor, dropout 0 and 0.05), B3 (prefill and one-token
decode), B4 (mixed-adapter batches, the target at 16 adapters), and B6 (bf16 merge round trips bit-exact), over
the CPU run's grid plus a hidden-2048 point, with the same benchmark functions as ``python -m benchmarks``: models
and batches are built on the CPU from the same seeds and moved to the device (``Scale.device``), and the timers
synchronize the device around every sample (``common.device_sync``). Sized to finish in well under 10 minutes
on one H200.

With no CUDA device it says so and exits 0. ``--cpu`` runs the same script on the CPU at ``--quick`` sizes: a
smoke test of the code path (tests/test_benchmarks.py), no timing conclusions.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

from .common import (
    FULL,
    GATE,
    QUICK,
    REPO,
    Context,
    GridPoint,
    git_state,
    grid_points,
    machine_summary,
    set_threads,
    versions,
)
from .runner import finish, grid_meta, run_benches, select_points, sizes

BENCHES = ("B1", "B3", "B4", "B6")
# a GPU has room for a bigger shape than the CPU grid's; it joins the grid's other points
GPU_VARIANTS = (GridPoint("h2048", 2048, 5504, 32, 8, 16, 4, 256, varies="hidden"),)
ROUNDS = 5
TITLE = "peft-core vs Hugging Face PEFT on a GPU: benchmark results"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="run on the CPU at --quick sizes (a smoke test)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one round, the tiny two-point grid")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHES)}")
    ap.add_argument("--rounds", type=int, default=None, help=f"timed rounds per case (default {ROUNDS}; 1 quick)")
    ap.add_argument("--grid", choices=("base", "full"), default="full")
    ap.add_argument("--points", default="", help="comma-separated grid point names to run")
    ap.add_argument("--out", default=None, help="markdown report (default: benchmarks/RESULTS-GPU.md on a GPU; "
                    "none for --cpu/--quick)")
    ap.add_argument("--json", default=None, help="JSON of every row and check (default: benchmarks/RESULTS-GPU.json "
                    "on a GPU; none for --cpu/--quick)")
    return ap.parse_args(argv)


def device_summary(device: str) -> dict[str, str]:
    if device == "cpu":
        return {"device": "cpu (smoke test)"}
    props = torch.cuda.get_device_properties(0)
    return {"device": f"{torch.cuda.get_device_name(0)} ({props.total_memory / 2**30:.0f} GiB)",
            "cuda": str(torch.version.cuda), "capability": ".".join(map(str, torch.cuda.get_device_capability(0)))}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("benchmarks.gpu: no CUDA device here (torch.cuda.is_available() is False); nothing to run. "
              "`python -m benchmarks.gpu --cpu` runs the script on the CPU at quick sizes.")
        return 0
    quick = args.quick or args.cpu
    if args.rounds is not None and args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    selected = [b.strip().upper() for b in args.only.split(",") if b.strip()] or list(BENCHES)
    unknown = [b for b in selected if b not in BENCHES]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHES)}")
    device = "cpu" if args.cpu else "cuda"
    base = QUICK if quick else FULL
    scale = dataclasses.replace(base, device=device,
                                variants=base.variants + (() if quick else GPU_VARIANTS))
    grid = select_points(grid_points(scale, args.grid), args.points)
    rounds = args.rounds if args.rounds is not None else (scale.rounds if quick else ROUNDS)

    def rounds_at(point: GridPoint | None) -> int:
        return rounds

    out, json_path = args.out, args.json
    if not quick:
        out = out or os.path.join(REPO, "benchmarks", "RESULTS-GPU.md")
        json_path = json_path or os.path.join(REPO, "benchmarks", "RESULTS-GPU.json")
    set_threads(scale.threads)
    GATE.enabled = False  # the gate watches the CPUs; a GPU run's timings do not hang on them the same way
    if device == "cuda":
        torch.cuda.init()
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (the agreement tolerances assume it)
        torch.backends.cudnn.allow_tf32 = False
    tree = git_state()
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    ctx = Context(scale=scale, log=log)
    log(f"peft-core GPU benchmarks on {device}: {', '.join(selected)} ({scale.name} sizes, {rounds} rounds, grid "
        f"{', '.join(p.name for p in grid)})")
    run_benches(ctx, selected, scale, grid, rounds_at)
    elapsed = time.perf_counter() - start
    from .report import now

    cmd = "python -m benchmarks.gpu" + ("" if argv is None and len(sys.argv) <= 1 else " " + " ".join(
        argv if argv is not None else sys.argv[1:]))
    meta = {"date": now(), "command": cmd, "scale": f"{scale.name} on {device}", "rounds": rounds,
            "elapsed": elapsed, "machine": {**device_summary(device), **machine_summary()},
            "versions": versions(), "git": git_state() if git_state() == tree else f"{tree} (changed during the run)",
            "threads": scale.threads, "sizes": sizes(scale), "grid": grid_meta(selected, grid, rounds_at),
            "load": "not gated (GPU run)"}
    if device == "cuda":
        meta["load"] += f"; peak device memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    return finish(ctx, selected, meta, out, json_path, log, title=TITLE)


if __name__ == "__main__":
    raise SystemExit(main())
