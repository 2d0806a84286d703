"""X2-VLM's stochastic depth drawn as its ViT draws it, so that a seeded run's masks are X2-VLM's.

X2-VLM's BEiT-2 (models/beit2.py, DropPath -> timm 0.4.9's drop_path) draws one torch.rand per sample and keeps it
where keep_prob + u floors to 1; timm 1.x's DropPath has the same distribution but draws with bernoulli_, which
consumes torch's generator differently: under one seed its masks, and every dropout mask of the text and cross
encoders drawn after them, differ from X2-VLM's (tests/test_train_step_parity.py, docs/choices.md).

Not on the reading path: train_cclm.VisionEncoder calls use_reference_draws once when it is built.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class DropPath(nn.Module):
    """Per-sample residual drop with probability p, in training only: x / keep_prob * floor(keep_prob + u)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
        return x.div(keep) * mask.floor_()

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_reference_draws(vit: nn.Module) -> None:
    """Every timm BEiT block's drop_path1 / drop_path2 with a rate (timm's DropPath) -> DropPath at that rate;
    the rate-0 ones (nn.Identity: block 0 of the linear rule) stay."""
    for block in vit.blocks:
        for name in ("drop_path1", "drop_path2"):
            rate = getattr(getattr(block, name), "drop_prob", None)
            if rate is not None:
                setattr(block, name, DropPath(rate))
