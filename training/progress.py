"""The training loop's counters and checks: Progress (saved in every checkpoint, restored by --resume; the
comparison systems' loops keep theirs in it too), DataWait (how long the loop waits for its batches:
data_wait_frac in metrics.jsonl), and the end-of-run check that some optimizer step updated the weights.

Not on the reading path: engine.py's loop makes single calls here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

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
