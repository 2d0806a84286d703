"""The processes of a run and their devices: DistInfo (what engine.setup_distributed returns), what the ranks
exchange (shard / gather for evaluation, broadcast_object, gather_with_grad for CCLM's in-batch negatives), a
batch onto its device, autocast, and the DDP wrapper engine.train rebuilds whenever the trainable set changes.

Not on the reading path: engine.py's loop makes single calls here (torchtune keeps the same in its training/).
"""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as tdist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP


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


def _world_size() -> int:
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


class _GatherRows(torch.autograd.Function):
    """All ranks' rows in rank order (row counts may differ: padded to the largest, then cut).
    Backward sums every rank's gradient of the gathered tensor and returns this rank's rows: the
    ranks compute the same loss, so after DDP's averaging the gradient equals the 1-process one."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        n = torch.tensor([x.shape[0]], device=x.device)
        sizes = [torch.zeros_like(n) for _ in range(_world_size())]
        tdist.all_gather(sizes, n)
        sizes = [int(s) for s in sizes]
        pad = max(sizes) - x.shape[0]
        xp = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))]) if pad else x.contiguous()
        parts = [torch.empty_like(xp) for _ in sizes]
        tdist.all_gather(parts, xp)
        ctx.start, ctx.n = sum(sizes[: tdist.get_rank()]), x.shape[0]
        return torch.cat([t[:s] for t, s in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        tdist.all_reduce(grad)
        return grad[ctx.start : ctx.start + ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of x, differentiable: CCLM's in-batch negatives from every rank (X2-VLM's allgather;
    see _GatherRows for the gradient)."""
    return x if _world_size() == 1 else _GatherRows.apply(x)


def to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


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
