"""Training loop shared by train_uc2.py and train_cclm.py: common CLI, distributed setup, data order,
AdamW + warm-up/decay, AMP, gradient accumulation, scheduled unfreezing with DDP re-wrapping,
non-finite-loss guard, per-epoch evaluation, metrics.jsonl, atomic checkpoints, load plans (a reference
checkpoint's keys onto a model) and exact resume.

A trainer's main() is (decorated with engine.exits_on_bad_input: bad input ends it as one "error: ..." line):
    args = engine.parse_args(parser, argv, DEFAULTS, "uc2")   # after engine.add_common_args(parser, DEFAULTS)
    dist = engine.setup_distributed()
    run_dir = engine.check_run_dir(args, dist)  # before anything is built: a bad --output-dir costs nothing
    engine.seed_everything(args.seed)     # identical model init on every rank
    model = build_model(...); layout = layer_layout(task); schedule = freeze.schedule_from_args(args, layout.num_layers)
    loader = engine.build_train_loader(dataset, args, dist, collate_fn)
    evaluate_fn = engine.trainer_evaluate_fn(model_name, args, tokenizer, dist, ...)   # the per-epoch evaluation
    engine.train(args, model, layout, schedule, loader, evaluate_fn, meta, dist, module_lr=..., run_dir=run_dir)
    engine.cleanup_distributed()

Run folder (--output-dir): args.json, metrics.jsonl, checkpoint_last.pt (resume state, written
atomically after every epoch, before its evaluation), model_final.pt ({"model": state_dict, "meta": ...}).
Rank 0 holds an flock on the folder while it runs: a second process on the same folder is refused.

Sections, in file order (each opens with a "# ---" rule): CLI (parser, argument checks, two-stage parse_args);
distributed; data order (seeded samplers, loaders); optimizer, AMP; checkpoints (reading torch files, the
tokenizer fingerprint); load plans; run folder, metrics; fault injection (tests); the loop (train, the step,
resume); evaluation (metrics; running a model over examples; results files and tables; evaluation sets and
evaluate_task).

Environment: SUF_DIST_TIMEOUT (seconds, default 600) for collectives; SUF_DEVICE=cpu forces CPU;
SUF_FAULT injects failures for tests (see fault_point; inert unless set).
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import functools
import hashlib
import json
import math
import os
import pickle
import random
import signal
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Sampler, Subset
from tqdm import tqdm

import data
import freeze

TASKS = data.TASKS  # the one task table (data.py)
RECIPES = ("paper", "iglue")  # paper: the paper's stated settings; iglue: IGLUE's released scripts' values
CHECKPOINT, FINAL, METRICS, ARGS = "checkpoint_last.pt", "model_final.pt", "metrics.jsonl", "args.json"
RUN_FILES = (CHECKPOINT, FINAL, METRICS, ARGS)

# Arguments a --resume must repeat (they change the result; data paths may move), compared by check_resume_args
# with the run's saved ones. A key a trainer lacks is skipped: max_regions, retrieval_loss/_negatives are UC2's,
# vision_lr and lr_mult CCLM's; the comparison systems add theirs to this list next to their parsers.
RESUME_KEYS = tuple(
    """task seed epochs lr batch_size weight_decay adam_eps adam_betas clip_grad warmup_ratio schedule_epochs recipe
    max_steps_per_epoch policy suf_k unfreeze_every unfreeze_unit top_layers llrd_decay freeze_embeddings train_split
    train_lang dropout amp max_regions retrieval_loss retrieval_negatives vision_lr lr_mult""".split()
)

# Ranges of numeric arguments, checked right after parsing (before anything is written). A key the parser
# lacks, or left at None (optional), is skipped: max_regions is UC2's, image_res / vision_lr CCLM's.
_AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
_NOT_NEGATIVE = (lambda v: v >= 0 and math.isfinite(v), ">= 0")
ARG_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    **dict.fromkeys(("epochs", "schedule_epochs"), _AT_LEAST_1),
    **dict.fromkeys(("lr", "vision_lr", "weight_decay"), _NOT_NEGATIVE),
    "warmup_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "adam_eps": (lambda v: v > 0 and math.isfinite(v), "> 0"),
    "adam_betas": (lambda v: all(0 <= b < 1 for b in v), "each in [0, 1)"),
    "clip_grad": (lambda v: v >= 0 and math.isfinite(v), ">= 0 (0 = off)"),
    "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    **dict.fromkeys(
        "batch_size micro_batch_size grad_accum eval_batch_size max_regions image_res".split(), _AT_LEAST_1
    ),
    "num_workers": _NOT_NEGATIVE,
    **dict.fromkeys(("max_steps_per_epoch", "max_nonfinite"), _AT_LEAST_1),
    "log_every": (lambda v: v >= 0, ">= 0 (0 = only at epoch ends)"),
}


def check_arg_ranges(args: argparse.Namespace) -> None:
    """One-line SystemExit naming the first numeric argument outside its range (ARG_RULES)."""
    for key, (ok, rule) in ARG_RULES.items():
        value = getattr(args, key, None)
        if value is not None and not ok(value):
            shown = " ".join(f"{v:g}" for v in value) if isinstance(value, (list, tuple)) else f"{value:g}"
            raise SystemExit(f"error: --{key.replace('_', '-')} {shown} is out of range: must be {rule}")


def check_resume_args(args: argparse.Namespace, saved: dict, keys: Sequence[str], run: object) -> None:
    """--resume: one-line SystemExit naming the first of `keys` whose value differs from the run's `saved` arguments
    (args.json, or a checkpoint's "args"); a key the run did not save is skipped. The one comparison of every
    trainer: engine.resume passes RESUME_KEYS, the comparison systems RESUME_KEYS plus their own."""
    for key in keys:
        if key in saved and json_safe(getattr(args, key, None)) != saved[key]:
            raise SystemExit(
                f"error: --resume: --{key.replace('_', '-')} is {getattr(args, key, None)!r} but the run in "
                f"{run} used {saved[key]!r}; resume with the same settings"
            )


def read_model_config(
    name: str,
    configs: dict[str, dict],
    optional: Sequence[str] = (),
    foreign: Callable[[dict], dict | None] | None = None,
) -> dict:
    """--model-config NAME|FILE: a copy of configs[NAME], or a JSON file whose keys override configs["base"];
    foreign(d) converts a file in another format (UC2: VOLTA's config) and returns None for one of ours."""
    if name in configs:
        return dict(configs[name])
    if not os.path.isfile(name):
        raise SystemExit(f"error: --model-config {name!r}: not one of {', '.join(configs)} and no such file")
    try:
        cfg = data.read_json(name, annotations=False)
    except ValueError as e:
        raise SystemExit(f"error: --model-config {e}") from None
    if not isinstance(cfg, dict):
        raise SystemExit(f"error: --model-config {name}: expected a JSON object of config keys")
    converted = foreign(cfg) if foreign is not None else None
    if converted is not None:
        return converted
    unknown = sorted(set(cfg) - set(configs["base"]) - set(optional))
    if unknown:
        raise SystemExit(f"error: --model-config {name}: unknown key {unknown[0]!r}")
    return {**configs["base"], **cfg}


def check_heads(config: dict, pairs: list[tuple[str, str]], source: str) -> None:
    """One-line SystemExit when a width of the model config is not divisible by its number of attention heads
    (torch would fail later, deep in the first forward pass). pairs: (width key, heads key)."""
    for width, heads in pairs:
        w, h = config.get(width), config.get(heads)
        if not (isinstance(w, int) and isinstance(h, int) and w >= 1 and h >= 1 and w % h == 0):
            raise SystemExit(
                f"error: --model-config {source}: {width} {w} is not divisible by {heads} {h} "
                f"(each attention head takes {width} / {heads} dimensions)"
            )


# ---------------------------------------------------------------------------------------------- CLI


def table_help(defaults: dict, key: str, text: str) -> str:
    """--help of an argument a trainer's DEFAULTS table sets: text + "; default: xgqa 5, xvnli 10, xflickrco 10"
    (the paper recipe's, per task), then another recipe's where they differ ("; --recipe iglue: 20")."""
    paper = {t: row[key] for (r, t), row in defaults.items() if r == "paper" and key in row}
    for recipe in RECIPES:
        rows = {t: v[key] for (r, t), v in defaults.items() if r == recipe and key in v and v[key] != paper.get(t)}
        rows = paper if recipe == "paper" else rows
        values = {str(v) for v in rows.values()}
        shown = values.pop() if len(values) == 1 else ", ".join(f"{t} {v}" for t, v in rows.items())
        text += f"; {'default' if recipe == 'paper' else '--recipe ' + recipe}: {shown}" if rows else ""
    return text


def add_common_args(parser: argparse.ArgumentParser, defaults: dict) -> None:
    """Adds the run/optimizer/AMP/data arguments and freeze.add_policy_args. defaults: the trainer's table
    {(recipe, task): {argument: value}}, what depends on --recipe / --task (parse_args); --help shows it."""
    g = parser.add_argument_group("run (engine.py)")
    g.add_argument("--task", choices=TASKS, required=True)
    g.add_argument("--data-root", default=None, help="IGLUE data folder (see data.py)")
    g.add_argument("--langs", nargs="+", default=None, help="evaluation languages, e.g. en de or en,de (default: all)")
    g.add_argument("--eval-split", default="test", help="split evaluated (per epoch with --eval-every, and at the end)")
    g.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="also evaluate after every N-th epoch (1: the paper's per-epoch curves, Figures 2-3); "
        "0: only after the last epoch, which always evaluates every language",
    )
    g.add_argument("--eval-fp32", action="store_true", help="evaluate in float32 although --amp trains in bf16/fp16")
    g.add_argument(
        "--eval-langs", nargs="+", default=None, help="languages of per-epoch evaluations (default: --langs)"
    )
    g.add_argument("--train-split", default="train", help="training split (IGLUE: train; few-shot: train_<shots>)")
    g.add_argument("--train-lang", default="en", help="training language (zero-shot: en; few-shot: the target)")
    g.add_argument("--output-dir", default=None, help="run folder (default runs/<model>_<task>_<policy>_seed<seed>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --output-dir from checkpoint_last.pt")
    g.add_argument("--seed", type=int, default=42, help="model initialisation, data order, dropout, negatives")
    have = ", ".join(sorted({r for r, _ in defaults}, key=RECIPES.index))
    g.add_argument(
        "--recipe",
        choices=RECIPES,
        default="paper",
        help=f"paper: the paper's stated settings; iglue: IGLUE's released scripts' values (this model has: {have})",
    )
    # Paper section 4: AdamW, weight decay 0.01, 10% linear warm-up; silent on eps and betas (torch/HF AdamW's)
    # and on clipping (off; IGLUE's UC2 recipe uses 1.0).
    o = parser.add_argument_group("optimisation (engine.py)")
    o.add_argument("--epochs", type=int, default=None, help=table_help(defaults, "epochs", "epochs trained"))
    o.add_argument("--lr", type=float, default=None, help=table_help(defaults, "lr", "peak learning rate"))
    o.add_argument("--batch-size", type=int, default=None, help=table_help(defaults, "batch_size", "global batch"))
    o.add_argument("--micro-batch-size", type=int, default=None, help="per-process batch per forward pass")
    o.add_argument("--grad-accum", type=int, default=None, help="accumulation steps (default: batch / micro / world)")
    o.add_argument("--weight-decay", type=float, default=0.01, help=table_help(defaults, "weight_decay", "AdamW's"))
    o.add_argument("--adam-eps", type=float, default=1e-8, help=table_help(defaults, "adam_eps", "AdamW's eps"))
    o.add_argument("--adam-betas", type=float, nargs=2, default=[0.9, 0.999], help="AdamW's betas")
    o.add_argument(
        "--clip-grad", type=float, default=0.0, help=table_help(defaults, "clip_grad", "max grad norm; 0: off")
    )
    o.add_argument("--warmup-ratio", type=float, default=0.1, help="linear warm-up fraction of all optimizer steps")
    o.add_argument(
        "--schedule-epochs",
        type=int,
        default=None,
        help=table_help(defaults, "schedule_epochs", "length of the LR schedule in epochs (default: --epochs)")
        + "; IGLUE's UC2 runs train 5/10/10 epochs of a 20-epoch schedule: their LR never reaches 0",
    )
    o.add_argument(
        "--amp",
        choices=("auto", "bf16", "fp16", "off"),
        default="auto",
        help="auto: bf16 on GPUs that support it, else off (always off on CPU); fp16 uses a GradScaler",
    )
    o.add_argument("--dropout", type=float, default=None, help="override the model config's dropout probabilities")
    o.add_argument("--max-nonfinite", type=int, default=20, help="stop after this many non-finite losses in a row")
    o.add_argument("--ddp-find-unused", action="store_true", help="DDP's find_unused_parameters (unused params)")
    r = parser.add_argument_group("loop control (engine.py)")
    r.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="data-loader workers per process (default: this process's share of the node's CPUs, minus one, <= 16)",
    )
    r.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap optimizer steps per epoch (tests, demo)")
    r.add_argument("--log-every", type=int, default=50, help="train record every N optimizer steps (and at epoch end)")
    r.add_argument("--print-schedule", action="store_true", help="print what trains when, then exit")
    r.add_argument("--json", action="store_true", help="machine-readable (JSON) output for --print-schedule")
    freeze.add_policy_args(parser)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None, defaults: dict, model: str):
    """argparse, with the (--recipe, --task) row of the trainer's DEFAULTS table in place of argparse's defaults
    (argparse cannot make a default depend on another argument; the user's values still win), then the checks.
    model: the run-folder prefix (runs/<model>_<task>_<policy>_seed<seed>)."""
    first = argparse.ArgumentParser(add_help=False)  # only to read --task and --recipe
    first.add_argument("--task")
    first.add_argument("--recipe", default="paper")
    chosen = first.parse_known_args(argv)[0]
    args = parser.parse_args(argv, argparse.Namespace(**defaults.get((chosen.recipe, chosen.task), {})))
    if args.recipe not in {r for r, _ in defaults}:
        have = ", ".join(sorted({r for r, _ in defaults}, key=RECIPES.index))
        raise SystemExit(f"error: --recipe {args.recipe} is not defined for this model (have: {have})")
    for key in ("epochs", "lr", "batch_size"):
        if getattr(args, key) is None:
            raise SystemExit(f"error: --{key.replace('_', '-')} has no default for task {args.task}; pass it")
    args.schedule_epochs = args.epochs if args.schedule_epochs is None else args.schedule_epochs
    check_arg_ranges(args)
    if args.schedule_epochs < args.epochs:
        raise SystemExit(
            f"error: --schedule-epochs {args.schedule_epochs} is shorter than --epochs {args.epochs} "
            f"(the learning rate would sit at 0 for the last epochs); pass --schedule-epochs >= --epochs"
        )
    split = lambda items: items and [lang for item in items for lang in item.split(",") if lang]  # noqa: E731
    args.langs, args.eval_langs = split(args.langs), split(args.eval_langs)
    if args.eval_every < 0:
        raise SystemExit(f"error: --eval-every must be >= 0, got {args.eval_every}")
    args.num_workers = default_num_workers() if args.num_workers is None else args.num_workers
    if args.output_dir is None:
        args.output_dir = f"runs/{model}_{args.task}_{args.policy}_seed{args.seed}"
    args.adam_betas = list(args.adam_betas)
    return args


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help with each option's default (unless the help text already states it, or it is resolved later)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        hidden = any(action.default is v for v in (None, False, argparse.SUPPRESS)) or "default" in text.lower()
        return text if hidden or not action.option_strings else text + " (default: %(default)s)"


