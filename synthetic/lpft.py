"""LP-FT's first phase for Study 3 (docs/synthetic/protocol_study3.md section 3; Kumar et al., ICLR 2022, "Fine-Tuning
can Distort Pretrained Features and Underperform Out-of-Distribution"): the task head alone is trained on the frozen
pretrained encoder's pooled outputs (the linear probe, LP), and the result is written as a checkpoint that
`train_uc2.py --checkpoint` loads whole (head included), so the second phase (FT) is the real trainer's policy full
started from the probed head.

  python -m synthetic.lpft --world W --checkpoint P.bin --seed 100 --out lp.pt

Choices (the paper fits a linear head to convergence with L-BFGS; ours is the xGQA task's MLP head, VOLTA's
SimpleClassifier): the pooled outputs are computed once with dropout off (the features the probe sees are fixed, as
in LP); the head trains with the task's loss (BCE times the number of answers) and its input dropout, AdamW lr 1e-3,
weight decay 0.01 on every head parameter, batch 64, 20 epochs, shuffled by the seed; the pooler stays pretrained.

Off the reading path: a study in the synthetic world (synthetic/README.md); nothing on the card imports it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import train_uc2
from formats import tokenizer_check
from synthetic import study as ss

PROBE = {"epochs": 20, "lr": 1e-3, "weight_decay": 0.01, "batch_size": 64}


@torch.no_grad()
def pooled_features(model: train_uc2.UC2, world: Path, tok, num_answers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled outputs [N, pooler_size] with dropout off, soft targets [N, num_answers]) of the English train split."""
    examples = data.load_split(world, "xgqa", "train", "en")
    ds = data.make_dataset(
        "uc2", "xgqa", examples, features=str(world / "features.lmdb"), train=False, max_regions=ss.FT["max_regions"]
    )
    collate = data.UC2Collate("xgqa", tok, train=True, num_answers=num_answers)
    model.eval()
    feats, targets = [], []
    for i in range(0, len(ds), 128):
        batch = collate([ds[j] for j in range(i, min(i + 128, len(ds)))])
        feats.append(model.cls_features(batch))
        targets.append(batch["target"])
    return torch.cat(feats), torch.cat(targets)


def train_head(head: nn.Module, x: torch.Tensor, target: torch.Tensor, dropout: float, seed: int) -> list[float]:
    """The probe: the head alone on fixed features; the mean loss of every epoch."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    drop = nn.Dropout(dropout)
    opt = torch.optim.AdamW(head.parameters(), lr=PROBE["lr"], weight_decay=PROBE["weight_decay"])
    head.train()
    losses = []
    for _ in range(PROBE["epochs"]):
        perm, total = torch.randperm(len(x), generator=gen), 0.0
        for i in range(0, len(x), PROBE["batch_size"]):
            idx = perm[i : i + PROBE["batch_size"]]
            loss = F.binary_cross_entropy_with_logits(head(drop(x[idx])), target[idx]) * target.shape[1]
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(x))
    return losses


def probe(world: Path, checkpoint: Path, seed: int, out: Path) -> dict:
    """Phase 1 of LP-FT: returns what it did; writes `out` ({"model", "meta"}, as train_uc2's model_final.pt)."""
    torch.set_num_threads(1)
    start = time.time()
    config = train_uc2.resolve_config(str(world / "model_config.json"))
    torch.manual_seed(seed)  # the head's initial weights
    model = train_uc2.build_model("xgqa", config)
    train_uc2.load_checkpoint_arg(model, str(checkpoint))
    tok = tokenizer_check.load_tokenizer(str(world / "tokenizer"))
    x, target = pooled_features(model, world, tok, config["num_answers"])
    losses = train_head(model.head, x, target, config["classifier_dropout"], seed)
    info = {"checkpoint": str(checkpoint), "seed": seed, **PROBE, "loss": losses, "seconds": time.time() - start}
    meta = {
        "model": "uc2",
        "task": "xgqa",
        "config": config,
        "tokenizer_size": len(tok),
        "tokenizer_vocab": tokenizer_check.tokenizer_fingerprint(tok),
        "lpft_probe": info,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "meta": meta}, out)
    return info


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", required=True)
    p.add_argument("--checkpoint", required=True, help="the pretrained checkpoint (VOLTA layout)")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", required=True, help="the probed checkpoint for train_uc2.py --checkpoint")
    args = p.parse_args(argv)
    info = probe(Path(args.world), Path(args.checkpoint), args.seed, Path(args.out))
    print(f"lp probe: loss {info['loss'][0]:.3f} -> {info['loss'][-1]:.3f} in {info['seconds']:.0f} s; {args.out}")


if __name__ == "__main__":
    main()
