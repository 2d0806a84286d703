"""A run folder (--output-dir) and its files: args.json, metrics.jsonl (MetricsLog), checkpoint_last.pt and
model_final.pt (save_checkpoint: atomic and durable), the checks before a run starts or resumes in it
(run_dir_problem: never destroy a run), and the lock that keeps a second process out (an flock on the folder,
dropped by the kernel when its holder dies), and what a checkpoint records about its run (base_meta, run_meta).
atomic_write_text is the project's one atomic writer of text files.

Not on the reading path: engine.py's loop and check_run_dir make single calls here.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path

import torch

from formats import tokenizer_check

CHECKPOINT, FINAL, METRICS, ARGS = "checkpoint_last.pt", "model_final.pt", "metrics.jsonl", "args.json"
RUN_FILES = (CHECKPOINT, FINAL, METRICS, ARGS)


def atomic_write_text(path: str | Path, text: str) -> None:
    """tmp + os.replace: a crash mid-write never leaves a truncated file in place of a good one. A failed write
    (disk full, file too large, ...) is a CheckpointWriteError naming the file and the cause; no .tmp is left."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        raise CheckpointWriteError(f"cannot write {path}: {_write_failure(e)}{_remove_partial(tmp)}") from None


def json_safe(obj):
    return json.loads(json.dumps(obj, default=str))


class CheckpointWriteError(ValueError):
    """save_checkpoint or atomic_write_text could not write (disk full, ...); one line naming the file."""


def _write_failure(e: BaseException) -> str:
    """The cause of a failed write in one line: the OSError's reason (disk full, file too large), also when torch
    wrapped it in a RuntimeError (torch.save reports a failed write as 'unexpected pos ...', the OSError its
    write raised is the exception's context); else the first line of the error itself."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError):
            return e.strerror or (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def _remove_partial(tmp: Path) -> str:
    """Remove the partial tmp file of a failed write (it would only fill the disk further); what was done."""
    try:
        tmp.unlink()
        return f"; removed the partial {tmp.name}"
    except FileNotFoundError:
        return ""
    except OSError as e:
        return f"; could not remove the partial {tmp} ({e.strerror or e}): delete it"


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Atomic: write <path>.tmp in the same folder, fsync, os.replace. A crash leaves the old file intact. A failed
    write (disk full, file too large, ...; from the OS or from torch.save, which words an OSError as a
    RuntimeError) is a one-line CheckpointWriteError naming the file and the cause, and removes the .tmp."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except (OSError, RuntimeError) as e:  # RuntimeError: torch.save's wording of a failed write
        raise CheckpointWriteError(
            f"cannot write checkpoint {path}: {_write_failure(e)}{_remove_partial(tmp)}"
        ) from None
    except BaseException:  # not a write failure (a state torch cannot save, an interrupt): no partial file either
        _remove_partial(tmp)
        raise


def resuming(args, run_dir: Path) -> bool:
    """--resume with a checkpoint to resume from. --resume of a run killed before its first checkpoint starts
    afresh (engine.train), so the trainer must load --checkpoint as for a new run."""
    return bool(args.resume) and (Path(run_dir) / CHECKPOINT).exists()


def run_dir_problem(run_dir: Path, resume: bool) -> str | None:
    """Why a run cannot start (resume: continue) in run_dir, as one line, or None: then this process holds the
    folder's lock until release_run_dirs(). In use by another process, holds a run and not resume, holds
    nothing to resume (or a run whose checkpoint is gone), not writable. Writes no file."""
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
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record, default=float) + "\n")
            except OSError as e:  # disk full: a half-written line is dropped by --resume (truncate)
                raise CheckpointWriteError(
                    f"cannot write {self.path}: {_write_failure(e)}; the last checkpoint is intact (--resume drops "
                    "the partial line)"
                ) from None

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def truncate(self, size: int) -> None:
        """Drop what a killed run logged after its last checkpoint (and any half-written line)."""
        if self.enabled and self.size() > size:
            os.truncate(self.path, size)


# ---------------------------------------------------------------- a checkpoint's meta


def base_meta(model_name: str, args, config: dict, tokenizer) -> dict:
    """Checkpoint meta both trainers record (engine.train adds policy/schedule/epoch/...). tokenizer_size and
    tokenizer_vocab (fingerprint): the vocabulary the weights are trained with, checked on --resume and when
    the checkpoint is loaded again."""
    return {
        "model": model_name,
        "task": args.task,
        "config": config,
        "tokenizer": args.tokenizer,
        "tokenizer_size": len(tokenizer),
        "tokenizer_vocab": tokenizer_check.tokenizer_fingerprint(tokenizer),
        "checkpoint": args.checkpoint,
        "recipe": args.recipe,
        "langs": args.langs,
    }


def run_meta(meta: dict, schedule, prog, args) -> dict:
    """A checkpoint's meta: base_meta's, plus where the run stands (schedule: its freeze.Schedule; prog: its
    training.progress.Progress)."""
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
