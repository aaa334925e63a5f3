"""The results table (terminal) and RESULTS.md."""

from __future__ import annotations

import datetime as _dt
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .common import Check, Row, Target

HEAD = ("bench", "case", "metric", "peft-core", "reference", "ratio", "spread", "target", "status", "note")


def _cells(r: Row) -> tuple[str, ...]:
    ratio = f"{r.ratio:.3f}" if r.ratio is not None else ""
    target = r.target.text if r.target is not None else ""
    return (r.bench, r.case, r.metric, r.ours, f"{r.ref_name}: {r.ref}" if r.ref_name and r.ref else r.ref,
            ratio, r.spread, target, r.status, r.note)


def text_table(rows: Sequence[Row]) -> str:
    cells = [HEAD, *(_cells(r) for r in rows)]
    cols = [c for c in range(len(HEAD)) if c != 1]  # the case is long: printed as a group heading instead
    widths = {c: min(max(len(row[c]) for row in cells), 60) for c in cols}
    out = []
    last_case = None
    for i, row in enumerate(cells):
        if i and (row[0], row[1]) != last_case:
            out.append(f"-- {row[0]} {row[1]}")
            last_case = (row[0], row[1])
        out.append("  ".join(row[c][:widths[c]].ljust(widths[c]) for c in cols).rstrip())
    return "\n".join(out)


@dataclass
class Worst:
    """One target over every grid point it was measured at, judged on its worst point."""

    bench: str
    case: str
    metric: str
    reference: str
    target: str
    points: list[str] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    worst_ratio: float | None = None
    worst_point: str = ""
    median_ratio: float | None = None
    failed_points: list[str] = field(default_factory=list)
    status: str = "n/a"
    note: str = ""


def worst_case(rows: Sequence[Row]) -> list[Worst]:
    """One line per target (bench, case without its grid point, metric, reference, target): the worst ratio
    over the grid (time and memory ratios are peft-core / reference, so the highest is the worst, for a
    "faster than" target too), where it was measured, the median over the grid, and the status of the worst
    point. A case that failed at some grid point fails its targets; a skipped or failed case that produced no
    target row gets a line of its own."""
    lines: dict[tuple[str, ...], Worst] = {}
    targets: dict[tuple[str, ...], Target] = {}
    for r in rows:
        if r.target is None:
            continue
        key = (r.bench, r.group, r.metric, r.ref_name, r.target.text)
        w = lines.setdefault(key, Worst(r.bench, r.group, r.metric, r.ref_name, r.target.text))
        targets[key] = r.target
        w.points.append(r.point or "(single point)")
        if r.target.kind == "exact":
            if not r.ok:
                w.failed_points.append(r.point or "(single point)")
            w.worst_point = w.failed_points[0] if w.failed_points else w.points[-1]
            continue
        if r.ratio is not None and r.ratio == r.ratio:
            w.ratios.append(r.ratio)
            if w.worst_ratio is None or r.ratio > w.worst_ratio:
                w.worst_ratio, w.worst_point = r.ratio, r.point or "(single point)"
    for r in rows:
        if r.status not in ("FAILED", "skipped"):
            continue
        hit = [w for w in lines.values() if (w.bench, w.case) == (r.bench, r.group)]
        if not hit:
            w = Worst(r.bench, r.group, r.metric, r.ref_name, "", status=r.status, note=r.note)
            lines[(r.bench, r.group, r.metric, r.ref_name, "", r.point)] = w
            hit = [w]
        for w in hit:
            w.failed_points.append(r.point or "(single point)")
            if r.status == "FAILED":
                w.status, w.note = "FAILED", r.note
    for key, w in lines.items():
        if w.ratios:
            w.median_ratio = statistics.median(w.ratios)
        if w.status in ("FAILED", "skipped"):
            continue
        target = targets[key]
        if target.kind == "exact":
            w.status = "missed" if w.failed_points else "met"
            if w.failed_points:
                w.note = f"not met at {', '.join(w.failed_points)}"
            continue
        w.status, off = target.judge(w.worst_ratio)
        if off:
            w.note = f"missed {off}"
    return list(lines.values())


def _worst_cells(w: Worst) -> tuple[str, ...]:
    def fmt(ratio: float | None) -> str:
        if ratio is None:
            return ""
        if "faster" in w.target:
            return f"{ratio:.3f} ({1 / ratio:.2f}x faster)" if ratio > 0 else f"{ratio:.3f}"
        return f"{ratio:.3f}"

    at = w.worst_point if w.status != "FAILED" else f"failed at {', '.join(w.failed_points)}"
    return (w.bench, w.case, w.metric, w.reference, w.target, fmt(w.worst_ratio), at, fmt(w.median_ratio),
            str(len(w.points)), w.status, w.note)


