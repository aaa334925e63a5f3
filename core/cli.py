"""``peft-core`` command line: ``list-methods`` (table or JSON) and ``--version``."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Sequence

from .errors import PluginError
from .tasks import TaskType

__all__ = ["main"]


def _table(rows: list[list[str]], width: int = 100) -> str:
    """Columns padded to their widest cell; the last (the summary) wraps so that a line fits ``width``
    (an 80-100 column terminal), its continuation lines under its start."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    indent = sum(widths[:-1]) + 2 * (len(widths) - 1)
    widths[-1] = min(widths[-1], max(24, width - indent))
    lines = []
    for n, row in enumerate(rows):
        last = textwrap.wrap(row[-1], widths[-1]) or [""]
        lines.append("  ".join(cell.ljust(w) for cell, w in zip([*row[:-1], last[0]], widths)).rstrip())
        lines.extend(" " * indent + more for more in last[1:])
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _task_types(names: list[str]) -> str:
    if len(names) == len(TaskType):
        return "all"
    missing = [t.value for t in TaskType if t.value not in names]
    return "all but " + ",".join(missing) if len(missing) < len(names) else ",".join(names)


def list_methods(as_json: bool, strict: bool) -> int:
    from .registry import Registry

    registry = Registry(strict=True if strict else None)
    try:
        rows = registry.describe()
    except PluginError as e:
        print(f"peft-core: {e}", file=sys.stderr)
        return 1
    broken = registry.broken()
    extensions = registry.describe_extensions()
    if as_json:
        payload = {"methods": rows, "extensions": extensions,
                   "broken": [{"plugin": b.name, "distribution": b.distribution, "version": b.version,
                               "error": b.error, "hint": b.hint} for b in broken]}
        print(json.dumps(payload, indent=2))
        return 0
    header = ["method", "distribution", "version", "mergeable", "task types", "summary"]
    body = [[r["method"], r["distribution"], r["version"], "yes" if r["mergeable"] else "no",
             _task_types(list(r["task_types"])), r["summary"]]
            for r in rows]
    print(_table([header, *body]) if body else "no methods installed")
    if extensions:
        ext = [[e["plugin"], e["distribution"], e["version"], ",".join(e["hooks"]), e["summary"]] for e in extensions]
        print("\nextensions (plugins that declare no method and extend others through hooks):")
        print(_table([["plugin", "distribution", "version", "hooks", "summary"], *ext]))
    for b in broken:
        print(f"\nbroken: {b.describe()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(prog="peft-core", description="peft-core: PEFT methods as plugins")
    parser.add_argument("--version", action="version", version=f"peft-core {__version__}")
    sub = parser.add_subparsers(dest="command")
    lm = sub.add_parser("list-methods", help="list installed methods (and plugins that failed to load)")
    lm.add_argument("--json", action="store_true", help="print JSON instead of a table")
    lm.add_argument("--strict", action="store_true", help="fail on the first broken plugin")
    args = parser.parse_args(argv)
    if args.command == "list-methods":
        try:
            return list_methods(args.json, args.strict)
        except BrokenPipeError:  # `peft-core list-methods | head -1`: the reader left, which is not an error
            import os

            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # no second BrokenPipeError when Python flushes stdout at exit
            return 0
    parser.print_help()
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
