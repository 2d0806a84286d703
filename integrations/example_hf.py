"""Scheduled unfreezing of a Hugging Face model with the real transformers Trainer, on CPU in seconds:
a tiny random BERT (built from a config: nothing is downloaded) learns a toy rule; layers unfreeze top-down,
one per epoch. `python -m integrations.example_hf [--epochs 4] [--suf-k 1] [--out DIR]`. The two lines that
matter are marked; everything else is an ordinary Trainer script."""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from console import what_trains
from integrations.hf import SUFCallback
from integrations.layouts import layout_for


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--suf-k", type=int, default=1, help="layers unfrozen at the start and at every epoch")
    ap.add_argument("--out", default=None, help="Trainer output_dir (default: a temporary folder)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)  # a model this small trains fastest on one thread
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, num_labels=2
    )
    model = BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (256, 12), generator=g)
    data = [{"input_ids": x, "labels": int(x[0] < 32)} for x in ids]  # the rule: is the first token small?
    out = a.out or tempfile.mkdtemp(prefix="suf_example_")
    args = TrainingArguments(
        out, num_train_epochs=a.epochs, per_device_train_batch_size=16, learning_rate=1e-3, weight_decay=0.01,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, logging_strategy="epoch",
    )  # fmt: skip

    # the two lines: a layout of the model, and the callback with its optimizer
    suf = SUFCallback(layout_for(model, head=["classifier"], others=["bert.pooler"]), suf_k=a.suf_k)
    trainer = Trainer(model, args, train_dataset=data, optimizers=(suf.optimizer(model, args), None), callbacks=[suf])

    rows = what_trains.describe_schedule(model, suf.layout, suf.schedule, a.epochs)
    print("the schedule (what --print-schedule prints):\n" + what_trains.format_schedule(rows), flush=True)
    trainer.train()
    for entry in trainer.state.log_history:
        if "trainable" in entry:
            print("scheduled unfreezing:", entry["trainable"])
        elif "loss" in entry:
            print(f"epoch {entry['epoch']:.0f}: training loss {entry['loss']:.4f}")
    return trainer.state.log_history


if __name__ == "__main__":
    main()