WORST_HEAD = ("bench", "case", "metric", "reference", "target", "worst ratio", "at", "median over the grid",
              "points", "status", "note")


def worst_text(rows: Sequence[Row]) -> str:
    cells = [WORST_HEAD, *(_worst_cells(w) for w in worst_case(rows))]
    widths = [min(max(len(c[i]) for c in cells), 48) for i in range(len(WORST_HEAD))]
    return "\n".join("  ".join(c[i][:widths[i]].ljust(widths[i]) for i in range(len(c))).rstrip() for c in cells)


def _md(s: str) -> str:
    return s.replace("|", "\\|")


def markdown(rows: Sequence[Row], checks: Sequence[Check], meta: dict[str, Any], title: str | None = None) -> str:
    lines = [f"# {title or 'peft-core vs Hugging Face PEFT: benchmark results'}", ""]
    lines += [f"Generated {meta['date']} by `{meta['command']}` ({meta['scale']} sizes, {meta['rounds']} rounds at "
              f"the base point, {meta['elapsed']:.0f} s wall).", ""]
    lines += ["**Machine:** " + ", ".join(f"{k} {v}" for k, v in meta["machine"].items()) + f"; torch threads "
              f"{meta['threads']}.", ""]
    lines += [f"**Machine load:** {meta['load']}.", ""]
    lines += ["**Versions:** " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
              + f"; peft-core tree at {meta['git']}.", ""]
    lines += ["**Sizes:** " + meta["sizes"], ""]
    lines += ["Ratios are peft-core / reference (lower is better for time and memory): the median of per-round "
              "ratios, each round running the sides back to back in alternating order; *spread* is the min-max "
              "of those per-round ratios. Every case checks that the two libraries' outputs agree before "
              "anything is timed (see *Agreement checks*).", ""]
    worst = worst_case(rows)
    lines += ["## Targets, worst case over the grid", "",
              f"{_counts(worst)}; each target judged on its worst grid point (a ratio is peft-core / reference, "
              "so the highest ratio is the worst, for a \"faster than\" target too).", ""]
    lines += ["| " + " | ".join(WORST_HEAD) + " |", "|" + "---|" * len(WORST_HEAD)]
    for w in worst:
        cells = list(_worst_cells(w))
        if w.status in ("missed", "FAILED"):
            cells[9] = f"**{cells[9]}**"
        lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
    grid = meta.get("grid") or []
    if grid:
        lines += ["", "**Grid** (one factor at a time around the base point; B1 and B3 run at every point, B4 "
                  "where hidden size, rank or attention vary, B7 where hidden size or batch x seq vary; the other "
                  "benchmarks at the base sizes only):", "",
                  "| point | varies | shape | rounds | benchmarks |", "|---|---|---|---|---|"]
        lines += [f"| {g['name']} | {g['varies']} | {_md(str(g['shape']))} | {g['rounds']} | "
                  f"{', '.join(g['benches'])} |" for g in grid]
    lines += ["", "Why each missed target is missed, with profiles and micro-benchmarks: "
              "[DIAGNOSIS.md](DIAGNOSIS.md).", ""]
    targets = [r for r in rows if r.target is not None or r.status in ("skipped", "FAILED")]
    met = sum(r.status == "met" for r in targets)
    missed = sum(r.status == "missed" for r in targets)
    lines += ["## Targets at each grid point", "", f"{met} met, {missed} missed, "
              f"{sum(r.status == 'skipped' for r in targets)} skipped, {sum(r.status == 'FAILED' for r in targets)}"
              " failed.", ""]
    lines += _table(targets)
    lines += ["", "## All measurements", ""]
    lines += _table(rows)
    lines += ["", "## Agreement checks", "", f"{sum(c.ok for c in checks)}/{len(checks)} passed.", "",
              "| bench | check | result | detail |", "|---|---|---|---|"]
    lines += [f"| {c.bench} | {_md(c.name)} | {'ok' if c.ok else '**FAILED**'} | {_md(c.detail)} |" for c in checks]
    lines.append("")
    return "\n".join(lines)


def _counts(worst: Sequence[Worst]) -> str:
    n = {k: sum(w.status == k for w in worst) for k in ("met", "missed", "skipped", "FAILED")}
    return f"{n['met']} met, {n['missed']} missed, {n['skipped']} skipped, {n['FAILED']} failed"


def _table(rows: Sequence[Row]) -> list[str]:
    out = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    for r in rows:
        cells = list(_cells(r))
        if r.status in ("missed", "FAILED"):
            cells[8] = f"**{cells[8]}**"
        out.append("| " + " | ".join(_md(c) for c in cells) + " |")
    return out


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