def default_num_workers(cpus: int | None = None, procs_per_node: int | None = None, cap: int = 16) -> int:
    """Loader workers per process: the CPUs this process may use shared among the node's processes, one
    left for the training loop itself. Our choice: one slow core decodes ~5k UC2 samples/s (~4.4k/s feed an
    A100) but only ~100-130 CCLM training images/s (~340/s feed an A100), so CCLM wants every core it can
    get; the cap bounds the shared memory the workers' batches hold (data.BatchLoader)."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if procs_per_node is None:
        procs_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(cap, cpus // max(procs_per_node, 1) - 1))


def is_rank0_process() -> bool:
    """True in a single process and in torchrun's rank 0 (usable before the process group exists)."""
    return os.environ.get("RANK", "0") == "0"


class ArgumentParser(argparse.ArgumentParser):
    """Our scripts' parser: --help with defaults (HelpFormatter), and command-line errors as one line printed by
    rank 0 only (torchrun starts the script once per rank: argparse would print the whole usage from every rank).
    Subcommand parsers are of this class too (argparse makes them with the parent's class)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        if is_rank0_process():
            print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr, flush=True)
        raise SystemExit(2)


def exits_on_bad_input(main: Callable) -> Callable:
    """Decorator for a script's main(argv): a ValueError (how this project reports bad input: data.BadInput,
    checkpoint, config and annotation errors) ends it as SystemExit("error: <first line>"), so main() reads top to
    bottom with no try/except. Lines after the first (a load plan's key-by-key report) go to stderr first, from
    rank 0. Where the message must say which input it is about, raise it inside `about(flag)`."""

    @functools.wraps(main)
    def one_line(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except ValueError as e:
            first, _, details = str(e).partition("\n")
            if details and is_rank0_process():
                print(details, file=sys.stderr, flush=True)
            raise SystemExit(f"error: {first}") from None

    return one_line


@contextmanager
def about(what: str, value: object = None):
    """ValueErrors raised inside say which input they are about: "what: value: message" ("what: message" when
    value is None or the message names it already), e.g. about("--checkpoint", args.checkpoint)."""
    try:
        yield
    except ValueError as e:
        named = "" if value is None or str(value) in str(e).partition("\n")[0] else f"{value}: "
        raise ValueError(f"{what}: {named}{e}") from None


def run_main(main: Callable[[], object]) -> None:
    """A script's entry point: an "error: ..." exit is printed once (rank 0), not by every torchrun rank;
    a closed stdout (`... | head`) ends the program quietly."""
    try:
        code = data.exit_quietly_on_broken_pipe(main)
    except SystemExit as e:
        if isinstance(e.code, str):
            if is_rank0_process():
                print(e.code, file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        raise
    if isinstance(code, int) and code:
        raise SystemExit(code)


# ---------------------------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> DistInfo:
    """torchrun environment -> process group (nccl on CUDA, gloo on CPU); plain single process otherwise.

    Collectives time out after SUF_DIST_TIMEOUT seconds (default 600) so that a rank that died or hangs
    makes the others fail (and torchrun exit non-zero) instead of waiting forever. SUF_DEVICE=cpu
    forces CPU on a GPU machine."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and os.environ.get("SUF_DEVICE", "") != "cpu"
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not tdist.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get("SUF_DIST_TIMEOUT", 600)))
        tdist.init_process_group("nccl" if cuda else "gloo", timeout=timeout, device_id=device if cuda else None)
    return DistInfo(rank, world, local_rank, device)


def cleanup_distributed(end_group: bool = True) -> None:
    """Releases this process's run-folder locks (the trainers call it in `finally`, so a failed run never keeps
    its folder locked in-process) and ends the process group, unless end_group is False: a caller that set the
    group up and runs more in it (eval_zeroshot fewshot: several trainings, then the evaluation) ends it itself."""
    release_run_dirs()
    if end_group and tdist.is_initialized():
        tdist.destroy_process_group()


def barrier(dist: DistInfo) -> None:
    if dist.distributed:
        tdist.barrier()


def shard(n: int, dist: DistInfo | None) -> range:
    """This rank's contiguous slice of range(n); the first n % world ranks get one extra item."""
    if dist is None or not dist.distributed:
        return range(n)
    base, extra = divmod(n, dist.world)
    start = dist.rank * base + min(dist.rank, extra)
    return range(start, start + base + (dist.rank < extra))


def gather(items: list, dist: DistInfo | None) -> list:
    """Every rank's list concatenated in rank order (on every rank): with shard() each item once, in order."""
    if dist is None or not dist.distributed:
        return list(items)
    parts: list = [None] * dist.world
    tdist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def broadcast_object(obj, dist: DistInfo):
    """rank 0's obj on every rank."""
    if not dist.distributed:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- data order


