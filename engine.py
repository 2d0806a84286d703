"""The training loop shared by train_uc2.py and train_cclm.py, and what it stands on: the common CLI (arguments with
their defaults in sight, range checks, the two-stage parse_args), distributed setup, the data order, AdamW +
warm-up/decay, AMP, the epoch loop (gradient accumulation, scheduled unfreezing with DDP re-wrapping, the
non-finite-loss stop) and save / exact resume.

A trainer's main() is (decorated with console.cli.exits_on_bad_input: bad input ends it as one "error: ..." line):
    args = engine.parse_args(parser, argv, DEFAULTS, "uc2")   # after engine.add_common_args(parser, DEFAULTS)
    dist = engine.setup_distributed()
    run_dir = engine.check_run_dir(args, dist)  # before anything is built: a bad --output-dir costs nothing
    engine.seed_everything(args.seed)     # identical model init on every rank
    model = build_model(...); layout = layer_layout(task); schedule = freeze.schedule_from_args(args, layout.num_layers)
    loader = engine.build_train_loader(dataset, args, dist, collate_fn)
    evaluate_fn = scoring.evaluate.trainer_evaluate_fn(model_name, args, ...)   # the per-epoch evaluation
    engine.train(args, model, layout, schedule, loader, evaluate_fn, meta, dist, module_lr=..., run_dir=run_dir)
    engine.cleanup_distributed()

Run folder (--output-dir): args.json, metrics.jsonl, checkpoint_last.pt (resume state, written
atomically after every epoch, before its evaluation), model_final.pt ({"model": state_dict, "meta": ...}).
Rank 0 holds an flock on the folder while it runs: a second process on the same folder is refused.

Sections, in file order (each opens with a "# ---- " rule): CLI; distributed; data order; optimizer, AMP; the
training loop (train, forward_backward, optimizer_step, the step bookkeeping); run folder, checkpoints, resume.
What the loop calls but a reader need not read is one call into a folder: training/ (ranks and devices, the DDP
wrapper, the loop's counters, the evaluation after an epoch), console/ (--help, one-line errors, what a run prints),
formats/ (torch files, the run folder's files and lock, the tokenizer check); evaluate_fn is scoring/evaluate.py's.

Environment: SUF_DIST_TIMEOUT (seconds, default 600) for collectives; SUF_DEVICE=cpu forces CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

import data
from training import loaders
import freeze
from console import what_trains
from formats import run_folder, tokenizer_check, torch_files
from formats.bad_input import BadInput
from training import after_epoch, devices, optim, progress
from training.devices import DistInfo
from training.progress import Progress

# ---- CLI ---------------------------------------------------------------------------------------------------


TASKS = data.TASKS  # the one task table (data.py)
RECIPES = ("paper", "iglue")  # paper: the paper's stated settings; iglue: IGLUE's released scripts' values

# Arguments a --resume must repeat (they change the result; data paths may move), compared by check_resume_args
# with the run's saved ones. A key a trainer lacks is skipped: max_regions, retrieval_loss/_negatives are UC2's,
# vision_lr and lr_mult CCLM's; the comparison systems add theirs to this list next to their parsers.
RESUME_KEYS = tuple(
    """task seed epochs lr batch_size weight_decay adam_eps adam_betas clip_grad warmup_ratio schedule_epochs recipe
    max_steps_per_epoch policy suf_k unfreeze_every unfreeze_unit top_layers llrd_decay freeze_embeddings train_split
    train_lang dropout amp max_regions retrieval_loss retrieval_negatives vision_lr lr_mult adamw""".split()
)

# Ranges of numeric arguments, checked right after parsing (before anything is written). A key the parser
# lacks, or left at None (optional), is skipped: max_regions is UC2's, image_res / vision_lr CCLM's. The comparison
# systems pass theirs beside these (check_arg_ranges(args, extra)), built from the same rules.
AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
NOT_NEGATIVE = (lambda v: v >= 0 and math.isfinite(v), ">= 0")
POSITIVE = (lambda v: v > 0 and math.isfinite(v), "> 0")
ARG_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    **dict.fromkeys(("epochs", "schedule_epochs", "suf_k", "unfreeze_every", "top_layers"), AT_LEAST_1),
    **dict.fromkeys(("lr", "vision_lr", "weight_decay"), NOT_NEGATIVE),
    **dict.fromkeys(("adam_eps", "lr_mult"), POSITIVE),
    "warmup_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "llrd_decay": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "adam_betas": (lambda v: all(0 <= b < 1 for b in v), "each in [0, 1)"),
    "clip_grad": (lambda v: v >= 0 and math.isfinite(v), ">= 0 (0 = off)"),
    "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    **dict.fromkeys("batch_size micro_batch_size grad_accum eval_batch_size max_regions image_res".split(), AT_LEAST_1),
    "num_workers": NOT_NEGATIVE,
    **dict.fromkeys(("max_steps_per_epoch", "max_nonfinite"), AT_LEAST_1),
    "log_every": (lambda v: v >= 0, ">= 0 (0 = only at epoch ends)"),
}


def check_arg_ranges(args: argparse.Namespace, extra: dict | None = None) -> None:
    """One-line SystemExit naming the first numeric argument outside its range (ARG_RULES, then `extra`: a
    comparison system's own; every trainer calls this right after parsing)."""
    for key, (ok, rule) in {**ARG_RULES, **(extra or {})}.items():
        value = getattr(args, key, None)
        if value is not None and not ok(value):
            shown = " ".join(f"{v:g}" for v in value) if isinstance(value, (list, tuple)) else f"{value:g}"
            raise SystemExit(f"error: --{key.replace('_', '-')} {shown} is out of range: must be {rule}")


def check_resume_args(args: argparse.Namespace, saved: dict, keys: Sequence[str], run: object) -> None:
    """--resume: one-line SystemExit naming the first of `keys` whose value differs from the run's `saved` arguments
    (args.json, or a checkpoint's "args"); a key the run did not save is skipped (an option added later takes the
    value such a run ran with, optim.BEFORE_THE_OPTION). The one comparison of every trainer: engine.resume passes
    RESUME_KEYS, the comparison systems RESUME_KEYS plus their own."""
    optim.as_before_the_option(args, saved)
    for key in keys:
        if key in saved and run_folder.json_safe(getattr(args, key, None)) != saved[key]:
            raise SystemExit(
                f"error: --resume: --{key.replace('_', '-')} is {getattr(args, key, None)!r} but the run in "
                f"{run} used {saved[key]!r}; resume with the same settings"
            )


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
    after_epoch.add_precision_args(g)  # --eval-fp32, --eval-tf32
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
    optim.add_arg(o, "reference")  # --adamw: the references' AdamW update (training/optim.py, docs/choices.md)
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


def default_num_workers(cpus: int | None = None, procs_per_node: int | None = None, cap: int = 16) -> int:
    """Loader workers per process: the CPUs this process may use shared among the node's processes, one
    left for the training loop itself. Our choice: one slow core decodes ~5k UC2 samples/s (~4.4k/s feed an
    A100) but only ~100-130 CCLM training images/s (~340/s feed an A100), so CCLM wants every core it can
    get; the cap bounds the shared memory the workers' batches hold (loaders.BatchLoader)."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if procs_per_node is None:
        procs_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(cap, cpus // max(procs_per_node, 1) - 1))


# ---- distributed -------------------------------------------------------------------------------------------


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
    run_folder.release_run_dirs()
    if end_group and tdist.is_initialized():
        tdist.destroy_process_group()


def barrier(dist: DistInfo) -> None:
    if dist.distributed:
        tdist.barrier()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- data order --------------------------------------------------------------------------------------------


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
    return loaders.BatchLoader(
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


# ---- optimizer, AMP ----------------------------------------------------------------------------------------


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
    optim.set_update(optimizer, args.adamw)
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


# ---- the training loop -------------------------------------------------------------------------------------


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
            raise ValueError("engine.train with --print-schedule: call what_trains.print_schedule_only instead")
        model.to(dist.device)
        # The LR schedule spans --schedule-epochs (default --epochs); IGLUE's longer one stops before reaching 0.
        total = (getattr(args, "schedule_epochs", None) or args.epochs) * steps_per_epoch
        optimizer, lr_sched = build_optimizer(
            model, layout, schedule, args, module_lr, no_decay=no_decay, lr_mult=lr_mult, total_steps=total
        )
        amp_dtype, scaler = setup_amp(args.amp, dist.device)
        log = run_folder.MetricsLog(run_dir / run_folder.METRICS, dist.is_main)
        checkpoint, final = run_dir / run_folder.CHECKPOINT, run_dir / run_folder.FINAL
        if run_folder.resuming(args, run_dir):
            prog = resume(checkpoint, model, optimizer, lr_sched, scaler, args, dist, log, meta)
            if prog.epoch >= args.epochs and final.exists():  # finished: keep every file
                if dist.is_main:
                    print(f"nothing to do: {run_dir} finished its {args.epochs} epochs ({final})", flush=True)
                return
            log.truncate(prog.metrics_offset)  # what a killed run logged after its checkpoint
            # stopped between the checkpoint and the end of its evaluation (prog.eval_pending): run it now
            after_epoch.run_evaluation(
                evaluate_fn,
                model,
                prog.epoch - 1,
                prog,
                args,
                log,
                run_dir,
                dist,
                amp_dtype,
                on_evaluated,
                resumed=True,
            )
        else:
            prog = start_fresh(run_dir, args, dist, log)

        net, applied = None, None  # the (DDP-)wrapped model and the stage whose trainable set it was built over
        clock = after_epoch.run_clock(args, prog.epoch, evaluate_fn)  # the whole run's ETA on the console
        for epoch in range(prog.epoch, args.epochs):
            set_epoch(train_loader, epoch)
            model.train()
            batches = progress.DataWait(iter(train_loader))
            totals = torch.zeros(2, device=dist.device)  # (loss sum, finite micro-batches) since the last record
            desc = clock.epoch_desc(epoch)  # "epoch 3/5, run ETA 1h12m"
            bar = tqdm(total=steps_per_epoch, desc=desc, disable=not dist.is_main, dynamic_ncols=True)
            for i in range(steps_per_epoch):
                step_start = time.perf_counter()
                # requires_grad is set once per stage (the trainable layers fully determine it): --unfreeze-unit
                # epoch and step alike; a resumed run applies its stage on its first step.
                stage, changed = tuple(schedule.trainable_layers(epoch, prog.step)), False
                if stage != applied:
                    changed = freeze.apply_schedule(model, layout, schedule, epoch, prog.step)
                    if dist.is_main and (changed or applied is None):
                        tqdm.write(
                            what_trains.trainable_line(model, layout, schedule, epoch, prog.step, steps_per_epoch)
                        )
                    applied = stage
                if changed or net is None:
                    net = None  # frees the old DDP (refcount) and its reducer's autograd hooks before new ones
                    net = devices.wrap_for_training(model, dist, args.ddp_find_unused)
                try:
                    step_loss, n_bad = forward_backward(net, batches, accum, amp_dtype, scaler, dist.device)
                except BadInput as e:
                    raise SystemExit(f"error: training data: {e}; {progress.last_checkpoint(prog, run_dir)}") from None
                totals += torch.stack([step_loss, accum - n_bad])  # before optimizer_step sums n_bad over ranks
                ok, amp_skipped, lr, grad_norm = optimizer_step(
                    model, optimizer, lr_sched, scaler, args.clip_grad, n_bad, dist
                )
                count_step(prog, ok, amp_skipped, epoch, args, run_dir, dist)  # stops after --max-nonfinite in a row
                if on_step is not None:
                    on_step(model, prog.step)
                bar.update(1)
                batches.end_step(step_start)
                if (args.log_every and prog.step % args.log_every == 0) or i == steps_per_epoch - 1:
                    loss = mean_loss(totals, dist)
                    log.write({**train_record(epoch, prog, loss, lr, grad_norm, model, schedule), **batches.record()})
                    shown = f"{loss:.4f}" if loss is not None else "nan"
                    bar.set_postfix(loss=shown, lr=f"{lr:.2e}", data_wait=f"{batches.last_fraction:.0%}")
                    totals.zero_()
            bar.close()
            del batches
            # The epoch's checkpoint, then its evaluation: a crash in the evaluation loses no training (--resume
            # re-runs it).
            prog.epoch, prog.metrics_offset = epoch + 1, log.size()
            prog.eval_pending = evaluate_fn is not None and after_epoch.evaluation_due(args, epoch)
            save_training_state(checkpoint, model, optimizer, lr_sched, scaler, prog, args, meta, schedule, dist)
            after_epoch.run_evaluation(
                evaluate_fn, model, epoch, prog, args, log, run_dir, dist, amp_dtype, on_evaluated, clock=clock
            )

        progress.check_made_progress(prog, run_dir)  # on every rank: the counters are the same everywhere
        if dist.is_main:
            state = {"model": model.state_dict(), "meta": run_folder.run_meta(meta, schedule, prog, args)}
            run_folder.save_checkpoint(final, state)
            print(f"done: {final}", flush=True)
        barrier(dist)
    except run_folder.CheckpointWriteError as e:  # disk full, ...: the previous checkpoint is intact
        raise SystemExit(f"error: {e}") from None
    finally:
        run_folder.release_run_dirs(run_dir)


def forward_backward(
    net: nn.Module, batches, accum: int, amp_dtype, scaler, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """accum micro-batches into .grad (DDP all-reduces on the last one only). Returns (sum of the
    finite micro-batch losses, number of non-finite ones) as tensors, so nothing syncs here."""
    loss_sum = torch.zeros((), device=device)
    n_bad = torch.zeros((), device=device)
    for i in range(accum):
        batch = devices.to_device(next(batches), device)
        last = i == accum - 1
        with nullcontext() if last or not isinstance(net, DDP) else net.no_sync():
            with devices.autocast(device, amp_dtype):
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
    with optim.reference_update(optimizer):  # --adamw reference: the references' eps and decay order
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
            f"step {prog.step} (--max-nonfinite {args.max_nonfinite}); {progress.last_checkpoint(prog, run_dir)}"
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


def mean_loss(totals: torch.Tensor, dist: DistInfo) -> float | None:
    """(loss sum, number of finite micro-batches) over all ranks -> their mean loss (None: none was finite)."""
    total = totals.double()
    if dist.distributed:
        tdist.all_reduce(total)
    return (total[0] / total[1]).item() if total[1] > 0 else None


# ---- run folder, checkpoints, resume -----------------------------------------------------------------------


def check_run_dir(args: argparse.Namespace, dist: DistInfo) -> Path:
    """One-line SystemExit (on every rank) if --output-dir cannot take this run (run_folder.run_dir_problem: in
    use by another process, holds a run and --resume is not given, holds nothing to resume, not writable). Rank 0
    then holds the folder's lock until run_folder.release_run_dirs() (engine.train and cleanup_distributed call
    it). Writes no file; call it once, as early as you like, and give its result to train(run_dir=).
    With --print-schedule nothing is checked."""
    run_dir = Path(args.output_dir)
    if getattr(args, "print_schedule", False):
        return run_dir
    problem = run_folder.run_dir_problem(run_dir, args.resume) if dist.is_main else None
    problem = devices.broadcast_object(problem, dist)
    if problem:
        raise SystemExit(f"error: {problem}")
    return run_dir


def load_tokenizer(args: argparse.Namespace, embedding_rows: int):
    """--tokenizer (tokenizer_check.load_tokenizer), checked against the model's embedding rows; one-line SystemExit."""
    try:
        tokenizer = tokenizer_check.load_tokenizer(args.tokenizer)
    except ValueError as e:
        raise SystemExit(f"error: --tokenizer: {e}") from None
    tokenizer_check.check_tokenizer_vocab(tokenizer, embedding_rows, args.tokenizer)
    return tokenizer


