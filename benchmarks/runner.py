"""``python -m benchmarks``: run the benchmarks, print the table, write RESULTS.md (and optionally JSON)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable

from .common import (
    FULL,
    GATE,
    QUICK,
    REPO,
    Context,
    GridPoint,
    Row,
    Scale,
    git_state,
    grid_points,
    machine_summary,
    set_threads,
    versions,
)

BENCHES: dict[str, tuple[str, str]] = {
    "B1": ("b1_training:run_b1", "LoRA training step vs PEFT, the frozen floor and full fine-tuning"),
    "B2": ("b1_training:run_b2", "saved activations and peak RSS of the training step (bf16)"),
    "B3": ("b3_inference:run_b3", "unmerged single-adapter inference: prefill and KV-cache decode"),
    "B4": ("b4_mixed:run_b4", "mixed-adapter batches (adapter_names=...)"),
    "B5": ("b5_setup:run_b5", "get_peft_model on a 70B meta skeleton, adapter loading, set_adapter"),
    "B6": ("b6_merge:run_b6", "bf16 merge/unmerge round trips"),
    "B7": ("b7_prompt:run_b7", "prompt tuning and prefix tuning training steps"),
    "B8": ("b8_real:run_b8", "all-MiniLM-L6-v2 + LoRA on SST-2, one epoch"),
    "B9": ("b9_qlora:run_b9", "QLoRA (nf4, bf16 compute) vs bf16 LoRA and PEFT's QLoRA: memory and step time"),
    "B10": ("b10_dora:run_b10", "DoRA training step vs PEFT's DoRA step (fp32, bf16)"),
    "B11": ("b11_compile:run_b11", "torch.compile: compiled LoRA training step and decode vs eager and PEFT compiled"),
}


# The timed cases run at every grid point whose varied factor applies to them (None: every point); the others
# run at the base sizes only. B4 has its own batch x seq (mixed_batch x mixed_seq); B7 has no LoRA rank and
# always uses multi-head attention.
GRIDDED: dict[str, frozenset[str] | None] = {
    "B1": None,
    "B3": None,
    "B4": frozenset({"", "hidden", "r", "attention"}),
    "B7": frozenset({"", "hidden", "shape"}),
}
# default timed rounds of a full run: more at the base point (the one RESULTS.md has always reported), fewer at
# the other points so that the whole sweep fits in about 45 minutes on 2 cores
BASE_ROUNDS, VARIANT_ROUNDS = 5, 3


def points_for(bench: str, grid: list[GridPoint]) -> list[GridPoint | None]:
    """The grid points ``bench`` runs at; [None] for a benchmark that is not swept."""
    if bench not in GRIDDED:
        return [None]
    applies = GRIDDED[bench]
    return [p for p in grid if applies is None or p.varies in applies]


def run_benches(ctx: Context, selected: list[str], base: Scale, grid: list[GridPoint],
                rounds_at: Callable[[GridPoint | None], int]) -> None:
    """Each selected benchmark, at each of its grid points; a crash in one is a FAILED row, not the end."""
    for bench in selected:
        spec, title = BENCHES[bench]
        ctx.bench = bench
        ctx.log(f"{bench}: {title}")
        for point in points_for(bench, grid):
            ctx.point, ctx.scale = point, (base.at(point) if point is not None else base)
            rounds = rounds_at(point)
            if point is not None:
                ctx.log(f" {bench} @ {point.name}: {point.describe()}, {rounds} rounds")
            t0 = time.perf_counter()
            with ctx.case("(benchmark)"):
                _load(spec)(ctx, rounds)
            key = bench if point is None else f"{bench} @ {point.name}"
            ctx.extra.setdefault("seconds", {})[key] = time.perf_counter() - t0
    ctx.point, ctx.scale = None, base


def grid_meta(selected: list[str], grid: list[GridPoint], rounds_at: Callable[[GridPoint | None], int]
              ) -> list[dict[str, object]]:
    """The grid points some selected benchmark runs at, with those benchmarks and the rounds."""
    rows = [{"name": p.name, "varies": p.varies or "(base)", "shape": p.describe(), "rounds": rounds_at(p),
             "benches": [b for b in selected if b in GRIDDED and p in points_for(b, grid)]} for p in grid]
    return [r for r in rows if r["benches"]]


def _load(spec: str) -> Callable[..., None]:
    import importlib

    mod, fn = spec.split(":")
    return getattr(importlib.import_module(f"{__package__}.{mod}"), fn)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="every benchmark once at tiny sizes (CI); no timing "
                    "conclusions")
    ap.add_argument("--only", default="", help="comma-separated benchmark ids, e.g. B1,B3")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per case at every grid point "
                    f"(default: {BASE_ROUNDS} at the base point and {VARIANT_ROUNDS} elsewhere; 1 with --quick)")
    ap.add_argument("--grid", choices=("base", "full"), default="full", help="full (default): B1/B3/B4/B7 at every "
                    "grid point (common.FULL_VARIANTS; --quick: a tiny base point and one variant); base: at the "
                    "base point only")
    ap.add_argument("--points", default="", help="comma-separated grid point names to run (e.g. base,h1024); "
                    "the rest of the grid is left out")
    ap.add_argument("--out", default=None, help="markdown report path (default: benchmarks/RESULTS.md for full "
                    "runs; none for --quick)")
    ap.add_argument("--json", default=None, help="also write every row, check and raw sample here")
    ap.add_argument("--no-gate", action="store_true", help="full runs wait between rounds until other processes "
                    "leave the CPUs mostly idle (see common.QuietGate); this turns that off")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    scale = QUICK if args.quick else FULL
    if args.rounds is not None and args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    selected = [b.strip().upper() for b in args.only.split(",") if b.strip()] or list(BENCHES)
    unknown = [b for b in selected if b not in BENCHES]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHES)}")
    grid = select_points(grid_points(scale, args.grid), args.points)

    def rounds_at(point: GridPoint | None) -> int:
        if args.rounds is not None:
            return args.rounds
        if args.quick:
            return scale.rounds
        return BASE_ROUNDS if point is None or point.is_base else VARIANT_ROUNDS

    out = args.out if args.out is not None else (None if args.quick else os.path.join(REPO, "benchmarks",
                                                                                      "RESULTS.md"))
    set_threads(scale.threads)
    GATE.enabled = not args.quick and not args.no_gate
    tree = git_state()  # what the in-process benchmarks import and measure: read it before they start
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    ctx = Context(scale=scale, log=log)
    base_rounds = rounds_at(grid[0] if grid and grid[0].is_base else None)
    log(f"peft-core benchmarks: {', '.join(selected)} ({scale.name} sizes, {base_rounds} rounds at the base point, "
        f"grid {', '.join(p.name for p in grid)}, {scale.threads} threads)")
    loads = [loadavg()]
    for bench in selected:
        loads.append(loadavg())
        run_benches(ctx, [bench], scale, grid, rounds_at)
    elapsed = time.perf_counter() - start
    loads.append(loadavg())

    from .report import now

    cmd = "python -m benchmarks" + ("" if argv is None and len(sys.argv) <= 1 else " " + " ".join(
        argv if argv is not None else sys.argv[1:]))
    meta = {"date": now(), "command": cmd, "scale": scale.name, "rounds": base_rounds, "elapsed": elapsed,
            "machine": machine_summary(), "versions": versions(), "git": _tree_note(tree, git_state()),
            "threads": scale.threads, "sizes": sizes(scale), "grid": grid_meta(selected, grid, rounds_at),
            "load": f"1-minute load average {loads[0]:.2f} at the start, {loads[-1]:.2f} at the end, at most "
                    f"{max(loads):.2f} between benchmarks ({os.cpu_count()} cores); {GATE.summary()}"}
    return finish(ctx, selected, meta, out, args.json, log)


def select_points(grid: list[GridPoint], names: str) -> list[GridPoint]:
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    if not wanted:
        return grid
    unknown = [n for n in wanted if n not in {p.name for p in grid}]
    if unknown:
        raise SystemExit(f"unknown grid point(s) {unknown}; choose from {', '.join(p.name for p in grid)}")
    return [p for p in grid if p.name in wanted]


def finish(ctx: Context, selected: list[str], meta: dict[str, object], out: str | None, json_path: str | None,
           log: Callable[[str], None], title: str | None = None) -> int:
    """Print the table and the summary, write the report and the JSON; the exit status (1: a check failed)."""
    from .report import markdown, text_table, worst_text

    print(text_table(ctx.rows))
    print("\nTargets, worst case over the grid:")
    print(worst_text(ctx.rows))
    failed_checks = [c for c in ctx.checks if not c.ok]
    failed_rows = [r for r in ctx.rows if r.status == "FAILED"]
    missed = [r for r in ctx.rows if r.status == "missed"]
    print(f"\n{len(ctx.checks) - len(failed_checks)}/{len(ctx.checks)} agreement checks passed; "
          f"{sum(r.status == 'met' for r in ctx.rows)} rows met their target, {len(missed)} missed; "
          f"{len(failed_rows)} failed cases; {meta['elapsed']:.0f} s")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            f.write(markdown(ctx.rows, ctx.checks, meta, title=title))
        log(f"wrote {out}")
    if json_path:
        from .report import worst_case

        data = {"meta": meta, "benches": selected,
                "rows": [_row_dict(r) for r in ctx.rows],
                "worst": [dataclasses.asdict(w) for w in worst_case(ctx.rows)],
                "checks": [dataclasses.asdict(c) for c in ctx.checks],
                "extra": _jsonable(ctx.extra)}
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
        log(f"wrote {json_path}")
    return 1 if failed_checks or failed_rows else 0


def _tree_note(start: str, end: str) -> str:
    if start == end:
        return start
    return (f"{start} when the run started (what it measured; it changed to {end} during the run: modules "
            "already imported were not reloaded, but the peak-RSS subprocesses and modules first imported "
            "later may have seen the change)")


def loadavg() -> float:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def sizes(scale: object) -> str:
    s = scale
    return (f"B1-B4/B6/B7 llama from config: hidden {s.hidden}, intermediate {s.intermediate}, {s.layers} layers, "
            f"{s.heads} heads ({s.kv_heads} kv), vocab {s.vocab}; B1/B2/B3/B7 batch {s.batch} x seq {s.seq}; "
            f"LoRA all-linear r={s.r} alpha {2 * s.r} (B5 set_adapter: r=8); B4 batch {s.mixed_batch} x seq "
            f"{s.mixed_seq} with {max(s.mixed_counts)} adapters loaded; decode: {s.decode_calls} x rounds single "
            "calls, alternating call by call; "
            f"B5 skeleton {s.skeleton_layers} layers of llama-70B shape; B6 {s.merge_cycles} cycles; "
            f"B7 {s.virtual_tokens} virtual tokens; B8 {s.sst2_train_rows} SST-2 rows, batch {s.sst2_batch}, "
            "one epoch, the two libraries' steps alternating. These are the base point's sizes; B1/B3/B4/B7 also "
            "run at the other grid points (see the grid table).")  # type: ignore[attr-defined]


def _row_dict(r: Row) -> dict[str, object]:
    d = dataclasses.asdict(r)
    d["target"] = r.target.text if r.target is not None else None
    return d


def _jsonable(x: object) -> object:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    return repr(x)