def micro_and_accum(args: argparse.Namespace, dist: DistInfo) -> tuple[int, int]:
    """(per-process micro-batch, accumulation steps) with batch_size == micro * accum * world."""
    batch, world = args.batch_size, dist.world
    if args.micro_batch_size:
        micro = args.micro_batch_size
        accum = args.grad_accum or max(1, batch // (micro * world))
    elif args.grad_accum:
        accum = args.grad_accum
        micro = max(1, batch // (accum * world))
    else:
        accum, micro = 1, max(1, batch // world)
    if micro * accum * world != batch:
        raise SystemExit(
            f"error: --batch-size {batch} must equal micro-batch {micro} x accumulation {accum} x "
            f"{world} process(es); choose --micro-batch-size/--grad-accum that divide it"
        )
    return micro, accum


class GlobalBatchSampler(Sampler):
    """Yields this rank's micro-batches (lists of indices).

    The data is shuffled globally by (seed, epoch) and cut into global batches of batch_size (the
    incomplete last one is dropped, so every optimizer step sees a full global batch); each global
    batch into accum global micro-batches of micro * world; rank r takes the r-th contiguous slice of
    each. So N processes see exactly the global batches of 1 process with the same --batch-size."""

    def __init__(self, n: int, batch_size: int, micro_batch_size: int, dist: DistInfo, seed: int, shuffle: bool = True):
        if batch_size % (micro_batch_size * dist.world):
            raise ValueError(
                f"batch size {batch_size} is not a multiple of micro-batch {micro_batch_size} x {dist.world} processes"
            )
        self.n, self.batch_size, self.micro, self.dist = n, batch_size, micro_batch_size, dist
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (self.n // self.batch_size) * (self.batch_size // (self.micro * self.dist.world))

    def __iter__(self):
        order = (
            np.random.default_rng([self.seed, self.epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
        )
        chunk = self.micro * self.dist.world
        for start in range(0, (self.n // self.batch_size) * self.batch_size, chunk):
            lo = start + self.dist.rank * self.micro
            yield order[lo : lo + self.micro].tolist()


def build_train_loader(
    dataset, args: argparse.Namespace, dist: DistInfo, collate_fn: Callable | None = None
) -> DataLoader:
    micro, _ = micro_and_accum(args, dist)
    sampler = GlobalBatchSampler(len(dataset), args.batch_size, micro, dist, args.seed)
    # Non-persistent workers: each epoch's workers copy the dataset after set_epoch(epoch).
    return data.BatchLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=args.num_workers,
        collate_fn=collate_fn,
        pin_memory=dist.device.type == "cuda",
        persistent_workers=False,
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Epoch-dependent order (sampler) and randomness (dataset: negatives, augmentation)."""
    for obj in (loader.batch_sampler, loader.sampler, loader.dataset):
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)


def to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


# ---------------------------------------------------------------------------------------------- optimizer, AMP


def linear_warmup_decay(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR factor: 0 -> 1 linearly over warmup_steps, then linearly to 0 at total_steps. As in
    VOLTA/X2-VLM/HF, step 0 has factor 0 when there is a warm-up."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def build_optimizer(
    model: nn.Module,
    layout: freeze.LayerLayout,
    schedule: freeze.Schedule,
    args: argparse.Namespace,
    module_lr: dict[str, float] | None = None,
    *,
    total_steps: int | None = None,
    no_decay: Callable[[str, nn.Parameter], bool] | None = None,
    lr_mult: Callable[[str], float] | None = None,
):
    """AdamW over ALL parameters (frozen ones get no grad, hence no update/decay/state), built once;
    LambdaLR: linear warm-up over warmup_ratio of total_steps (HF: ceil), then linear decay to 0.
    total_steps None (benches, tools): constant LR. no_decay(name, param), lr_mult(name): see freeze.param_groups."""
    groups = freeze.param_groups(model, layout, schedule, args.lr, args.weight_decay, module_lr, no_decay, lr_mult)
    # fused: the default CPU AdamW allocates parameter-sized temporaries every step, which for XLM-R's
    # 768 MB embedding table costs seconds per step (bench/suf_step.py); fused kernels exist on CPU and CUDA.
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(
        groups, lr=args.lr, betas=tuple(args.adam_betas), eps=args.adam_eps, weight_decay=args.weight_decay, fused=fused
    )
    if total_steps is None:
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    warmup = math.ceil(args.warmup_ratio * total_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(warmup, total_steps))


def setup_amp(mode: str, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """(autocast dtype or None, GradScaler or None)."""
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    if mode == "off":
        return None, None
    if mode == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise SystemExit("error: --amp bf16: this GPU has no bfloat16 support; use --amp fp16 or off")
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler(device.type)


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


# ---------------------------------------------------------------------------------------------- checkpoints


def check_checkpoint_model(meta: dict | None, model_name: str, path) -> None:
    """Our checkpoints name their model: one of another model is refused (ValueError) before keys are compared."""
    if meta and meta.get("model") not in (None, model_name):
        raise ValueError(
            f"checkpoint {path} holds a {meta['model']} model, not {model_name}; give a {model_name} checkpoint"
        )


def tokenizer_fingerprint(tokenizer) -> str:
    """12 hex digits of sha1 over the vocabulary (id, token): tells two tokenizers of the same size apart."""
    h = hashlib.sha1()
    for token, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        h.update(f"{i}\t{token}\n".encode())
    return h.hexdigest()[:12]


def check_tokenizer_vocab(
    tokenizer,
    embedding_rows: int,
    tokenizer_name: str,
    checkpoint: str | None = None,
    checkpoint_meta: dict | None = None,
) -> None:
    """One-line SystemExit when the tokenizer cannot belong to the model: more ids than embedding rows
    (out of range), or not the tokenizer `checkpoint` was trained with: released / reference weights
    (checkpoint_meta None) were trained with XLM-R's full vocabulary (embedding_rows ids); ours record its
    size and vocabulary fingerprint (tokenizer_size, tokenizer_vocab) in checkpoint_meta (absent: unknown).
    A different vocabulary would silently map tokens to the wrong pre-trained rows. Random-init models
    (tiny config, tests) may have spare rows. Both trainers call it after loading weights."""
    if checkpoint is None:
        trained = {}
    elif checkpoint_meta is None:  # released / reference weights
        trained = {"tokenizer_size": embedding_rows}
    else:
        trained = checkpoint_meta
    n, trained_ids, trained_vocab = len(tokenizer), trained.get("tokenizer_size"), trained.get("tokenizer_vocab")
    if trained_ids is not None and n != trained_ids:
        raise SystemExit(
            f"error: --tokenizer {tokenizer_name} has {n} ids but checkpoint {checkpoint} was trained with "
            f"a {trained_ids}-id tokenizer; use the tokenizer the checkpoint was trained with"
        )
    vocab = tokenizer_fingerprint(tokenizer) if trained_vocab is not None else None
    if vocab != trained_vocab:
        raise SystemExit(
            f"error: --tokenizer {tokenizer_name} is not the tokenizer checkpoint {checkpoint} was trained "
            f"with (same size, different vocabulary: fingerprint {vocab} vs {trained_vocab}); "
            f"use the tokenizer the checkpoint was trained with"
        )
    if n > embedding_rows:
        raise SystemExit(
            f"error: --tokenizer {tokenizer_name} has {n} ids but the model config's vocab_size is "
            f"{embedding_rows} (ids >= {embedding_rows} have no embedding); use a matching tokenizer or config"
        )


def load_tokenizer(args: argparse.Namespace, embedding_rows: int):
    """--tokenizer (data.load_tokenizer), checked against the model's embedding rows; one-line SystemExit."""
    try:
        tokenizer = data.load_tokenizer(args.tokenizer)
    except ValueError as e:
        raise SystemExit(f"error: --tokenizer: {e}") from None
    check_tokenizer_vocab(tokenizer, embedding_rows, args.tokenizer)
    return tokenizer


def atomic_write_text(path: str | Path, text: str) -> None:
    """tmp + os.replace: a crash mid-write never leaves a truncated file in place of a good one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class CheckpointWriteError(ValueError):
    """save_checkpoint could not write (disk full, ...); one line naming the file."""


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Atomic: write <path>.tmp in the same folder, fsync, os.replace. A crash leaves the old file intact."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            # Test hook: a SIGKILL mid-write leaves a partial tmp file; model that before dying.
            fault_point("save_mid", before=lambda: f.truncate(f.tell() // 2))
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except OSError as e:  # e.g. disk full: the partial tmp file would only fill it further
        removed = ""
        try:
            tmp.unlink()
            removed = f"; removed the partial {tmp.name}"
        except FileNotFoundError:
            pass
        except OSError as e2:
            removed = f"; could not remove the partial {tmp} ({e2.strerror or e2}): delete it"
        raise CheckpointWriteError(f"cannot write checkpoint {path}: {e.strerror or e}{removed}") from None


def load_checkpoint(path: str | Path, map_location="cpu", mmap: bool = False) -> dict:
    """read_torch_file; a missing, truncated or corrupt file is a one-line ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} not found")
    try:
        return read_torch_file(path, map_location=map_location, mmap=mmap)
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # torch raises many types for damaged files (RuntimeError, EOFError, UnpicklingError...)
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {detail})") from None


class ForeignState:
    """Inert stand-in for an object whose class a released checkpoint pickles but this project does not have:
    the pickled state is kept as plain data (`.state`); none of the original class's code exists here to run."""

    __slots__ = ("state",)

    def __setstate__(self, state) -> None:
        self.state = state


class VoltaTbLogger(ForeignState):
    """volta.train_utils.tbLogger, pickled into IGLUE/VOLTA's pytorch_ckpt_latest.tar by train_utils.save (its
    __getstate__ keeps counters, task names and paths: ints, floats, strings, dicts)."""

    __slots__ = ()


# (stand-in, the exact name the file pickles): the only classes read_torch_file admits beyond torch's own
FOREIGN_CHECKPOINT_CLASSES = [(VoltaTbLogger, "volta.train_utils.tbLogger")]


_TORCH_VERSION = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])


class UnsafeCheckpointError(ValueError):
    """A torch file asks for a function or class outside the weights-only allowlist; nothing of it was run."""


def _weights_only_reason(e: Exception) -> str:
    """The informative part of torch's multi-line weights-only refusal, in one line."""
    keep = []
    for line in str(e).splitlines():
        line = line.split("WeightsUnpickler error:", 1)[-1].strip()
        if line and not line.startswith(("Weights only load failed", "Check the documentation", "Please file")):
            keep.append(line)
    return " ".join(keep)[:300] or type(e).__name__


def read_torch_file(path: str | Path, map_location="cpu", mmap: bool = False):
    """The one reader of torch files in this project (our checkpoints, VOLTA/IGLUE .bin/.tar, original UC2 .pt,
    X2-VLM .th, Hugging Face pytorch_model.bin): torch.load(weights_only=True), i.e. tensors and plain data
    only, plus FOREIGN_CHECKPOINT_CLASSES as inert stand-ins. A file that asks for anything else raises
    UnsafeCheckpointError naming it; other failures (missing, truncated) propagate for the caller to word."""
    if _TORCH_VERSION < (2, 6):  # weights_only could be escaped before 2.6 (CVE-2025-32434)
        raise RuntimeError(
            f"torch {torch.__version__} cannot read checkpoints safely; install requirements.txt's torch"
        )
    try:
        with torch.serialization.safe_globals(FOREIGN_CHECKPOINT_CLASSES), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # torch's note for protocol > 2
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise
        raise UnsafeCheckpointError(
            f"{path}: refused to load: {_weights_only_reason(e)} (torch files are read with weights_only=True: "
            f"tensors and plain data only; nothing in this file was run)"
        ) from None


# ---------------------------------------------------------------------------------------------- load plans


@dataclass
class LoadPlan:
    """How a checkpoint's keys become a model's state. A trainer's rule table fills it (train_uc2.plan_load,
    train_cclm.plan_pretrained), finish_load_plan completes it, apply_load_plan carries it out, report() says
    what happened to every key. `copy`: our key -> (source key, how); how "full" = the tensor as it is, any other
    name = a transform the trainer gives apply_load_plan (and, for its shape check, finish_load_plan)."""

    fmt: str
    source: str = ""
    copy: dict[str, tuple[str, str]] = field(default_factory=dict)
    aliases: list[tuple[str, str]] = field(default_factory=list)  # (source key, key it duplicates)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (source key, reason)
    initialised: list[tuple[str, str]] = field(default_factory=list)  # (our key, how/why): keeps the model's value
    constant: dict[str, float] = field(default_factory=dict)  # our key -> fill value
    missing: list[str] = field(default_factory=list)  # our keys with no source: error
    unexpected: list[str] = field(default_factory=list)  # source keys we cannot place: error
    mismatched: list[str] = field(default_factory=list)  # shape errors, readable
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def report(self, verbose: bool = False) -> str:
        lines = [
            f"checkpoint {self.source or '(in memory)'}: format {self.fmt}; {len(self.copy)} parameters loaded, "
            f"{len(self.aliases)} alias keys, {len(self.dropped)} dropped, {len(self.initialised)} initialised "
            f"fresh, {len(self.missing)} missing, {len(self.unexpected)} unexpected, {len(self.mismatched)} "
            "shape mismatches"
        ]
        lines += [f"  note: {n}" for n in self.notes]
        if verbose:
            lines += [
                f"  loaded   {dst} <- {src}{'' if how == 'full' else ' [' + how + ']'}"
                for dst, (src, how) in self.copy.items()
            ]
            lines += [f"  alias    {src} (same tensor as {of})" for src, of in self.aliases]
        lines += [f"  dropped  {k}: {why}" for k, why in self.dropped]
        lines += [f"  init     {k}: {why}" for k, why in self.initialised]
        lines += [f"  MISSING  {k}" for k in self.missing]
        lines += [f"  UNEXPECTED {k}" for k in self.unexpected]
        lines += [f"  SHAPE    {m}" for m in self.mismatched]
        return "\n".join(lines)

    def raise_if_bad(self) -> None:
        """ValueError naming the first missing / unexpected / mis-shaped key; the report follows its first line."""
        if not self.ok:
            first = (
                (self.missing and f"missing key {self.missing[0]!r}")
                or (self.unexpected and f"unexpected key {self.unexpected[0]!r}")
                or self.mismatched[0]
            )
            raise ValueError(
                f"{self.source or 'checkpoint'} ({self.fmt}): {first} "
                f"({len(self.missing)} missing, {len(self.unexpected)} unexpected, "
                f"{len(self.mismatched)} shape mismatches)\n{self.report()}"
            )


ShapeFits = Callable[[tuple, tuple], bool]  # (source shape, our shape) -> can `how` copy it


def finish_load_plan(
    plan: LoadPlan,
    source: dict[str, tuple],
    target: dict[str, tuple],
    fresh: Callable[[str], str | None] = lambda key: None,
    fits: dict[str, ShapeFits] | None = None,
) -> LoadPlan:
    """Complete a plan of `source` (key -> shape) into a model of `target` (key -> shape): an our-key the rules
    placed nowhere keeps its initial value if fresh(key) gives the reason, else it is missing; every copy is
    checked by shape (fits[how]; "full": equal shapes) and a copy to no key of ours is unexpected."""
    placed = set(plan.copy) | set(plan.constant) | {k for k, _ in plan.initialised}
    for k in target:
        if k not in placed:
            why = fresh(k)
            (plan.missing.append(k) if why is None else plan.initialised.append((k, why)))
    fits = {"full": lambda s, t: s == t, **(fits or {})}
    for dst, (src, how) in plan.copy.items():
        if dst not in target:
            plan.unexpected.append(src)
            continue
        s, t = tuple(source[src]), tuple(target[dst])
        if not fits[how](s, t):
            plan.mismatched.append(f"{src} {list(s)} -> {dst} {list(t)}")
    plan.copy = {d: v for d, v in plan.copy.items() if d in target}
    return plan


def plan_same_names(source: dict[str, tuple], target: dict[str, tuple], fmt: str, name: str = "") -> LoadPlan:
    """A checkpoint of the model's own layout (ours, or a fine-tuned reference one): every key copied as it is."""
    plan = LoadPlan(fmt, name)
    for k in source:
        (plan.copy.__setitem__(k, (k, "full")) if k in target else plan.unexpected.append(k))
    return finish_load_plan(plan, source, target)


Transform = Callable[[torch.Tensor, torch.Tensor], None]  # (our tensor, source tensor): writes ours in place


def apply_load_plan(
    model: nn.Module, state: dict[str, torch.Tensor], plan: LoadPlan, transforms: dict[str, Transform] | None = None
) -> None:
    """Carry out a checked plan in place: copies (cast to our dtype; how != "full" through transforms[how]) and
    constants. Keys the plan initialises keep the model's values."""
    plan.raise_if_bad()
    ours = model.state_dict()
    transforms = {"full": lambda dst, src: dst.copy_(src), **(transforms or {})}
    with torch.no_grad():
        for dst, (src, how) in plan.copy.items():
            transforms[how](ours[dst], state[src])
        for dst, value in plan.constant.items():
            ours[dst].fill_(value)


def rng_state(device: torch.device) -> dict:
    """This process's RNG states (CUDA: its own device only), in types torch.load(weights_only=True) accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------------------------------------- run folder, metrics


def resuming(args: argparse.Namespace, run_dir: Path) -> bool:
    """--resume with a checkpoint to resume from. --resume of a run killed before its first checkpoint starts
    afresh (engine.train), so the trainer must load --checkpoint as for a new run."""
    return bool(args.resume) and (Path(run_dir) / CHECKPOINT).exists()


def check_run_dir(args: argparse.Namespace, dist: DistInfo) -> Path:
    """One-line SystemExit (on every rank) if --output-dir is in use by another process, holds a run and
    --resume is not given, holds nothing to resume (or a run whose checkpoint is gone), or is not writable.
    Rank 0 then holds the folder's lock until release_run_dirs() (engine.train and cleanup_distributed call
    it). Writes no file; call it once, as early as you like, and give its result to train(run_dir=).
    With --print-schedule nothing is checked."""
    run_dir = Path(args.output_dir)
    if getattr(args, "print_schedule", False):
        return run_dir
    problem = _run_dir_problem(run_dir, args.resume) if dist.is_main else None
    problem = broadcast_object(problem, dist)
    if problem:
        raise SystemExit(f"error: {problem}")
    return run_dir


def _run_dir_problem(run_dir: Path, resume: bool) -> str | None:
    problem = _lock_run_dir(run_dir) if run_dir.is_dir() else None  # first: another process may be writing it
    existing = [f for f in RUN_FILES if (run_dir / f).exists()]
    if problem:
        return problem
    if existing and not resume:
        problem = (
            f"{run_dir} already holds a run ({', '.join(existing)}); pass --resume to continue it or "
            "choose another --output-dir"
        )
    elif resume and not existing:
        problem = f"--resume: {run_dir} holds no run to resume (no {CHECKPOINT} or {ARGS})"
    elif resume:
        problem = _no_checkpoint_problem(run_dir, existing)
    if problem is None:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / f".write_test.{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            problem = f"cannot write to --output-dir {run_dir}: {e.strerror or e}"
    problem = problem or _lock_run_dir(run_dir)
    if problem:
        release_run_dirs(run_dir)
    return problem


def _no_checkpoint_problem(run_dir: Path, existing: list[str]) -> str | None:
    """--resume without checkpoint_last.pt: a run killed before its first checkpoint starts afresh (nothing of
    it is worth keeping); a finished run, or one that completed an epoch, is refused: starting afresh would
    truncate its metrics and replace its model."""
    if CHECKPOINT in existing:
        return None
    have = ", ".join(existing)
    if FINAL in existing:
        return (
            f"--resume: {run_dir} holds a finished run ({have}) but no {CHECKPOINT} to continue from; "
            f"nothing was changed: its model is {run_dir / FINAL}; to train again choose another --output-dir"
        )
    done = _epochs_logged(run_dir / METRICS)
    if done:
        return (
            f"--resume: {run_dir} holds a run that completed {done} epoch(s) ({have}) but its {CHECKPOINT} "
            f"is gone; nothing was changed: restore {CHECKPOINT} to continue, or choose another --output-dir"
        )
    return None


def _epochs_logged(path: Path) -> int:
    """Epochs metrics.jsonl shows completed: an eval record of epoch e, or a train record of epoch e + 1."""
    done = 0
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
                done = max(done, int(rec["epoch"]) - (rec.get("type") == "train"))
            except (ValueError, KeyError, TypeError):
                continue  # a half-written last line
    return done


# Run folders this process holds the lock of: resolved path -> fd of the folder (flock on the folder itself,
# so no lock file joins the run's files). The kernel drops the lock when the process dies: never stale.
_RUN_LOCKS: dict[str, int] = {}


def _lock_run_dir(run_dir: Path) -> str | None:
    key = str(run_dir.resolve())
    if key in _RUN_LOCKS:  # this process already holds it (the trainer checked, engine.train checks again)
        return None
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None  # a file system without flock: run unlocked rather than not at all
        return (
            f"{run_dir} is in use by another process ({_lock_holder(run_dir)}); wait for it to end, or "
            "choose another --output-dir"
        )
    _RUN_LOCKS[key] = fd
    return None


def _lock_holder(run_dir: Path) -> str:
    """'pid N' of the process holding the folder's flock (Linux /proc/locks), else 'pid unknown'."""
    st = os.stat(run_dir)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "FLOCK" in fields and "->" not in fields and inode in fields:
                return f"pid {fields[fields.index(inode) - 1]}"
    except OSError:
        pass
    return "pid unknown"


def release_run_dirs(run_dir: Path | None = None) -> None:
    """Release this process's lock on run_dir (None: on every run folder it holds)."""
    keys = list(_RUN_LOCKS) if run_dir is None else [str(Path(run_dir).resolve())]
    for key in keys:
        fd = _RUN_LOCKS.pop(key, None)
        if fd is not None:
            os.close(fd)


class MetricsLog:
    """metrics.jsonl, one JSON object per line, written by rank 0 only."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, default=float) + "\n")

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def truncate(self, size: int) -> None:
        """Drop what a killed run logged after its last checkpoint (and any half-written line)."""
        if self.enabled and self.size() > size:
            os.truncate(self.path, size)


# ---------------------------------------------------------------------------------------------- fault injection (tests)

_fault_counts: dict[str, int] = {}


def fault_point(name: str, before: Callable[[], object] | None = None) -> None:
    """Test hook, inert unless SUF_FAULT="<kill|raise|hang|enospc>:<point>:<n>[:<rank>]" is set: act the n-th
    time this process reaches `point` (step: after an optimizer step; unfreeze: after the trainable set
    changed; save_mid: inside save_checkpoint before the tmp file is complete; evaluate: after the epoch's
    checkpoint, before its evaluation; epoch_end: after the epoch's checkpoint and evaluation). enospc
    raises OSError(ENOSPC) (save_mid: a disk that filled up mid-write)."""
    spec = os.environ.get("SUF_FAULT")
    if not spec:
        return
    action, point, n, *rank = spec.split(":")
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if point != name or _fault_counts[name] != int(n) or (rank and int(rank[0]) != int(os.environ.get("RANK", 0))):
        return
    if before is not None:
        before()
    print(f"SUF_FAULT: {action} at {name} #{n}", file=sys.stderr, flush=True)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "raise":
        raise RuntimeError(f"SUF_FAULT: injected failure at {name} #{n}")
    elif action == "hang":
        time.sleep(3600)
    elif action == "enospc":  # a full disk, as the write would see it
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ---------------------------------------------------------------------------------------------- the loop


@dataclass
class Progress:
    """Loop counters; saved in the checkpoint and restored by --resume."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps done = global 0-based index of the next step
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss or gradient
    nonfinite_in_a_row: int = 0
    amp_skipped_steps: int = 0  # fp16 GradScaler overflow skips (scale lowered; not an error)
    metrics_offset: int = 0  # metrics.jsonl size at the checkpoint
    # The checkpoint is written before the epoch's evaluation: True when that evaluation is still to log (a
    # resume re-runs it first). Older checkpoints, written after it, lack the field: False.
    eval_pending: bool = False


class LossOf(nn.Module):
    """DDP syncs gradients only for work done inside its forward(): route model.loss(batch) through it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.loss(batch)


def wrap_for_training(model: nn.Module, dist: DistInfo, find_unused: bool) -> nn.Module:
    """(Re-)build the DDP wrapper over the parameters that require grad NOW."""
    net = LossOf(model)
    if not dist.distributed:
        return net
    trainable = "\n".join(n for n, p in model.named_parameters() if p.requires_grad)
    digests = gather([hashlib.sha1(trainable.encode()).hexdigest()[:12]], dist)
    if len(set(digests)) > 1:
        raise RuntimeError(
            f"ranks disagree on the trainable parameters (per-rank digests {digests}); "
            "the schedule must depend only on (epoch, step)"
        )
    return DDP(
        net,
        device_ids=[dist.local_rank] if dist.device.type == "cuda" else None,
        forward_sync_buffers=False,
        find_unused_parameters=find_unused,
    )


def forward_backward(
    net: nn.Module, batches, accum: int, amp_dtype, scaler, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """accum micro-batches into .grad (DDP all-reduces on the last one only). Returns (sum of the
    finite micro-batch losses, number of non-finite ones) as tensors, so nothing syncs here."""
    loss_sum = torch.zeros((), device=device)
    n_bad = torch.zeros((), device=device)
    for i in range(accum):
        batch = to_device(next(batches), device)
        last = i == accum - 1
        with nullcontext() if last or not isinstance(net, DDP) else net.no_sync():
            with autocast(device, amp_dtype):
                loss = net(batch).float()
            scaled = loss / accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        finite = torch.isfinite(loss.detach())
        loss_sum += torch.where(finite, loss.detach(), 0.0)
        n_bad += (~finite).float()
    return loss_sum, n_bad


def optimizer_step(
    model, optimizer, lr_sched, scaler, clip: float, n_bad: torch.Tensor, dist: DistInfo
) -> tuple[bool, bool, float, float]:
    """Clip + step + zero_grad(set_to_none) + scheduler step. A non-finite loss on any rank, or a
    non-finite gradient norm, skips the update (all ranks agree: gradients are all-reduced).
    Returns (updated, amp_skipped, lr used, gradient norm before clipping)."""
    if dist.distributed:
        tdist.all_reduce(n_bad)
    if scaler is not None:
        scaler.unscale_(optimizer)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if clip > 0:
        torch.nn.utils.clip_grads_with_norm_([p for p in model.parameters() if p.grad is not None], clip, norm)
    grad_norm = norm.item()
    # fp16: an overflow (inf gradient, finite loss) is the GradScaler's business: it skips and lowers the scale.
    ok = n_bad.item() == 0 and (scaler is not None or math.isfinite(grad_norm))
    lr = max(g["lr"] for g in optimizer.param_groups)
    amp_skipped = False
    if scaler is not None:
        scale = scaler.get_scale()
        if ok:
            scaler.step(optimizer)  # skips by itself on inf/nan gradients
        scaler.update()
        amp_skipped = ok and scaler.get_scale() < scale
    elif ok:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # Skipped steps still advance the LR schedule: it stays tied to the data seen (paper silent).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before")  # first step skipped
        lr_sched.step()
    return ok, amp_skipped, lr, grad_norm


def require_finite(t: torch.Tensor, what: str) -> torch.Tensor:
    """t, or FloatingPointError when it holds NaN/inf: at evaluation a NaN logit must not become an accuracy
    (argmax of NaN is an arbitrary class). Rows = examples."""
    bad = ~torch.isfinite(t)
    if bad.any():
        rows = bad.reshape(bad.shape[0], -1).any(1) if t.dim() else bad.reshape(1)
        raise FloatingPointError(
            f"non-finite {what} (NaN or inf) for {int(rows.sum())} of {rows.numel()} examples of a batch"
        )
    return t


def mean_loss(loss_sum: torch.Tensor, n: torch.Tensor, dist: DistInfo) -> float | None:
    total = torch.stack([loss_sum, n]).double()
    if dist.distributed:
        tdist.all_reduce(total)
    return (total[0] / total[1]).item() if total[1] > 0 else None


def train(
    args: argparse.Namespace,
    model: nn.Module,
    layout: freeze.LayerLayout,
    schedule: freeze.Schedule,
    train_loader: DataLoader,
    evaluate_fn: Callable | None,
    meta: dict,
    dist: DistInfo,
    *,
    module_lr: dict[str, float] | None = None,
    on_step: Callable[[nn.Module, int], None] | None = None,
    no_decay: Callable[[str, nn.Parameter], bool] | None = None,
    lr_mult: Callable[[str], float] | None = None,
    on_evaluated: Callable | None = None,
    run_dir: Path | None = None,
) -> None:
    """The epoch loop (see module docstring). evaluate_fn(model, epoch 1-based) -> {lang: {metric: value}}
    is called on every rank after every epoch; on_step(model, steps_done) after every optimizer step;
    no_decay(name, param): the recipe's weight-decay exemption rule (default: freeze.no_decay_ndim);
    lr_mult(name): per-parameter LR factor (default 1; see freeze.param_groups); on_evaluated(model, epoch
    0-based, results, dist) on every rank after each evaluation (eval_zeroshot fewshot keeps the best epoch
    with it); run_dir: what the caller's check_run_dir returned (the trainers check before building
    anything), None: checked here."""
    run_dir = check_run_dir(args, dist) if run_dir is None else run_dir
    try:
        _, accum = micro_and_accum(args, dist)
        steps_per_epoch = len(train_loader) // accum
        if steps_per_epoch == 0:
            raise SystemExit(f"error: the training set gives no full global batch of {args.batch_size} examples")
        if args.max_steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, args.max_steps_per_epoch)
        if getattr(args, "print_schedule", False):  # the trainers print it before building anything
            raise ValueError("engine.train with --print-schedule: call engine.print_schedule_only instead")

        model.to(dist.device)
        # The LR schedule spans --schedule-epochs (default --epochs); IGLUE's longer one stops before reaching 0.
        schedule_epochs = getattr(args, "schedule_epochs", None) or args.epochs
        optimizer, lr_sched = build_optimizer(
            model,
            layout,
            schedule,
            args,
            module_lr,
            no_decay=no_decay,
            lr_mult=lr_mult,
            total_steps=schedule_epochs * steps_per_epoch,
        )
        amp_dtype, scaler = setup_amp(args.amp, dist.device)
        log = MetricsLog(run_dir / METRICS, dist.is_main)
        _fault_counts.clear()
        if resuming(args, run_dir):
            prog = resume(run_dir / CHECKPOINT, model, optimizer, lr_sched, scaler, args, dist, log, meta)
            if prog.epoch >= args.epochs and (run_dir / FINAL).exists():  # finished: keep every file as it is
                if dist.is_main:
                    print(f"nothing to do: {run_dir} finished its {args.epochs} epochs ({run_dir / FINAL})", flush=True)
                return
            log.truncate(prog.metrics_offset)  # what a killed run logged after its checkpoint
            if prog.eval_pending:  # stopped between the checkpoint and the end of its evaluation
                run_evaluation(
                    evaluate_fn,
                    model,
                    prog.epoch - 1,
                    prog.step,
                    args,
                    log,
                    run_dir,
                    dist,
                    amp_dtype,
                    resumed=True,
                    on_evaluated=on_evaluated,
                )
        else:
            prog = start_fresh(run_dir, args, dist, log)
        train_epochs(
            args,
            model,
            layout,
            schedule,
            train_loader,
            evaluate_fn,
            meta,
            dist,
            optimizer,
            lr_sched,
            (amp_dtype, scaler),
            steps_per_epoch,
            accum,
            log,
            prog,
            run_dir,
            on_step,
            on_evaluated,
        )
        check_made_progress(prog, run_dir)  # on every rank: the counters are the same everywhere
        if dist.is_main:
            final = {"model": model.state_dict(), "meta": run_meta(meta, schedule, prog, args)}
            save_checkpoint(run_dir / FINAL, final)
            print(f"done: {run_dir / FINAL}", flush=True)
        barrier(dist)
    except CheckpointWriteError as e:  # disk full, ...: the previous checkpoint is intact
        raise SystemExit(f"error: {e}") from None
    finally:
        release_run_dirs(run_dir)


def train_epochs(
    args,
    model,
    layout,
    schedule,
    train_loader,
    evaluate_fn,
    meta,
    dist: DistInfo,
    optimizer,
    lr_sched,
    amp: tuple,
    steps_per_epoch: int,
    accum: int,
    log: MetricsLog,
    prog: Progress,
    run_dir: Path,
    on_step,
    on_evaluated=None,
) -> None:
    """Epochs prog.epoch .. args.epochs - 1: train, checkpoint, then evaluate (a crash in the evaluation loses
    no training: --resume re-runs it)."""
    amp_dtype, scaler = amp
    net, applied = None, None
    for epoch in range(prog.epoch, args.epochs):
        set_epoch(train_loader, epoch)
        model.train()
        batches = DataWait(iter(train_loader))
        loss_sum, n_finite = (
            torch.zeros((), device=dist.device),
            torch.zeros((), device=dist.device),
        )  # since last record
        bar = tqdm(
            total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not dist.is_main, dynamic_ncols=True
        )
        for i in range(steps_per_epoch):
            step_start = time.perf_counter()
            # requires_grad is set once per stage (the trainable layers fully determine it): --unfreeze-unit
            # epoch and step alike; a resumed run applies its stage on its first step.
            stage = tuple(schedule.trainable_layers(epoch, prog.step))
            changed = False
            if stage != applied:
                changed = freeze.apply_schedule(model, layout, schedule, epoch, prog.step)
                if dist.is_main and (changed or applied is None):
                    tqdm.write(trainable_line(model, layout, schedule, epoch, prog.step, steps_per_epoch))
                applied = stage
            if changed or net is None:
                net = None  # frees the old DDP (refcount) and its reducer's autograd hooks before a new one registers
                net = wrap_for_training(model, dist, args.ddp_find_unused)
                if changed:
                    fault_point("unfreeze")
            try:
                step_loss, n_bad = forward_backward(net, batches, accum, amp_dtype, scaler, dist.device)
            except data.BadInput as e:
                raise SystemExit(f"error: training data: {e}; {_last_checkpoint(prog, run_dir)}") from None
            loss_sum += step_loss
            n_finite += accum - n_bad  # before optimizer_step sums n_bad over ranks
            ok, amp_skipped, lr, grad_norm = optimizer_step(
                model, optimizer, lr_sched, scaler, args.clip_grad, n_bad, dist
            )
            count_step(prog, ok, amp_skipped, epoch, args, run_dir, dist)  # stops after too many non-finite in a row
            if on_step is not None:
                on_step(model, prog.step)
            fault_point("step")
            bar.update(1)
            batches.end_step(step_start)
            if (args.log_every and prog.step % args.log_every == 0) or i == steps_per_epoch - 1:
                loss = mean_loss(loss_sum, n_finite, dist)
                log.write({**train_record(epoch, prog, loss, lr, grad_norm, model, schedule), **batches.record()})
                bar.set_postfix(
                    loss=f"{loss:.4f}" if loss is not None else "nan",
                    lr=f"{lr:.2e}",
                    data_wait=f"{batches.last_fraction:.0%}",
                )
                loss_sum.zero_(), n_finite.zero_()
        bar.close()
        del batches

        prog.epoch = epoch + 1
        prog.metrics_offset = log.size()
        prog.eval_pending = evaluate_fn is not None and evaluation_due(args, epoch)
        save_training_state(run_dir / CHECKPOINT, model, optimizer, lr_sched, scaler, prog, args, meta, schedule, dist)
        if prog.eval_pending:
            run_evaluation(
                evaluate_fn, model, epoch, prog.step, args, log, run_dir, dist, amp_dtype, on_evaluated=on_evaluated
            )
        fault_point("epoch_end")


def run_evaluation(
    evaluate_fn: Callable | None,
    model: nn.Module,
    epoch: int,
    step: int,
    args,
    log: MetricsLog,
    run_dir: Path,
    dist: DistInfo,
    amp_dtype: torch.dtype | None,
    resumed: bool = False,
    on_evaluated: Callable | None = None,
) -> None:
    """Epoch `epoch` (0-based)'s evaluation (under the run's AMP dtype unless --eval-fp32; --eval-langs before
    the last epoch), logged; its checkpoint is already written. Bad evaluation data
    or a non-finite model output is a one-line error (the checkpoint stays; --resume re-runs it)."""
    if evaluate_fn is None:
        if resumed and dist.is_main:
            print(
                f"warning: epoch {epoch + 1}'s evaluation was not run (the run stopped before it; resumed with "
                "--no-eval)",
                file=sys.stderr,
                flush=True,
            )
        return
    if resumed and dist.is_main:
        print(f"re-running epoch {epoch + 1}'s evaluation (the run stopped after the epoch's checkpoint)", flush=True)
    fault_point("evaluate")
    try:
        eval_dtype = None if getattr(args, "eval_fp32", False) else amp_dtype
        results = evaluate(evaluate_fn, model, epoch, amp_dtype=eval_dtype, langs=epoch_eval_langs(args, epoch))
    except (data.BadInput, FloatingPointError) as e:
        raise SystemExit(
            f"error: evaluation after epoch {epoch + 1}: {e}; the epoch's checkpoint "
            f"{run_dir / CHECKPOINT} is kept: fix it and --resume (the evaluation is run again)"
        ) from None
    if on_evaluated is not None:
        on_evaluated(model, epoch, results, dist)
    log_eval(log, results, epoch, step, args.eval_split, dist)


def _last_checkpoint(prog: Progress, run_dir: Path) -> str:
    return (
        f"last good checkpoint: {run_dir / CHECKPOINT} (after epoch {prog.epoch})"
        if prog.epoch
        else "last good checkpoint: none (no epoch completed)"
    )


def check_made_progress(prog: Progress, run_dir: Path) -> None:
    """A run none of whose optimizer steps updated the weights ends with an error and no model_final.pt."""
    updates = prog.step - prog.nonfinite_steps - prog.amp_skipped_steps
    if updates <= 0:
        raise SystemExit(
            f"error: the run made no finite optimizer step ({prog.step} steps: {prog.nonfinite_steps} "
            f"non-finite, {prog.amp_skipped_steps} skipped by the fp16 scaler); {FINAL} not written "
            f"(its weights would be the initial ones); check the data, --lr and --amp"
        )


def count_step(prog: Progress, ok: bool, amp_skipped: bool, epoch: int, args, run_dir: Path, dist: DistInfo) -> None:
    prog.step += 1
    prog.amp_skipped_steps += amp_skipped
    if ok:
        prog.nonfinite_in_a_row = 0
        return
    prog.nonfinite_steps += 1
    prog.nonfinite_in_a_row += 1
    if dist.is_main:
        print(
            f"warning: non-finite loss or gradient at epoch {epoch + 1}, step {prog.step}: update skipped "
            f"({prog.nonfinite_in_a_row} in a row, {prog.nonfinite_steps} in total)",
            file=sys.stderr,
            flush=True,
        )
    if prog.nonfinite_in_a_row >= args.max_nonfinite:
        raise SystemExit(
            f"error: stopping: {prog.nonfinite_in_a_row} non-finite losses in a row at epoch {epoch + 1}, "
            f"step {prog.step} (--max-nonfinite {args.max_nonfinite}); {_last_checkpoint(prog, run_dir)}"
        )


def train_record(
    epoch: int,
    prog: Progress,
    loss: float | None,
    lr: float,
    grad_norm: float,
    model: nn.Module,
    schedule: freeze.Schedule,
) -> dict:
    last = prog.step - 1  # the step just taken
    return {
        "type": "train",
        "epoch": epoch + 1,
        "step": prog.step,
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
        "stage": schedule.stage(epoch, last),
        "trainable_layers": schedule.trainable_layers(epoch, last),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "nonfinite_steps": prog.nonfinite_steps,
        "amp_skipped_steps": prog.amp_skipped_steps,
    }


def evaluation_due(args, epoch: int) -> bool:
    """After the last epoch always; before it every --eval-every epochs (0: never)."""
    every = getattr(args, "eval_every", 1)
    return epoch == args.epochs - 1 or (every > 0 and (epoch + 1) % every == 0)


def epoch_eval_langs(args, epoch: int) -> list[str] | None:
    """--eval-langs for the per-epoch evaluations; None (every language) for the last epoch's."""
    return None if epoch == args.epochs - 1 else getattr(args, "eval_langs", None)


def evaluate(
    evaluate_fn: Callable,
    model: nn.Module,
    epoch: int,
    amp_dtype: torch.dtype | None = None,
    langs: list[str] | None = None,
) -> dict:
    """evaluate_fn runs on every rank (it shards with shard/gather itself), in eval mode, no grad, under the
    run's autocast dtype (--amp; the difference to float32 is measured in bench/eval_precision.py). langs,
    when given, is passed on as evaluate_fn(model, epoch, langs=langs)."""
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with torch.no_grad(), autocast(device, amp_dtype):
        results = evaluate_fn(model, epoch + 1, langs=langs) if langs else evaluate_fn(model, epoch + 1)
    model.train()
    return results or {}


def log_eval(log: MetricsLog, results: dict, epoch: int, step: int, split: str, dist: DistInfo) -> None:
    for lang, metrics in results.items():
        log.write({"type": "eval", "epoch": epoch + 1, "step": step, "lang": lang, "split": split, **metrics})
    if dist.is_main and results:
        print(epoch_line(results, epoch, split), flush=True)


# The console's per-epoch metric(s) of a task; everything else is in metrics.jsonl.
CONSOLE_METRICS = (("accuracy",), ("ir_r1", "tr_r1"))


def epoch_line(results: dict, epoch: int, split: str) -> str:
    """ "epoch 2 test accuracy: en 55.19 de 30.12 ..." (the task's metric per language)."""
    first = next(iter(results.values()))
    names = next((m for m in CONSOLE_METRICS if all(k in first for k in m)), None)
    if names is None:  # an unknown task: its first float metric
        names = tuple(k for k, v in first.items() if isinstance(v, float))[:1]
    parts = [
        f"{name}: " + " ".join(f"{lang} {m.get(name, float('nan')):.2f}" for lang, m in results.items())
        for name in names
    ]
    return f"epoch {epoch + 1} {split} " + "; ".join(parts)


def trainable_line(
    model: nn.Module, layout: freeze.LayerLayout, schedule: freeze.Schedule, epoch: int, step: int, steps_per_epoch: int
) -> str:
    """ "epoch 2: layers 6-11 + embeddings, head train; 97.3M trainable" (printed when the trainable set changes)."""
    where = f"epoch {epoch + 1}" + (f", step {step}" if step % steps_per_epoch else "")
    return f"{where}: {freeze.trainable_summary(model, layout, schedule, epoch, step)}"


class DataWait:
    """The training batches' iterator, timing how long the loop waits for each batch. record() -> the
    fraction of step time since the last record spent waiting (data_wait_frac; near 0: the loader keeps up)."""

    KEYS = ("data_wait_frac", "step_s")

    def __init__(self, batches):
        self.batches, self.wait_time, self.step_time, self.steps, self.last_fraction = batches, 0.0, 0.0, 0, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.batches)
        finally:
            self.wait_time += time.perf_counter() - start

    def end_step(self, started: float) -> None:
        self.step_time += time.perf_counter() - started
        self.steps += 1

    def record(self) -> dict:
        steps = max(self.steps, 1)
        self.last_fraction = self.wait_time / self.step_time if self.step_time > 0 else 0.0
        out = {"data_wait_frac": round(self.last_fraction, 4), "step_s": round(self.step_time / steps, 6)}
        self.wait_time = self.step_time = 0.0
        self.steps = 0
        return out


def run_meta(meta: dict, schedule: freeze.Schedule, prog: Progress, args) -> dict:
    return {
        **meta,
        "policy": schedule.policy,
        "schedule": schedule.to_dict(),
        "epoch": prog.epoch,
        "step": prog.step,
        "stage": schedule.stage(max(prog.epoch - 1, 0), max(prog.step - 1, 0)),
        "task": meta.get("task", args.task),
        "langs": meta.get("langs", args.langs),
    }


def save_training_state(
    path: Path,
    model,
    optimizer,
    lr_sched,
    scaler,
    prog: Progress,
    args,
    meta: dict,
    schedule: freeze.Schedule,
    dist: DistInfo,
) -> None:
    rngs = gather([rng_state(dist.device)], dist)  # every rank's, so a resumed rank continues its own stream
    if dist.is_main:
        save_checkpoint(
            path,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": lr_sched.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rngs,
                "progress": asdict(prog),
                "args": json_safe(vars(args)),
                "meta": run_meta(meta, schedule, prog, args),
            },
        )
    barrier(dist)


