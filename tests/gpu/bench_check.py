"""The GPU benchmark script end to end: ``python -m benchmarks.gpu`` on one CUDA device, then its JSON checked.

For a maintainer with a GPU (not collected by pytest; needs no download; well under 10 minutes on one H200)::

    python tests/gpu/bench_check.py          # one CUDA device; exits 0 with a message when there is none
    python tests/gpu/bench_check.py --cpu    # the same script on CPU at quick sizes (a smoke test)

Writes benchmarks/RESULTS-GPU.md and RESULTS-GPU.json (``--cpu``: under a temporary folder) and checks that
every agreement check passed, no case failed, every benchmark and grid point produced rows, B6's bf16 merge
round trips left the base weights bit-exact, and (on a GPU) the run took under 10 minutes. One PASS/FAIL line
per check; exit status 1 if any failed. Timing targets are reported, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, REPO)
    import torch

    from benchmarks import gpu

    if not args.cpu and not torch.cuda.is_available():
        print("SKIP: no CUDA device (torch.cuda.is_available() is False); --cpu runs the smoke test")
        return 0
    folder = tempfile.mkdtemp() if args.cpu else os.path.join(REPO, "benchmarks")
    out, json_path = os.path.join(folder, "RESULTS-GPU.md"), os.path.join(folder, "RESULTS-GPU.json")
    rc = gpu.main((["--cpu"] if args.cpu else []) + ["--out", out, "--json", json_path])
    with open(json_path, encoding="utf-8") as f:
        data = json.load(f)
    rows, checks = data["rows"], data["checks"]
    points = [g["name"] for g in data["meta"]["grid"]]
    results = [
        ("script exit status 0", rc == 0, f"exit status {rc}"),
        ("agreement checks", bool(checks) and all(c["ok"] for c in checks),
         f"{sum(c['ok'] for c in checks)}/{len(checks)} passed"),
        ("no failed case", not [r for r in rows if r["status"] == "FAILED"],
         "; ".join(f"{r['case']}: {r['note'][:120]}" for r in rows if r["status"] == "FAILED")[:600]),
        ("every benchmark ran", {r["bench"] for r in rows} == set(gpu.BENCHES),
         ", ".join(sorted({r["bench"] for r in rows}))),
        ("B1 at every grid point", {r["point"] for r in rows if r["bench"] == "B1"} == set(points), str(points)),
        ("B6 bit-exact", any(r["bench"] == "B6" and r["ok"] for r in rows), "base weights after merge round trips"),
    ]
    if not args.cpu:
        results.append(("under 10 minutes", data["meta"]["elapsed"] < 600, f"{data['meta']['elapsed']:.0f} s"))
    for name, ok, detail in results:
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")
    for w in data["worst"]:
        worst = "" if w["worst_ratio"] is None else f"{w['worst_ratio']:.3f}"
        print(f"  {w['bench']} {w['case']} | {w['metric']} vs {w['reference']} {w['target']}: worst "
              f"{worst} at {w['worst_point']} -> {w['status']}")
    print(f"report: {out}")
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
