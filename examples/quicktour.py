"""The Hugging Face PEFT quicktour, with ``peft`` replaced by ``peft_core`` — offline by default.

Offline (the default) it builds a small seq2seq model from a config and a word-level tokenizer from the
embedded data set, so nothing is downloaded. ``--model bigscience/mt0-large`` runs the same steps on a
real Hub model where the network allows.

    python examples/quicktour.py                 # offline, ~1 minute on 2 cores
    python examples/quicktour.py --model bigscience/mt0-small --epochs 3
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

import torch
from peft_core import AutoPeftModelForSeq2SeqLM, LoraConfig, PeftConfig, PeftModel, TaskType, get_peft_model
from tqdm.auto import tqdm
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedTokenizerFast, T5Config

# A small complaint / no complaint data set (in the spirit of the RAFT twitter_complaints task).
COMPLAINTS = [
    "my flight was delayed six hours and nobody told us anything",
    "the app keeps crashing every time i open my account",
    "still waiting for a refund after three weeks this is ridiculous",
    "worst customer service ever they hung up on me twice",
    "my package arrived broken and the box was soaking wet",
    "charged twice for the same order and support will not answer",
    "internet has been down all day and the hotline is closed",
    "they cancelled my booking without any explanation",
    "the train was late again and the heating did not work",
    "my new phone stopped charging after two days",
    "lost my luggage and the desk staff were rude about it",
    "the update deleted all my saved files thanks for nothing",
    "been on hold for an hour this is unacceptable",
    "the food was cold and the order was wrong again",
    "your website will not let me reset my password",
    "the delivery driver left my parcel in the rain",
    "billing error again and no one can fix it",
    "the seat was broken and the crew ignored us",
    "my card was declined for no reason and the bank is closed",
    "the replacement part is missing from the box",
]
PRAISE = [
    "thanks for the quick reply you fixed it in minutes",
    "great flight today the crew were lovely",
    "just got my order and it looks amazing",
    "loving the new update the app feels faster",
    "shout out to the support team for being so helpful",
    "the concert last night was fantastic",
    "happy birthday to my favourite airline crew member",
    "what a beautiful morning for a run",
    "the new menu is delicious highly recommend",
    "my package came a day early thank you",
    "reading a good book on the train home",
    "the staff at the store were friendly and kind",
    "excited for the weekend trip with friends",
    "this coffee shop has the best pastries in town",
    "the customer service agent solved everything thanks",
    "finally finished my project feeling proud",
    "the hotel room had a wonderful view of the sea",
    "watching the match tonight with the family",
    "smooth check in and an easy boarding today",
    "the new phone camera takes gorgeous photos",
]
LABELS = ("complaint", "no complaint")


def build_offline(workdir: str) -> tuple[torch.nn.Module, PreTrainedTokenizerFast, str]:
    """A word-level tokenizer from the data, and a small T5 from a config, saved like a Hub model."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for text in COMPLAINTS + PRAISE + list(LABELS) for w in text.split()} | {"tweet", "label"})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>")
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(vocab), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                      num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = AutoModelForSeq2SeqLM.from_config(config)
    path = os.path.join(workdir, "tiny-t5")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    model.config.name_or_path = path  # what adapter_config.json records as base_model_name_or_path
    return model, tokenizer, path


def encode(tokenizer, texts: list[str], labels: list[str] | None = None) -> dict[str, torch.Tensor]:
    batch = tokenizer([f"tweet {t} label" for t in texts], padding=True, return_tensors="pt")
    if labels is not None:
        target = tokenizer([f"{lab}" for lab in labels], padding=True, return_tensors="pt").input_ids
        target = torch.cat([target, torch.full((len(labels), 1), tokenizer.eos_token_id)], dim=1)
        target[target == tokenizer.pad_token_id] = -100
        batch["labels"] = target
    return dict(batch)


def predict(model, tokenizer, texts: list[str]) -> list[str]:
    model.eval()
    with torch.no_grad():
        out = model.generate(**{k: v for k, v in encode(tokenizer, texts).items() if k != "labels"},
                             max_new_tokens=4, do_sample=False)
    return [tokenizer.decode(o, skip_special_tokens=True).strip() for o in out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a Hub seq2seq model (needs the network); default: offline tiny T5")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    workdir = tempfile.mkdtemp(prefix="peft-core-quicktour-")
    start = time.time()

    if args.model:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForSeq2SeqLM.from_pretrained(args.model)
    else:
        model, tokenizer, _ = build_offline(workdir)

    # --- the quicktour, unchanged but for the import
    peft_config = LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, inference_mode=False, r=8, lora_alpha=32,
                             lora_dropout=0.1)
    model = get_peft_model(model, peft_config)
    model.print_trainable_parameters()

    data = [(t, LABELS[0]) for t in COMPLAINTS] + [(t, LABELS[1]) for t in PRAISE]
    random.shuffle(data)
    train, test = data[:32], data[32:]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    for epoch in tqdm(range(args.epochs), desc="training"):
        random.shuffle(train)
        for i in range(0, len(train), 8):
            texts, labels = zip(*train[i:i + 8])
            loss = model(**encode(tokenizer, list(texts), list(labels))).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        if epoch == args.epochs - 1:
            tqdm.write(f"final training loss {loss.item():.4f}")

    save_dir = os.path.join(workdir, "mt0-lora-complaints")
    model.save_pretrained(save_dir)
    size = sum(os.path.getsize(os.path.join(save_dir, f)) for f in os.listdir(save_dir))
    print(f"saved adapter to {save_dir}: {sorted(os.listdir(save_dir))}, {size / 1024:.1f} KiB on disk")
    texts = [t for t, _ in test]
    before = predict(model, tokenizer, texts)

    # --- reload, as the quicktour does
    config = PeftConfig.from_pretrained(save_dir)
    base = AutoModelForSeq2SeqLM.from_pretrained(config.base_model_name_or_path)
    reloaded = PeftModel.from_pretrained(base, save_dir)
    auto = AutoPeftModelForSeq2SeqLM.from_pretrained(save_dir)
    after, after_auto = predict(reloaded, tokenizer, texts), predict(auto, tokenizer, texts)
    assert before == after == after_auto, "reloaded adapters must generate exactly what the trained one did"

    correct = sum(p == label for p, (_, label) in zip(after, test))
    for text, pred in list(zip(texts, after))[:4]:
        print(f"  {pred!r:16} <- {text}")
    print(f"held-out accuracy {correct}/{len(test)}; reloaded with PeftModel and AutoPeftModelForSeq2SeqLM: "
          f"identical generations; {time.time() - start:.0f} s in all")


if __name__ == "__main__":
    main()
