"""The results table (terminal) and RESULTS.md."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from typing import Any

from .common import Check, Row

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


def _md(s: str) -> str:
    return s.replace("|", "\\|")


def markdown(rows: Sequence[Row], checks: Sequence[Check], meta: dict[str, Any]) -> str:
    lines = ["# peft-core vs Hugging Face PEFT: benchmark results", ""]
    lines += [f"Generated {meta['date']} by `{meta['command']}` ({meta['scale']} sizes, {meta['rounds']} rounds, "
              f"{meta['elapsed']:.0f} s wall).", ""]
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
    targets = [r for r in rows if r.target is not None or r.status in ("skipped", "FAILED")]
    met = sum(r.status == "met" for r in targets)
    missed = sum(r.status == "missed" for r in targets)
    lines += ["## Targets", "", f"{met} met, {missed} missed, "
              f"{sum(r.status == 'skipped' for r in targets)} skipped, {sum(r.status == 'FAILED' for r in targets)}"
              " failed.", ""]
    lines += _table(targets)
    lines += ["", "Why each missed target is missed, with profiles and micro-benchmarks: "
              "[DIAGNOSIS.md](DIAGNOSIS.md).", ""]
    lines += ["", "## All measurements", ""]
    lines += _table(rows)
    lines += ["", "## Agreement checks", "", f"{sum(c.ok for c in checks)}/{len(checks)} passed.", "",
              "| bench | check | result | detail |", "|---|---|---|---|"]
    lines += [f"| {c.bench} | {_md(c.name)} | {'ok' if c.ok else '**FAILED**'} | {_md(c.detail)} |" for c in checks]
    lines.append("")
    return "\n".join(lines)


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
