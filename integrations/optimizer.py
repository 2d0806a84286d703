"""The optimizer scheduled unfreezing needs: AdamW over EVERY parameter, frozen ones included, built once
(freeze.param_groups: one group per layer/module and decay, LLRD's and lr_mult's rates already in each group's lr).
A parameter frozen by requires_grad gets no .grad, and torch's AdamW skips it: no update, no weight decay, no state;
once unfrozen it trains with its group's lr. Hugging Face's Trainer.create_optimizer, and the usual
`AdamW(p for p in model.parameters() if p.requires_grad)`, leave out what is frozen at the start, so the layers a
schedule unfreezes later would never train."""

from __future__ import annotations

import torch
import torch.nn as nn

import freeze


def suf_optimizer(
    model: nn.Module,
    layout: freeze.LayerLayout,
    schedule: freeze.Schedule,
    lr: float,
    weight_decay: float = 0.0,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    **groups_kw,
) -> torch.optim.AdamW:
    """groups_kw: freeze.param_groups' module_lr, no_decay (default: no decay on 1-D tensors), lr_mult."""
    groups = freeze.param_groups(model, layout, schedule, lr, weight_decay, **groups_kw)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
