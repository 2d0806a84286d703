"""Toy trainer for tests/test_engine.py: a 4-layer residual MLP "encoder" with embeddings and a head,
trained by the real engine.train loop. Runs in-process (main(argv)) or as a script / under torchrun.

Extra flags: --variants full suf suf-step llrd top dropout  (each into <output-dir>/<variant>, one process
group; "dropout" = full with --dropout 0.1),
--fail raise|hang  (after the variants, rank 1 raises / hangs at its 2nd step of one more run; prints
"toy: failure phase <time>" first), --n-train/--n-eval sizes, --nan-index / --nan-from-epoch
(non-finite inputs), --layers.
Per variant it writes hashes.rank<r>.json (parameter hash after every optimizer step) and
eval_ids.epoch<e>.json (the gathered evaluation ids, rank 0).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _faults  # noqa: E402
import engine  # noqa: E402
from console import cli, what_trains  # noqa: E402
from training import devices  # noqa: E402
import freeze  # noqa: E402

DIM, CLASSES = 8, 3
DEFAULTS = {("paper", t): dict(lr=1e-2, batch_size=12, epochs=3) for t in engine.TASKS}


class ToyModel(nn.Module):
    def __init__(self, layers: int = 4, dropout: float = 0.0):
        super().__init__()
        self.embeddings = nn.Linear(DIM, DIM)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(DIM, DIM), nn.GELU(), nn.Dropout(dropout), nn.LayerNorm(DIM)) for _ in range(layers)
        )
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, x):
        h = self.embeddings(x)
        for layer in self.layers:
            h = h + layer(h)
        return self.head(h)

    def loss(self, batch):
        return F.cross_entropy(self(batch["x"]), batch["y"])


def layout(layers: int) -> freeze.LayerLayout:
    return freeze.layout_from_rules(layers, [("layers.", 0, 1)], [("embeddings.", "embeddings"), ("head.", "head")])


class ToyData(torch.utils.data.Dataset):
    """Fixed random points labelled by a random linear map; per-epoch input noise drawn from a
    (seed, epoch, index) generator, as the contract asks of real datasets."""

    def __init__(self, n: int, seed: int, nan_index=(), nan_from_epoch: int | None = None):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, DIM, generator=g)
        self.y = (self.x @ torch.randn(DIM, CLASSES, generator=g)).argmax(1)
        self.seed, self.epoch, self.nan_index, self.nan_from_epoch = seed, 0, set(nan_index), nan_from_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 10_007 + i)
        x = self.x[i] + 0.05 * torch.randn(DIM, generator=g)
        if i in self.nan_index or (self.nan_from_epoch is not None and self.epoch >= self.nan_from_epoch):
            x = x * float("nan")
        return {"x": x, "y": self.y[i], "id": i}


def param_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def make_evaluate(data: ToyData, dist: devices.DistInfo, out: Path):
    def evaluate(model, epoch, langs=None):
        idx = list(devices.shard(len(data), dist))
        pred = model(data.x[idx]).argmax(1) if idx else torch.zeros(0, dtype=torch.long)
        rows = devices.gather([(i, int(p == data.y[i])) for i, p in zip(idx, pred.tolist())], dist)
        if dist.is_main:
            (out / f"eval_ids.epoch{epoch}.json").write_text(json.dumps([i for i, _ in rows]))
        correct = sum(c for _, c in rows)
        results = {
            "en": {"accuracy": 100.0 * correct / len(rows), "n": len(rows)},
            "de": {"accuracy": 100.0 * (len(rows) - correct) / len(rows), "n": len(rows)},
        }
        return {lang: m for lang, m in results.items() if langs is None or lang in langs}

    return evaluate


def run_one(args: argparse.Namespace, dist: devices.DistInfo) -> None:
    schedule = freeze.schedule_from_args(args, args.layers)
    if args.print_schedule:  # as the trainers do it
        return what_trains.print_schedule_only(
            lambda task, config: ToyModel(args.layers), {}, layout(args.layers), schedule, args, lambda: args.n_train
        )
    out = engine.check_run_dir(args, dist)
    engine.seed_everything(args.seed)
    model = ToyModel(args.layers, args.dropout or 0.0)
    train_set = ToyData(args.n_train, args.seed, args.nan_index, args.nan_from_epoch)
    loader = engine.build_train_loader(train_set, args, dist)
    hashes: list[str] = []
    meta = {"model": "toy", "task": args.task, "config": {"layers": args.layers, "dim": DIM}}
    try:
        engine.train(
            args,
            model,
            layout(args.layers),
            schedule,
            loader,
            make_evaluate(ToyData(args.n_eval, args.seed + 1), dist, out),
            meta,
            dist,
            on_step=lambda m, step: hashes.append(param_hash(m)),
            run_dir=out,
        )
    finally:
        if out.is_dir():
            (out / f"hashes.rank{dist.rank}.json").write_text(json.dumps(hashes))


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(description=__doc__)
    engine.add_common_args(parser, DEFAULTS)
    parser.add_argument("--variants", nargs="+", default=None)
    parser.add_argument("--fail", choices=("raise", "hang"), default=None)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--n-train", type=int, default=48)
    parser.add_argument("--n-eval", type=int, default=10)
    parser.add_argument("--nan-index", type=int, nargs="*", default=())
    parser.add_argument("--nan-from-epoch", type=int, default=None)
    args = engine.parse_args(parser, argv, DEFAULTS, "toy")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same float results in-process and in subprocesses; 2 shared cores
    try:
        dist = engine.setup_distributed()
        if not args.variants:
            return run_one(args, dist)
        for variant in args.variants + (["fail"] if args.fail else []):
            a = copy.deepcopy(args)
            a.policy, _, unit = variant.partition("-")
            a.unfreeze_unit = unit or "epoch"
            if variant == "dropout":
                a.policy, a.dropout = "full", 0.1
            a.output_dir = str(Path(args.output_dir) / variant)
            if variant == "fail":
                a.policy = "full"
                _faults.install(f"{args.fail}:step:2:1")  # for the rest of the process
                print(f"toy: failure phase {time.time()}", flush=True)
            run_one(a, dist)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
    engine.cleanup_distributed()
