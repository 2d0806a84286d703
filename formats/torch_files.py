"""Reading torch files safely: read_torch_file is the project's only torch.load (weights_only=True: tensors and
plain data; the one foreign class a released checkpoint pickles is admitted as an inert stand-in), and
load_checkpoint words a missing, truncated or corrupt checkpoint as one line naming it (README "Trust model").

Not on the reading path: the trainers and engine's resume make one call here.
"""

from __future__ import annotations

import os
import pickle
import struct
import warnings
import zipfile
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


# A torch zip's entries may be deflated: torch allocates each entry's declared uncompressed size, so a 390 KB file
# can ask for 400 MB. torch.save stores entries uncompressed (total = the file's size) and weights recompressed by
# a zip tool shrink by far less than half, so what the entries declare may be at most this (deflate reaches 1000x):
def unpacked_bound(file_size: int) -> int:
    return 2 * file_size + 64 * 2**20


class OversizedFileError(ValueError):
    """A weights file declares more bytes than its size allows (unpacked_bound, a safetensors header length)."""


def _check_zip_sizes(path) -> None:
    """A torch zip whose entries declare more than unpacked_bound(file size) bytes is an OversizedFileError."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                return  # not a zip: torch's legacy format, stored raw (or not a torch file: torch says so)
            with zipfile.ZipFile(f) as z:
                declared = sum(i.file_size for i in z.infolist())
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        return  # torch reports a missing or damaged file in its own words
    if declared > unpacked_bound(size):
        raise OversizedFileError(
            f"{path}: its zip entries declare {declared} bytes unpacked, more than 2 x its {size} bytes + 64 MiB "
            f"(a compressed torch file; torch.save never compresses): refused before unpacking"
        )


def read_safetensors(path: str | Path) -> dict:
    """safetensors.torch.load_file, its header length checked against the file first (an 8-byte length field of
    2^62, or one past the file's end, is refused before anything is read); every failure is one ValueError line."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(head) < 8:
        raise ValueError(f"{path}: not a safetensors file ({size} bytes, shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8 or n > SAFETENSORS_MAX_HEADER:
        raise OversizedFileError(
            f"{path}: safetensors header length {n} bytes is past the end of the file ({size} bytes) or above "
            f"{SAFETENSORS_MAX_HEADER}; a damaged or not a safetensors file"
        )
    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError (not a ValueError), OSError, ...
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {detail})") from None


SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit


def read_torch_file(path: str | Path, map_location="cpu", mmap: bool = False):
    """The one reader of torch files in this project (our checkpoints, VOLTA/IGLUE .bin/.tar, original UC2 .pt,
    X2-VLM .th, Hugging Face pytorch_model.bin): torch.load(weights_only=True), i.e. tensors and plain data
    only, plus FOREIGN_CHECKPOINT_CLASSES as inert stand-ins. A file that asks for anything else raises
    UnsafeCheckpointError naming it; a zip whose entries declare more than unpacked_bound(its size) is an
    OversizedFileError naming it; other failures (missing, truncated) propagate for the caller to word."""
    if _TORCH_VERSION < (2, 6):  # weights_only could be escaped before 2.6 (CVE-2025-32434)
        raise RuntimeError(
            f"torch {torch.__version__} cannot read checkpoints safely; install requirements.txt's torch"
        )
    if isinstance(path, (str, os.PathLike)):
        _check_zip_sizes(path)
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
    except OversizedFileError:
        raise
    except Exception as e:  # torch raises many types for damaged files (RuntimeError, EOFError, UnpicklingError...)
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {detail})") from None