def json_safe(obj):
    return json.loads(json.dumps(obj, default=str))


def start_fresh(run_dir: Path, args, dist: DistInfo, log: MetricsLog) -> Progress:
    seed_everything(args.seed + dist.rank)  # dropout etc.; per rank, as is usual
    if dist.is_main:
        log.truncate(0)  # --resume of a run killed before its first checkpoint
        (run_dir / ARGS).write_text(json.dumps(json_safe(vars(args)), indent=1) + "\n")
    barrier(dist)
    return Progress()


def resume(
    path: Path, model, optimizer, lr_sched, scaler, args, dist: DistInfo, log: MetricsLog, meta: dict | None = None
) -> Progress:
    try:
        ckpt = load_checkpoint(path)
    except ValueError as e:
        raise SystemExit(f"error: --resume: {e}") from None
    check_resume_args(args, ckpt["args"], RESUME_KEYS, path)
    was, now = (ckpt.get("meta") or {}).get("tokenizer_vocab"), (meta or {}).get("tokenizer_vocab")
    if was is not None and now is not None and was != now:  # the path may differ (moved folder); the vocabulary not
        raise SystemExit(
            f"error: --resume: --tokenizer {getattr(args, 'tokenizer', None)} is not the tokenizer the run "
            f"in {path} was trained with (vocabulary fingerprint {now} vs {was}); resume with that tokenizer"
        )
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # torch lists every key over many lines: name the first, keep it one line
        detail = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise SystemExit(
            f"error: --resume: {path} does not fit this model ({detail}); resume with the run's own model settings"
        ) from None
    optimizer.load_state_dict(ckpt["optimizer"])
    lr_sched.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt["scaler"] is not None:
        scaler.load_state_dict(ckpt["scaler"])
    prog = Progress(**ckpt["progress"])
    if len(ckpt["rng"]) == dist.world:
        set_rng_state(ckpt["rng"][dist.rank], dist.device)
    else:
        seed_everything(args.seed + dist.rank + 1000 * prog.epoch)
        if dist.is_main:
            print(
                f"warning: --resume with {dist.world} processes, the run used {len(ckpt['rng'])}: "
                "random streams re-seeded (not bitwise equal to an uninterrupted run)",
                file=sys.stderr,
            )
    if dist.is_main:
        print(f"resumed {path} after epoch {prog.epoch} (step {prog.step})", flush=True)
    return prog


