"""Fault injection for the tests: a failure the n-th time this process reaches a point of a training loop. No
production module holds a hook for it: each point wraps a function the loops call anyway.

Spec "<kill|raise|hang|enospc>:<point>:<n>[:<rank>]" (rank: act only in torchrun's rank <rank>). Points:
  step       after an optimizer step (engine.optimizer_step: every loop's update)
  unfreeze   after the trainable set changed (freeze.apply_schedule returned True)
  save_mid   inside save_checkpoint, the checkpoint's .tmp written but not yet fsynced: first cut to half, as a
             SIGKILL mid-write leaves it (enospc: a disk that filled up mid-write)
  evaluate   before an epoch's evaluation (training.after_epoch.evaluate)
  epoch_end  after the epoch's checkpoint and its evaluation; where that is differs per loop (the `loop` tables)
kill: SIGKILL; raise: RuntimeError("SUF_FAULT: injected failure ..."); hang: sleep an hour; enospc: OSError(ENOSPC).

In-process: `undo = _faults.install("raise:epoch_end:1", monkeypatch=monkeypatch)` ... `undo()`, or
`with _faults.injected(spec): ...` (loop=_faults.XVLMAML / MCLIP for the comparison systems' loops).
A script: `python tests/_faults.py SPEC script.py ARGS...` runs script.py as __main__ with the fault installed
(how the SIGKILL tests run the toy trainer).
"""

from __future__ import annotations

import errno
import os
import runpy
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engine  # noqa: E402
import freeze  # noqa: E402
from training import after_epoch  # noqa: E402

# epoch_end per loop: (module, function) whose return ends an epoch there
ENGINE = {"epoch_end": (after_epoch, "run_evaluation")}  # engine.train calls it after every epoch's checkpoint
XVLMAML = {"epoch_end": (engine, "save_training_state")}  # comparisons' xvlmaml: evaluation, then checkpoint
MCLIP = {"epoch_end": (engine, "barrier")}  # train_mclip: its checkpoint, then a barrier (its only other: the end)


def _act(action: str, point: str, n: int) -> None:
    print(f"SUF_FAULT: {action} at {point} #{n}", file=sys.stderr, flush=True)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "raise":
        raise RuntimeError(f"SUF_FAULT: injected failure at {point} #{n}")
    elif action == "hang":
        time.sleep(3600)
    elif action == "enospc":  # a full disk, as the write would see it
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def install(spec: str, loop: dict = ENGINE, monkeypatch=None):
    """Wrap the point's function; returns the function that undoes it (with a pytest monkeypatch, the test's end
    undoes it too)."""
    action, point, n, *rank = spec.split(":")
    n, seen = int(n), [0]
    if rank and int(rank[0]) != int(os.environ.get("RANK", 0)):
        return lambda: None

    def reached(before=None) -> None:
        seen[0] += 1
        if seen[0] == n:
            if before is not None:
                before()
            _act(action, point, n)

    if point == "save_mid":  # save_checkpoint fsyncs the complete .tmp file once, before os.replace
        module, name = os, "fsync"
        original = os.fsync

        def wrapper(fd):
            if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
                reached(before=lambda: os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_CUR) // 2))
            return original(fd)

    else:
        module, name = {
            "step": (engine, "optimizer_step"),
            "unfreeze": (freeze, "apply_schedule"),
            "evaluate": (after_epoch, "evaluate"),
            "epoch_end": loop["epoch_end"],
        }[point]
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            if point == "evaluate":
                reached()
            out = original(*args, **kwargs)
            if point == "step" or (point == "unfreeze" and out) or (point == "epoch_end" and not kwargs.get("resumed")):
                reached()
            return out

    (monkeypatch.setattr if monkeypatch is not None else setattr)(module, name, wrapper)
    return lambda: setattr(module, name, original)


@contextmanager
def injected(spec: str, loop: dict = ENGINE):
    undo = install(spec, loop)
    try:
        yield
    finally:
        undo()


if __name__ == "__main__":  # python tests/_faults.py SPEC script.py ARGS...
    spec, script, *rest = sys.argv[1:]
    install(spec)
    sys.argv = [script, *rest]
    sys.path[0] = str(Path(script).resolve().parent)
    runpy.run_path(script, run_name="__main__")
