"""The training loop's counters and checks: Progress (saved in every checkpoint, restored by --resume; the
comparison systems' loops keep theirs in it too), DataWait (how long the loop waits for its batches:
data_wait_frac in metrics.jsonl), RunClock (the whole run's ETA on the console), and the end-of-run check that
some optimizer step updated the weights.

Not on the reading path: engine.py's loop makes single calls here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from formats import run_folder


@dataclass
class Progress:
    """The loop's counters; saved in the checkpoint and restored by --resume (engine.train; XVL-MAML's and
    M-CLIP's loops keep theirs in it too)."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps done = global 0-based index of the next step
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss or gradient
    nonfinite_in_a_row: int = 0
    amp_skipped_steps: int = 0  # fp16 GradScaler overflow skips (scale lowered; not an error)
    metrics_offset: int = 0  # metrics.jsonl size at the checkpoint
    # The checkpoint is written before the epoch's evaluation: True when that evaluation is still to log (a
    # resume re-runs it first). Older checkpoints, written after it, lack the field: False.
    eval_pending: bool = False


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


class RunClock:
    """The whole run's ETA: the epochs still to train at the mean epoch time measured so far (training and
    checkpoint, this process) plus the evaluations still due at the mean seconds per evaluated language. Shown in
    each epoch's bar ("epoch 3/5, run ETA 1h12m") and in the epoch line after each evaluation. An estimate only
    once it has measured what it extrapolates: before the first epoch ends none is shown, and an evaluation whose
    time or size is not known yet is named instead of guessed ("+ evaluations")."""

    def __init__(self, args, first_epoch: int, due: Callable[[int], bool], now: Callable[[], float] = time.monotonic):
        self.epochs, self.first_epoch, self.due, self.now = args.epochs, first_epoch, due, now
        self.per_epoch_langs = len(getattr(args, "eval_langs", None) or []) or None  # None: as many as the final's
        self.all_langs = len(getattr(args, "langs", None) or []) or None  # None: known after an all-language one
        self.train_s, self.trained, self.eval_s, self.eval_langs = 0.0, 0, 0.0, 0
        self.started = self.t0 = self.now()

    def epoch_desc(self, epoch: int) -> str:
        """The bar's description for epoch `epoch` (0-based) starting now: "epoch 3/5, run ETA 1h12m"."""
        self.started = self.now()
        eta = self.eta(epoch - 1)
        return f"epoch {epoch + 1}/{self.epochs}" + (f", run ETA {eta}" if eta else "")

    def trained_epoch(self) -> None:
        """The epoch's training and checkpoint are done (its evaluation, if due, comes next)."""
        self.train_s += self.now() - self.started
        self.trained += 1
        self.started = self.now()

    def evaluated(self, n_langs: int, all_langs: bool) -> None:
        """An evaluation of n_langs languages ended now (all_langs: every language of the run, the final kind);
        the next per-epoch ones are taken to be as large."""
        self.eval_s += self.now() - self.started
        self.eval_langs += n_langs
        self.per_epoch_langs = n_langs
        if all_langs:
            self.all_langs = n_langs

    def note(self, epoch: int) -> str:
        """For the epoch line after epoch `epoch`'s evaluation: "run ETA 1h12m"; after the last epoch the run's
        time ("run took 3h05m"; nothing after a --resume, whose earlier part this process did not time)."""
        if epoch < self.epochs - 1:
            eta = self.eta(epoch)
            return f"run ETA {eta}" if eta else ""
        return f"run took {duration(self.now() - self.t0)}" if self.first_epoch == 0 else ""

    def eta(self, done: int) -> str:
        """Time left after epoch `done` (0-based) and its evaluation, "" before any epoch was timed."""
        if not self.trained:
            return ""
        left = (self.epochs - 1 - done) * self.train_s / self.trained
        unknown = False
        for epoch in (e for e in range(done + 1, self.epochs) if self.due(e)):
            langs = self.all_langs if epoch == self.epochs - 1 else (self.per_epoch_langs or self.all_langs)
            if langs is None or not self.eval_langs:
                unknown = True
            else:
                left += langs * self.eval_s / self.eval_langs
        return duration(left) + (" + evaluations" if unknown else "")


def duration(seconds: float) -> str:
    """3h05m, 12m40s, 9s."""
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def check_made_progress(prog: Progress, run_dir: Path) -> None:
    """A run none of whose optimizer steps updated the weights ends with an error and no model_final.pt (nor
    results.json): every trainer calls it before writing a result (engine.train, M-CLIP's fit, XVL-MAML's loop)."""
    updates = prog.step - prog.nonfinite_steps - prog.amp_skipped_steps
    if updates <= 0:
        raise SystemExit(
            f"error: the run made no finite optimizer step ({prog.step} steps: {prog.nonfinite_steps} "
            f"non-finite, {prog.amp_skipped_steps} skipped by the fp16 scaler); {run_folder.FINAL} not written "
            f"(its weights would be the initial ones); check the data, --lr and --amp"
        )


def last_checkpoint(prog: Progress, run_dir: Path) -> str:
    return (
        f"last good checkpoint: {run_dir / run_folder.CHECKPOINT} (after epoch {prog.epoch})"
        if prog.epoch
        else "last good checkpoint: none (no epoch completed)"
    )