def print_schedule(model, layout, schedule, args, steps_per_epoch: int | None = None) -> None:
    rows = freeze.describe_schedule(model, layout, schedule, args.epochs, steps_per_epoch)
    print(json.dumps(rows, indent=1) if args.json else freeze.format_schedule(rows), flush=True)


def print_schedule_only(
    build_model: Callable[[str, dict], nn.Module],
    config: dict,
    layout: freeze.LayerLayout,
    schedule: freeze.Schedule,
    args: argparse.Namespace,
    count_train: Callable[[], int],
    data_hint: str = "--data-root",
) -> None:
    """The trainers' --print-schedule: no weights, the model built on the meta device (instant even for
    base). Only a step-unit SUF schedule needs the data: count_train() = training examples."""
    steps = None
    if schedule.policy == "suf" and schedule.unfreeze_unit == "step":
        if not args.data_root:
            raise SystemExit(f"error: --print-schedule with --unfreeze-unit step needs {data_hint} (steps per epoch)")
        steps = count_train() // args.batch_size
        steps = min(steps, args.max_steps_per_epoch) if args.max_steps_per_epoch else steps
    with torch.device("meta"):
        model = build_model(args.task, config)
    print_schedule(model, layout, schedule, args, steps)


def base_meta(model_name: str, args: argparse.Namespace, config: dict, tokenizer) -> dict:
    """Checkpoint meta both trainers record (engine.train adds policy/schedule/epoch/...). tokenizer_size and
    tokenizer_vocab (fingerprint): the vocabulary the weights are trained with, checked on --resume and when
    the checkpoint is loaded again."""
    return {
        "model": model_name,
        "task": args.task,
        "config": config,
        "tokenizer": args.tokenizer,
        "tokenizer_size": len(tokenizer),
        "tokenizer_vocab": tokenizer_fingerprint(tokenizer),
        "checkpoint": args.checkpoint,
        "recipe": args.recipe,
        "langs": args.langs,
    }


