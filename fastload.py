"""Batches from DataLoader workers through a few reused slabs of shared memory (an optional fast path).

    BatchLoader(dataset, collate_fn=..., **DataLoader arguments)   a torch DataLoader, same arguments and batches
    batch_empty(shape, dtype)   what a collate_fn allocates its batch tensors with, so they can go in a slab

Why it exists (bench/data_throughput.py runs both transports side by side; bench/results/data_throughput.json):
torch's own worker transport builds every batch in a new shared-memory file, allocated and zeroed in full,
and passes each tensor with a file-descriptor round trip. For a 64-sample batch of UC2 region features
(19 MB) one worker delivered 2.5-2.9x more samples/s through the slabs than through a plain DataLoader, and
the main process (the training loop's thread) spent 0.8-0.9 ms of CPU per batch receiving it instead of
5.3-6.3 ms (images: 1.1x, 0.8 vs 6.3-6.5 ms; two runs on a busy 2-core machine). A GPU consumes a 64-sample UC2
batch in ~6.5 ms (H100) to ~20 ms (A100)
at 40% of bf16 peak (the bench's FLOP model): the plain transport's main-thread cost alone is most of an
H100 step, and more workers cannot take it off that thread. Everything here is transport: a collate_fn that
allocates with batch_empty gives the same batches through a plain DataLoader (tests/test_data.py checks it).

How: a BatchLoader gives each producing process (a worker; the main process with 0 workers) a few slabs that
it keeps: the collate writes the batch's tensors straight into a free slab (batch_empty), the main process maps
each slab once and rebuilds the tensors as views of it. A slab is written again only after every tensor of
the batch it held is gone in the main process (a finalizer on the batch's base array clears the slab's
in-use flag), so a batch that is kept (in a list, in autograd's saved tensors) is never overwritten: the
producer then takes another slab or, with all of them in use, falls back to torch's transport.
"""

from __future__ import annotations

import contextvars
import math
import os
import uuid
import weakref
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader


def batch_empty(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """Uninitialised tensor for a batch being collated: in the current slab when a BatchLoader is collating;
    otherwise, inside a DataLoader worker, in fresh shared memory, so sending the batch to the main process
    costs no extra copy (what torch's default_collate does); otherwise torch.empty."""
    arena = _ARENA.get()
    if arena is not None:
        t = arena.take(shape, dtype)
        if t is not None:
            return t
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    return _shared_empty(shape, dtype)


def _shared_empty(shape: tuple, dtype) -> torch.Tensor:
    proto = torch.empty(0, dtype=dtype)
    storage = proto._typed_storage()._new_shared(math.prod(shape), device="cpu")
    return proto.new(storage).view(shape)


# the arena of the collate running in this thread (a BatchLoader sets it around its collate_fn)
_ARENA: contextvars.ContextVar["_Arena | None"] = contextvars.ContextVar("fastload_arena", default=None)
_SLAB_HEADER = 64  # bytes before a slab's data; its in-use flag is the int64 at offset 0
_MAPPED: dict[tuple, tuple[torch.Tensor, np.ndarray]] = {}  # main process: slab key -> (slab, in-use flag)


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _in_use_flag(slab: torch.Tensor) -> np.ndarray:
    return slab[:8].numpy().view(np.int64)


class _Arena:
    """Bump allocation of 64-byte aligned tensors in one slab (None: only counts) while one batch is collated."""

    def __init__(self, slab: torch.Tensor | None):
        self.slab, self.pos, self.requested = slab, _SLAB_HEADER, 0

    def take(self, shape: tuple, dtype) -> torch.Tensor | None:
        nbytes = math.prod(shape) * dtype.itemsize
        self.requested += _round_up(nbytes, 64)
        if self.slab is None or self.pos + nbytes > len(self.slab):
            return None
        t = self.slab[self.pos : self.pos + nbytes].view(dtype).view(shape)
        self.pos = _round_up(self.pos + nbytes, 64)
        return t


class _SlabBatch:
    """A collated batch on its way to the main process: tensors in the slab as (dtype, shape, stride, offset),
    other tensors as numpy arrays (pickled inline: no file descriptor per tensor). Unpickled, it is the batch."""

    def __init__(self, key: tuple, batch: dict, refs: dict, arrays: dict, slab: torch.Tensor | None, retired: list):
        self.args = (key, batch, refs, arrays, slab, retired)

    def __reduce__(self):
        return _rebuild_batch, self.args

    def decode(self) -> dict:
        return _rebuild_batch(*self.args)


def _rebuild_batch(key: tuple, batch: dict, refs: dict, arrays: dict, slab: torch.Tensor | None, retired: list) -> dict:
    """Main process: the batch's tensors as views of the slab, through a base array whose finalizer frees the
    slab when the last of them is gone (views, numpy views and autograd's saved tensors all hold the base)."""
    token, pid, _ = key
    for n in retired:
        _MAPPED.pop((token, pid, n), None)
    if slab is not None:
        _MAPPED[key] = (slab, _in_use_flag(slab))
    slab, flag = _MAPPED[key]
    base = slab.numpy()  # a new array object over the slab, owned by this batch's tensors only
    weakref.finalize(base, flag.__setitem__, 0, 0)
    base_t = torch.from_numpy(base)
    out = dict(batch)
    for k, (dtype, shape, stride, offset) in refs.items():
        out[k] = base_t.view(dtype).as_strided(shape, stride, offset)
    for k, a in arrays.items():
        out[k] = torch.from_numpy(a)
    return out


def _forget_slabs(token: str) -> None:
    """Main process: drop the mappings of the slabs made under `token` (kept batches keep theirs)."""
    for key in list(_MAPPED):  # a copy: a pin-memory thread may still be adding to it
        if key[0] == token:
            _MAPPED.pop(key, None)


class _SlabCollate:
    """The collate a BatchLoader gives its DataLoader: runs `collate` with _alloc placing tensors in a free slab
    of this process and returns a _SlabBatch. Slabs are sized by the largest batch seen (+25%); the first batch,
    and any batch when all slabs are in use, goes the ordinary way."""

    def __init__(self, collate, token: str, max_slabs: int):
        self.collate, self.token, self.max_slabs = collate, token, max_slabs
        self._pid = None

    def __getstate__(self) -> dict:  # to a spawned worker: not this process's slabs
        return {"collate": self.collate, "token": self.token, "max_slabs": self.max_slabs, "_pid": None}

    def _own_slabs(self) -> list:
        if self._pid != os.getpid():  # a new worker: its slabs are its own, never a parent's or a dead worker's
            self._slabs, self._need, self._made, self._retired, self._pid = [], 0, 0, [], os.getpid()
        return self._slabs

    def _claim(self) -> tuple | None:
        slabs = self._own_slabs()
        for i, (n, slab, flag, sent) in enumerate(slabs):
            if flag[0] == 0:
                if len(slab) - _SLAB_HEADER >= self._need:
                    flag[0] = 1
                    return slabs[i]
                del slabs[i]  # free but too small for the batches now: the main process forgets it
                self._retired.append(n)
                break
        if self._need == 0 or len(slabs) >= self.max_slabs:
            return None
        size = _SLAB_HEADER + _round_up(self._need * 5 // 4, 1 << 20)
        in_worker = torch.utils.data.get_worker_info() is not None
        slab = _shared_empty((size,), torch.uint8) if in_worker else torch.empty(size, dtype=torch.uint8)
        self._made += 1
        entry = [self._made, slab, _in_use_flag(slab), False]
        entry[2][0] = 1
        slabs.append(entry)
        return entry

    def __call__(self, items: list) -> Any:
        entry = self._claim()
        arena = _Arena(entry[1] if entry else None)
        reset = _ARENA.set(arena)
        try:
            batch = self.collate(items)
        except BaseException:
            if entry is not None:
                entry[2][0] = 0
            raise
        finally:
            _ARENA.reset(reset)
        self._need = max(self._need, arena.requested)
        if entry is None:
            return batch
        n, slab, flag, sent = entry
        if not isinstance(batch, dict):
            flag[0] = 0
            return batch
        ptr = slab.untyped_storage().data_ptr()
        in_worker = torch.utils.data.get_worker_info() is not None
        refs, arrays, rest = {}, {}, {}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() == ptr:
                refs[k] = (v.dtype, tuple(v.shape), v.stride(), v.storage_offset())
            elif isinstance(v, torch.Tensor) and in_worker and not v.is_shared() and v.dtype != torch.bfloat16:
                arrays[k] = v.numpy()
            else:
                rest[k] = v
        if not refs:
            flag[0] = 0
            return batch
        entry[3] = in_worker  # sent once to the main process; with 0 workers the slab object itself is passed
        retired, self._retired = self._retired, []
        return _SlabBatch((self.token, self._pid, n), rest, refs, arrays, None if sent else slab, retired)


class BatchLoader(DataLoader):
    """torch DataLoader (same arguments) whose batches come through reused slabs of shared memory instead of a
    new shared-memory file per batch. `collate_fn` returns a dict; its tensors made with batch_empty go in the
    slab. Iterating gives ordinary batches (dicts of tensors); keeping them is safe."""

    def __init__(self, dataset, *, collate_fn=None, num_workers: int = 0, prefetch_factor: int | None = None, **kwargs):
        if collate_fn is None:
            collate_fn = torch.utils.data.default_collate
        # in flight per producer: the prefetched batches (+1 being collated), plus the 2 the loop may hold
        slabs = (prefetch_factor or 2) + 2 if num_workers else 3
        collate = _SlabCollate(collate_fn, uuid.uuid4().hex, slabs)
        super().__init__(
            dataset, collate_fn=collate, num_workers=num_workers, prefetch_factor=prefetch_factor, **kwargs
        )
        weakref.finalize(self, _forget_slabs, collate.token)  # persistent workers' slabs

    def __iter__(self):
        collate = self.collate_fn
        per_iteration = not (self.persistent_workers and self.num_workers)
        if per_iteration:  # new workers (or the main process) this time: slab keys of their own
            collate.token = uuid.uuid4().hex
        token = collate.token  # this iteration's, even if another iteration of this loader starts meanwhile
        pin = self.pin_memory and torch.accelerator.is_available()  # as DataLoader decides it
        try:
            for batch in super().__iter__():
                if isinstance(batch, _SlabBatch):  # 0 workers: nothing was pickled
                    batch = batch.decode()
                    if pin:
                        batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                yield batch
        finally:
            if per_iteration:
                _forget_slabs(token)
