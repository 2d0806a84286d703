"""Reading torch files safely: read_torch_file is the project's only torch.load (weights_only=True: tensors and
plain data; the one foreign class a released checkpoint pickles is admitted as an inert stand-in), and
load_checkpoint words a missing, truncated or corrupt checkpoint as one line naming it (README "Trust model").

Not on the reading path: the trainers and engine's resume make one call here.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch


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