# ---------------------------------------------------------------------------------------------- evaluation
# The per-epoch evaluation the trainers run (trainer_evaluate_fn -> evaluate_task) and its metrics; eval_zeroshot.py
# runs the same functions from its command line. Each rank runs its shard of every test set, gather assembles.
# A model answers through its own methods: predict(batch) (xgqa, xvnli), retrieval_scores(...) (xflickrco).

QTYPES = ("verify", "query", "choose", "logical", "compare")  # GQA structural types
RECALL_KS = (1, 5, 10)


# ---------------------------------------------------------------------------------------------
# Metrics (pure)


def classification_metrics(
    preds: Sequence[int], labels: Sequence[int], qtypes: Sequence[str] | None = None
) -> dict[str, float]:
    """Accuracy in percent = 100 * n_correct / n. A label < 0 (xGQA answer outside the 1,842-answer
    vocabulary, XVNLI gold "-" in UC2's data; CCLM's loader drops those pairs as X2-VLM does) can
    never be predicted and counts as wrong, as in IGLUE's string-match evaluation.
    XVNLI: X2-VLM's XVNLI.py prints n_correct / (n + 1) (its SmoothedValue starts with a dummy 0
    update; 1 of 3 correct prints 0.25); we report the correct n_correct / n.
    With qtypes (xGQA): accuracy_<type> and n_<type> per structural type, so that
    sum(n_t * accuracy_t) / n == accuracy exactly (same counts)."""
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels")
    n = len(labels)
    correct = [int(p) == int(l) and int(l) >= 0 for p, l in zip(preds, labels)]
    out = {"accuracy": 100.0 * sum(correct) / n if n else float("nan"), "n": n}
    if qtypes is not None:
        for t in QTYPES:
            idx = [i for i, q in enumerate(qtypes) if q == t]
            out[f"n_{t}"] = len(idx)
            out[f"accuracy_{t}"] = 100.0 * sum(correct[i] for i in idx) / len(idx) if idx else float("nan")
        other = [i for i, q in enumerate(qtypes) if q not in QTYPES]
        if other:  # keeps the per-type counts adding up to n even for unexpected type strings
            out["n_other"] = len(other)
            out["accuracy_other"] = 100.0 * sum(correct[i] for i in other) / len(other)
    return out


