"""After an epoch: its evaluation. engine.train writes the epoch's checkpoint first, then calls run_evaluation:
the trainer's evaluate_fn (scoring/evaluate.py) in eval mode under the run's autocast dtype, its records in
metrics.jsonl and one line on the console; a crash or bad evaluation data loses no training (--resume re-runs it).

Not on the reading path: engine.py's loop makes one call here after every epoch's checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from console import cli
from formats import run_folder
from formats.bad_input import BadInput
from training import devices
from training.devices import DistInfo
from training.progress import Progress, RunClock


def add_precision_args(group) -> None:
    """--eval-fp32 and --eval-tf32 (engine.add_common_args' run group)."""
    group.add_argument(
        "--eval-fp32", action="store_true", help="evaluate in float32 although --amp trains in bf16/fp16"
    )
    add_tf32_arg(group)


def add_tf32_arg(group) -> None:
    """--eval-tf32/--no-eval-tf32 (the trainers' evaluation and eval_zeroshot.py evaluate)."""
    group.add_argument(
        "--eval-tf32",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="float32 evaluation on an Ampere or newer CUDA GPU uses TF32 matmuls (10-bit mantissa inputs, "
        "float32 accumulation; up to 8x the float32 throughput); --no-eval-tf32: strict float32. No effect on CPU "
        "(docs/choices.md)",
    )


def tf32_available(device: torch.device | str) -> bool:
    """TF32 exists on CUDA devices of compute capability 8.0 (Ampere) and later."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8


@contextmanager
def tf32_matmuls(device: torch.device | str, enabled: bool = True):
    """On a device that has TF32: TF32 for CUDA matmuls and convolutions inside the block when enabled, strict
    float32 when not (cuDNN's convolutions default to TF32, so off must be said); the previous settings are
    restored after. Elsewhere (CPU, older GPUs) nothing changes."""
    if not tf32_available(device):
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def evaluation_due(args, epoch: int) -> bool:
    """After the last epoch always; before it every --eval-every epochs (0: never)."""
    every = getattr(args, "eval_every", 1)
    return epoch == args.epochs - 1 or (every > 0 and (epoch + 1) % every == 0)


def run_clock(args, first_epoch: int, evaluate_fn: Callable | None) -> RunClock:
    """The whole-run ETA engine.train shows (training.progress.RunClock), knowing which epochs evaluate."""
    return RunClock(args, first_epoch, lambda epoch: evaluate_fn is not None and evaluation_due(args, epoch))


def run_evaluation(
    evaluate_fn: Callable | None,
    model: nn.Module,
    epoch: int,
    prog: Progress,
    args,
    log: run_folder.MetricsLog,
    run_dir: Path,
    dist: DistInfo,
    amp_dtype: torch.dtype | None,
    on_evaluated: Callable | None = None,
    resumed: bool = False,
    clock: RunClock | None = None,
) -> None:
    """Epoch `epoch` (0-based)'s evaluation if prog.eval_pending (under the run's AMP dtype unless --eval-fp32;
    --eval-langs before the last epoch, every language after it), logged; its checkpoint is already written.
    Bad evaluation data or a non-finite model output is a one-line error (the checkpoint stays; --resume re-runs
    it). resumed: the run stopped between that checkpoint and the end of this evaluation. clock: the run's ETA
    (run_clock): the epoch's training time ends here, the evaluation is timed, the epoch line shows the ETA."""
    if clock is not None:
        clock.trained_epoch()
    if not prog.eval_pending:
        return
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
    eval_dtype = None if getattr(args, "eval_fp32", False) else amp_dtype
    langs = None if epoch == args.epochs - 1 else getattr(args, "eval_langs", None)
    kept = (
        f"the epoch's checkpoint {run_dir / run_folder.CHECKPOINT} is kept: fix it and --resume (the evaluation "
        "is run again)"
    )
    results = evaluate_or_stop(evaluate_fn, model, epoch, kept, amp_dtype=eval_dtype, langs=langs)
    if clock is not None:
        clock.evaluated(len(results), all_langs=langs is None)
    if on_evaluated is not None:
        on_evaluated(model, epoch, results, dist)
    log_eval(log, results, epoch, prog.step, args.eval_split, dist, clock)


def evaluate_or_stop(
    evaluate_fn: Callable, model: nn.Module, epoch: int, kept: str, amp_dtype=None, langs=None
) -> dict:
    """evaluate(), under the guard every trainer evaluates with: bad evaluation data or a non-finite model output
    (scoring.metrics.require_finite, recall_metrics) ends the run as one line, before any of it is logged and
    before any result (model_final.pt, results.json) is written. kept: what the line says is kept."""
    try:
        return evaluate(evaluate_fn, model, epoch, amp_dtype=amp_dtype, langs=langs)
    except (BadInput, FloatingPointError) as e:
        raise SystemExit(f"error: evaluation after epoch {epoch + 1}: {e}; {kept}") from None


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
    with torch.no_grad(), devices.autocast(device, amp_dtype):
        results = evaluate_fn(model, epoch + 1, langs=langs) if langs else evaluate_fn(model, epoch + 1)
    model.train()
    return results or {}


def log_eval(
    log: run_folder.MetricsLog, results: dict, epoch: int, step: int, split: str, dist: DistInfo, clock=None
) -> None:
    for lang, metrics in results.items():
        log.write({"type": "eval", "epoch": epoch + 1, "step": step, "lang": lang, "split": split, **metrics})
    if dist.is_main and results:
        of, note = (clock.epochs, clock.note(epoch)) if clock is not None else (None, "")
        print(cli.epoch_line(results, epoch, split, of, note), flush=True)