def save_training_state(
    path: Path, model, optimizer, lr_sched, scaler, prog: Progress, args, meta: dict, schedule, dist: DistInfo
) -> None:
    rngs = devices.gather([rng_state(dist.device)], dist)  # every rank's, so a resumed rank continues its own stream
    if dist.is_main:
        run_folder.save_checkpoint(
            path,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": lr_sched.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rngs,
                "progress": asdict(prog),
                "args": run_folder.json_safe(vars(args)),
                "meta": run_folder.run_meta(meta, schedule, prog, args),
            },
        )
    barrier(dist)


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


def start_fresh(run_dir: Path, args, dist: DistInfo, log: run_folder.MetricsLog) -> Progress:
    seed_everything(args.seed + dist.rank)  # dropout etc.; per rank, as is usual
    if dist.is_main:
        log.truncate(0)  # --resume of a run killed before its first checkpoint
        (run_dir / run_folder.ARGS).write_text(json.dumps(run_folder.json_safe(vars(args)), indent=1) + "\n")
    barrier(dist)
    return Progress()


def resume(
    path: Path, model, optimizer, lr_sched, scaler, args, dist: DistInfo, log: run_folder.MetricsLog, meta=None
) -> Progress:
    try:
        ckpt = torch_files.load_checkpoint(path)
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