# Retrieval ranks. Both references rank the gold at its position in a numpy argsort with the default kind:
# VOLTA/IGLUE's eval_retrieval.py in np.argsort(-s) (s: float64 copy of the float32 logits), X2-VLM's itm_eval in
# np.argsort(s)[::-1] (float32). Among exactly equal scores (duplicate captions tie for a model that scores text)
# that order decides the rank, and the two orders differ. The references ran numpy's portable introsort (numpy
# < 1.25 had no other); numpy >= 1.25 sends float argsort to AVX-512 / AVX2 kernels whose order among equal values
# depends on the CPU, so np.argsort today would not give one answer on every machine. numpy_argsort below is the
# portable introsort's order, step for step (numpy's npysort/quicksort aquicksort_ and aheapsort_, BSD licence;
# written here), tested against np.argsort with numpy's SIMD dispatch switched off.
TIE_ORDERS = ("volta", "x2vlm")
SMALL_SORT = 15  # numpy: partitions spanning at most 16 elements are insertion-sorted


def _less(a: float, b: float) -> bool:
    return a < b or (b != b and a == a)  # numpy's float order: NaN after every number


def numpy_argsort(values: Sequence[float]) -> list[int]:
    """np.argsort(values) (default kind) in the order of numpy's portable introsort: median-of-3 quicksort,
    insertion sort for partitions of at most 16 elements, heapsort for a partition popped below depth
    2 * floor(log2 n). Equal to np.argsort on every CPU where numpy has no SIMD argsort (and always before 1.25)."""
    v = [float(x) for x in values]
    a = list(range(len(v)))
    if len(a) < 2:
        return a
    stack: list[tuple[int, int, int]] = []
    pl, pr, depth = 0, len(a) - 1, 2 * (len(a).bit_length() - 1)
    while True:
        if depth < 0:
            _heapsort(v, a, pl, pr)
        else:
            while pr - pl > SMALL_SORT:
                pi = _partition(v, a, pl, pr)
                depth -= 1
                if pi - pl < pr - pi:  # the larger side waits on the stack, with the depth reached so far
                    stack.append((pi + 1, pr, depth))
                    pr = pi - 1
                else:
                    stack.append((pl, pi - 1, depth))
                    pl = pi + 1
            _insertion_sort(v, a, pl, pr)
        if not stack:
            return a
        pl, pr, depth = stack.pop()


def _partition(v, a, pl, pr):
    pm = pl + ((pr - pl) >> 1)
    if _less(v[a[pm]], v[a[pl]]):
        a[pm], a[pl] = a[pl], a[pm]
    if _less(v[a[pr]], v[a[pm]]):
        a[pr], a[pm] = a[pm], a[pr]
    if _less(v[a[pm]], v[a[pl]]):
        a[pm], a[pl] = a[pl], a[pm]
    vp = v[a[pm]]
    pi, pj = pl, pr - 1
    a[pm], a[pj] = a[pj], a[pm]
    while True:
        pi += 1
        while _less(v[a[pi]], vp):
            pi += 1
        pj -= 1
        while _less(vp, v[a[pj]]):
            pj -= 1
        if pi >= pj:
            break
        a[pi], a[pj] = a[pj], a[pi]
    a[pi], a[pr - 1] = a[pr - 1], a[pi]
    return pi


def _insertion_sort(v, a, pl, pr):
    for pi in range(pl + 1, pr + 1):
        vi = a[pi]
        vp = v[vi]
        pj = pi
        while pj > pl and _less(vp, v[a[pj - 1]]):
            a[pj] = a[pj - 1]
            pj -= 1
        a[pj] = vi


def _heapsort(v, a, pl, pr):
    n = pr - pl + 1
    base = pl - 1  # 1-based heap positions: a[base + 1] .. a[base + n]

    def sift(tmp, i, n):
        j = 2 * i
        while j <= n:
            if j < n and _less(v[a[base + j]], v[a[base + j + 1]]):
                j += 1
            if _less(v[tmp], v[a[base + j]]):
                a[base + i] = a[base + j]
                i, j = j, 2 * j
            else:
                break
        a[base + i] = tmp

    for l in range(n >> 1, 0, -1):
        sift(a[base + l], l, n)
    while n > 1:
        tmp = a[base + n]
        a[base + n] = a[base + 1]
        n -= 1
        sift(tmp, 1, n)


def reference_order(row: np.ndarray, order: str) -> list[int]:
    """Candidates of one score row, best first, in the reference's order (see TIE_ORDERS)."""
    if order == "volta":
        return numpy_argsort(-row)  # eval_retrieval.py: np.argsort(-score_matrix[i])
    if order == "x2vlm":
        return numpy_argsort(row)[::-1]  # itm_eval: np.argsort(score)[::-1]
    raise ValueError(f"unknown tie order {order!r}; expected one of {TIE_ORDERS}")


def _gold_ranks(
    scores: np.ndarray, rows: np.ndarray, golds: np.ndarray, unscored: float | None, order: str
) -> np.ndarray:
    """0-based position of candidate golds[i] in row rows[i] of `scores`, in the reference's order. A gold that
    ties with no other candidate ranks after the strictly higher ones in any order (no sort needed); a tied one
    (or a row with NaN) takes its position in reference_order. `unscored` (CCLM: UNSCORED, entries outside the
    top-k prefilter): such a gold ranks behind all its ties (never scored; X2-VLM would place it anywhere
    among them: only with k_test < 10, not a reference setting, can that change R@1/5/10)."""
    vals = scores[rows]
    gold = vals[np.arange(len(rows)), golds][:, None]
    ranks = (vals > gold).sum(1)
    positions: dict[int, np.ndarray] = {}
    for i in np.flatnonzero(((vals == gold).sum(1) > 1) | np.isnan(vals).any(1)):
        r = int(rows[i])
        if r not in positions:
            positions[r] = np.argsort(np.asarray(reference_order(scores[r], order)), kind="stable")
        ranks[i] = positions[r][golds[i]]
    if unscored is not None:
        out = gold[:, 0] == unscored
        ranks[out] = (vals[out] >= gold[out]).sum(1) - 1
    return ranks


