"""One side of B2's peak-RSS measurement, alone in a fresh process (so no other side's freed memory,
still held by the allocator, hides or inflates its peak).

Prints one JSON line: ``baseline_kib`` (RSS with the model, batch and optimizer built), ``peak_kib``
(VmHWM after two training steps) and ``delta_kib`` (the difference: activations, gradients, optimizer
state and workspace of a step).
"""

from __future__ import annotations

import argparse
import gc
import json

import torch

from .b1_training import make_sides, step_fn
from .common import SCALES, proc_status_kib, reset_peak_rss, set_threads, token_batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", default="full", choices=sorted(SCALES))
    ap.add_argument("--side", required=True)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    args = ap.parse_args()
    scale = SCALES[args.scale]
    set_threads(scale.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    # this side only, on the base model itself (adapter values do not change memory use)
    model = make_sides(scale, dtype, args.dropout, (args.side,))[args.side]
    batch = token_batch(scale)
    step = step_fn(args.side, model, batch)
    gc.collect()
    baseline = proc_status_kib("VmRSS")
    resettable = reset_peak_rss()
    for _ in range(2):
        step()
    peak = proc_status_kib("VmHWM")
    print(json.dumps({"side": args.side, "dropout": args.dropout, "baseline_kib": baseline, "peak_kib": peak,
                      "delta_kib": peak - baseline, "hwm_reset": resettable}))


if __name__ == "__main__":
    main()