def retrieval_ranks(
    score_i2t: torch.Tensor,
    score_t2i: torch.Tensor,
    txt2img: Sequence[int],
    unscored: float | None = None,
    ties: str = "volta",
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks as VOLTA's eval_retrieval.py (ties="volta", UC2) / X2-VLM's itm_eval (ties="x2vlm", CCLM)
    compute them. score_i2t [n_img, n_txt], score_t2i [n_txt, n_img] (UC2: both views of one caption x image
    matrix). Text retrieval (image -> captions): rank of the best-ranked caption of each image. Image retrieval
    (caption -> images): rank of the caption's image. Exactly tied scores are ordered as the reference's argsort
    orders them (see TIE_ORDERS); `unscored`: see _gold_ranks."""
    if ties not in TIE_ORDERS:
        raise ValueError(f"unknown tie order {ties!r}; expected one of {TIE_ORDERS}")
    txt2img = np.asarray(list(txt2img), dtype=np.int64)
    n_img, n_txt = score_i2t.shape
    if score_t2i.shape != (n_txt, n_img) or txt2img.size != n_txt:
        raise ValueError(
            f"score shapes {tuple(score_i2t.shape)} / {tuple(score_t2i.shape)} do not fit {txt2img.size} captions"
        )
    captions = np.arange(n_txt)
    ir_ranks = _gold_ranks(score_t2i.double().numpy(), captions, txt2img, unscored, ties)
    caption_ranks = _gold_ranks(score_i2t.double().numpy(), txt2img, captions, unscored, ties)  # within its image's row
    tr_ranks = np.full(n_img, n_txt, dtype=np.int64)
    np.minimum.at(tr_ranks, txt2img, caption_ranks)
    if (tr_ranks == n_txt).any():
        raise ValueError(f"{int((tr_ranks == n_txt).sum())} images have no caption")
    return torch.from_numpy(tr_ranks), torch.from_numpy(ir_ranks.astype(np.int64))


def recall_metrics(
    score_i2t: torch.Tensor,
    score_t2i: torch.Tensor,
    txt2img: Sequence[int],
    unscored: float | None = None,
    ties: str = "volta",
) -> dict[str, float]:
    """tr_r1/5/10, ir_r1/5/10 (percent), medr/meanr as VOLTA prints them (floor(median)+1, mean+1)."""
    for scores in (score_i2t, score_t2i):
        if torch.isnan(scores).any() or torch.isposinf(scores).any():  # would rank arbitrarily, not fail
            bad = int((~torch.isfinite(scores)).sum())
            raise FloatingPointError(
                f"non-finite retrieval scores (NaN or inf) in {bad} of {scores.numel()} caption-image pairs"
            )
    tr, ir = retrieval_ranks(score_i2t, score_t2i, txt2img, unscored, ties)
    out: dict[str, float] = {}
    for name, ranks in (("tr", tr), ("ir", ir)):
        for k in RECALL_KS:
            out[f"{name}_r{k}"] = 100.0 * (ranks < k).double().mean().item()
        out[f"{name}_medr"] = math.floor(ranks.double().quantile(0.5).item()) + 1.0  # = numpy median
        out[f"{name}_meanr"] = ranks.double().mean().item() + 1.0
    out["n_images"], out["n_captions"] = score_i2t.shape
    out["ties"] = ties
    return out


# ---------------------------------------------------------------------------------------------
# Running a model over examples (distributed: each rank its shard, gather after)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The task model behind a DDP (or similar) wrapper: predict/retrieval_scores live there."""
    return getattr(model, "module", model)


AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_for(device: torch.device | str, amp: str = "off"):
    """Evaluation precision: float32 unless asked (--amp bf16|fp16; our choice: exact numbers by default)."""
    return autocast(torch.device(device), AMP_DTYPES[amp])


def pad_cat(tensors: Sequence[torch.Tensor], value: float = 0) -> torch.Tensor:
    """Concatenate along dim 0, right-padding dim 1 to the longest (text lengths differ by batch/rank)."""
    if tensors and tensors[0].dim() >= 2:
        width = max(t.shape[1] for t in tensors)
        tensors = [F.pad(t, [0, 0] * (t.dim() - 2) + [0, width - t.shape[1]], value=value) for t in tensors]
    return torch.cat(list(tensors), 0)


@torch.no_grad()
def predict_records(model: torch.nn.Module, batches: Iterable[dict], device, amp: str = "off") -> list[tuple]:
    """(id, predicted index, gold label, question type or "") for every example in `batches`."""
    records = []
    for batch in batches:
        with autocast_for(device, amp):
            pred = model.predict(to_device(batch, device)).cpu().tolist()
        labels = batch["label"].tolist()
        qtypes = batch.get("qtype") or [""] * len(labels)
        records += [(str(i), int(p), int(l), str(q)) for i, p, l, q in zip(batch["id"], pred, labels, qtypes)]
    return records


# ---------------------------------------------------------------------------------------------
# Results files, printed tables


def ordered_langs(langs: Iterable[str]) -> list[str]:
    """English first, then the target languages alphabetically (IGLUE's results/ column order)."""
    langs = set(langs)
    return (["en"] if "en" in langs else []) + sorted(langs - {"en"})


# ---------------------------------------------------------------------------------------------
# Evaluation sets (data.py) and evaluate_task (the trainers' per-epoch evaluate_fn)


@dataclass
class EvalSet:
    """One language's test data: `dataset` (xgqa/xvnli) or `images` + `captions` (xflickrco)."""

    lang: str
    split: str
    translate_test: bool
    collate: Callable
    dataset: Any = None
    images: Any = None
    captions: Any = None
    source: str = ""
    examples: Sequence = ()  # the annotations read (data.check_inputs)


def eval_langs(data_root, task: str, split: str = "test", langs=None, translate_test: bool = False) -> list[str]:
    """Languages of (task, split) found under data_root (`langs` selects). With translate_test the
    English test set is the original one (IGLUE's .mt results keep the English column)."""
    found = set(data.available_langs(data_root, task, split, translate_test))
    if translate_test:
        found = (found - {"en"}) | ({"en"} & set(data.available_langs(data_root, task, split)))
    if not found:
        splits = ", ".join(data.available_splits(data_root, task, translate_test)) or "none"
        raise ValueError(
            f"{task}: no {'translate-test ' if translate_test else ''}{split!r} files under "
            f"{data_root}; splits found: {splits}"
        )
    return ordered_langs(data.select_langs(langs, ordered_langs(found)))


def build_eval_sets(
    model_name: str,
    task: str,
    data_root,
    tokenizer,
    langs=None,
    split: str = "test",
    translate_test: bool = False,
    features=None,
    images=None,
    max_regions: int = 36,
    image_res: int = 384,
) -> dict[str, EvalSet]:
    """{lang: EvalSet} for every language of (task, split) under data_root (or `langs`). features: the
    image-keyed region-feature reader UC2 reads the test images from (a path or train_uc2.FeatureSet)."""
    collate = data.make_collate(model_name, task, tokenizer, train=False)
    sets = {}
    for lang in eval_langs(data_root, task, split, langs, translate_test):
        mt = translate_test and lang != "en"
        examples = data.load_split(data_root, task, split, lang, translate_test=mt)
        source = str(data.split_file(data_root, task, split, lang, translate_test=mt))
        if task == "xflickrco":
            imgs, caps = data.make_retrieval_eval(
                model_name, examples, features=features, images=images, max_regions=max_regions, image_res=image_res
            )
            sets[lang] = EvalSet(lang, split, mt, collate, images=imgs, captions=caps, source=source, examples=examples)
        else:
            ds = data.make_dataset(
                model_name,
                task,
                examples,
                features=features,
                images=images,
                train=False,
                max_regions=max_regions,
                image_res=image_res,
            )
            sets[lang] = EvalSet(lang, split, mt, collate, dataset=ds, source=source, examples=examples)
    return sets


def trainer_evaluate_fn(
    model_name: str,
    args: argparse.Namespace,
    tokenizer,
    dist,
    *,
    features=None,
    images=None,
    max_regions: int = 36,
    image_res: int = 384,
    pair_batch: int = 1024,
) -> Callable:
    """The trainers' per-epoch evaluate_fn(model, epoch) -> {lang: metrics}: evaluate_task on --eval-split of
    --langs, sharded over ranks. Every feature key / image file is checked now (ValueError): a missing
    one stops the run before training, not after its first epoch."""
    sets = build_eval_sets(
        model_name,
        args.task,
        args.data_root,
        tokenizer,
        langs=args.langs,
        split=args.eval_split,
        features=features,
        images=images,
        max_regions=max_regions,
        image_res=image_res,
    )
    for s in sets.values():
        data.check_inputs(s.examples, features=features, images=images)
    # every evaluation image decoded once (languages share them): a corrupt one stops the run now, not after epoch 1
    data.check_inputs([ex for s in sets.values() for ex in s.examples], features=features, images=images, sample=None)
    unknown = [lang for lang in getattr(args, "eval_langs", None) or [] if lang not in sets]
    if unknown:
        raise ValueError(
            f"--eval-langs {' '.join(unknown)}: not among the evaluated languages "
            f"({' '.join(ordered_langs(sets))}; see --langs)"
        )

    def evaluate_fn(model: torch.nn.Module, epoch: int, langs: Sequence[str] | None = None) -> dict:
        return evaluate_task(
            model,
            args.task,
            sets,
            dist,
            batch_size=args.eval_batch_size,
            num_workers=args.num_workers,
            pair_batch=pair_batch,
            langs=langs,
        )

    return evaluate_fn


def eval_loader(dataset, indices, collate, batch_size: int, num_workers: int):
    return data.BatchLoader(
        Subset(dataset, list(indices)),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate,
        num_workers=num_workers,
        persistent_workers=False,
    )


def _progress(batches, desc: str, dist):
    """A progress bar over evaluation batches, on rank 0 only (it goes away when done)."""
    return tqdm(batches, desc=desc, leave=False, dynamic_ncols=True, disable=dist is not None and not dist.is_main)


def model_device(model: torch.nn.Module, dist) -> torch.device:
    if dist is not None:
        return dist.device
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def evaluate_task(
    model: torch.nn.Module,
    task: str,
    sets: dict[str, EvalSet],
    dist=None,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    amp: str = "off",
    k_test: int | None = None,
    pair_batch: int = 1024,
    itm_batch: int = 128,
    langs: Sequence[str] | None = None,
    predictions: dict | None = None,
) -> dict[str, dict]:
    """{lang: metrics} on every rank. Each rank runs its shard of every test set; gather
    assembles the predictions (retrieval: the score matrices), so every example counts exactly once and
    the numbers equal a single-process run. The model is put in eval mode and restored afterwards.
    `predictions` (xgqa/xvnli): filled with {lang: [(example id, predicted label), ...]} in file order."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    device = model_device(model, dist)
    results = {}
    encoded: dict = {}  # retrieval: the model's cache across languages (CCLM: the last language's encoded images)
    try:
        for lang in langs or ordered_langs(sets):
            s = sets[lang]
            if task == "xflickrco":
                opts = RetrievalOptions(amp, pair_batch, k_test, itm_batch)
                results[lang] = _evaluate_retrieval(model, s, dist, device, batch_size, num_workers, opts, encoded)
                continue
            n = len(s.dataset)
            mine = shard(n, dist)
            loader = eval_loader(s.dataset, mine, s.collate, batch_size, num_workers)
            batches = _progress(loader, f"{task} {lang}", dist)
            local = predict_records(model, batches, device, amp)
            records = gather(list(zip(mine, local, strict=True)), dist)
            if sorted(i for i, _ in records) != list(range(n)):  # every example exactly once
                raise RuntimeError(f"{task} {lang}: gathered {len(records)} predictions for {n} examples")
            ids, preds, labels, qtypes = zip(*(r for _, r in sorted(records)))
            results[lang] = classification_metrics(preds, labels, qtypes if task == "xgqa" else None)
            if predictions is not None:
                predictions[lang] = list(zip(ids, preds))
    finally:
        model.train(was_training)
    return results


@dataclass(frozen=True)
class RetrievalOptions:
    """How a model scores a retrieval test set (each model reads the fields its protocol uses):
    amp: evaluation precision; pair_batch: UC2 (caption, image) pairs per forward; k_test: CCLM's ITC
    prefilter size (None: the model config's); itm_batch: CCLM pairs per ITM forward."""

    amp: str = "off"
    pair_batch: int = 1024
    k_test: int | None = None
    itm_batch: int = 128


def _evaluate_retrieval(
    model,
    s: EvalSet,
    dist,
    device,
    batch_size: int,
    num_workers: int,
    opts: RetrievalOptions,
    encoded: dict | None = None,
) -> dict:
    """The model's own retrieval protocol (model.retrieval_scores), then R@K with its reference's tie order
    (model.tie_order) and unscored value (model.unscored)."""
    n_img, n_txt = len(s.images), len(s.captions)

    def batches(dataset, indices, what: str | None):
        loader = eval_loader(dataset, indices, s.collate, batch_size, num_workers)
        return loader if what is None else _progress(loader, f"xflickrco {s.lang} {what}", dist)

    i2t, t2i = model.retrieval_scores(s.images, s.captions, batches, dist, device, opts, encoded)
    if i2t.shape != (n_img, n_txt) or t2i.shape != (n_txt, n_img):
        raise RuntimeError(
            f"xflickrco {s.lang}: gathered {tuple(i2t.shape)} / {tuple(t2i.shape)} score matrices for "
            f"{n_img} images x {n_txt} captions"
        )
    txt2img = [ex.label for ex in s.captions.examples]
    return recall_metrics(i2t, t2i, txt2img, unscored=model.unscored, ties=model.tie_order)
