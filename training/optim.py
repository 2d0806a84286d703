"""AdamW's update (`--adamw reference|torch`): the references' AdamW on top of torch's (fused) AdamW.

The references' AdamW (pytorch-transformers' `AdamW(correct_bias=True)`, which IGLUE ran for UC2; transformers'
`AdamW`, which X2-VLM ran for CCLM) differs from torch.optim.AdamW in two places:

* eps is added to sqrt(v) BEFORE the bias correction:
      p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)  =  lr * m_hat / (sqrt(v_hat) + eps / sqrt(1 - b2^t))
  (torch: lr * m_hat / (sqrt(v_hat) + eps)), so torch's AdamW with eps / sqrt(1 - b2^t) as the eps of a parameter's
  t-th update takes the references' step (t: that parameter's own update count, torch's state["step"] + 1);
* the decoupled weight decay comes AFTER the Adam update, p <- (p - u)(1 - lr wd) (torch: before, p (1 - lr wd) - u):
  torch's AdamW with lr' = lr (1 - lr wd) and weight decay wd' = wd / (1 - lr wd) gives exactly that.

engine.build_optimizer marks the param groups (`set_update`), engine.optimizer_step runs the update inside
`reference_update`, which sets those three settings of each marked group for the step and restores them after.
"""

from __future__ import annotations

import argparse
import math
from contextlib import contextmanager

import torch

VARIANTS = {
    "reference": "the references' AdamW (IGLUE's UC2: pytorch-transformers; X2-VLM: transformers): eps added to "
    "sqrt(v) before the bias correction, i.e. eps / sqrt(1 - beta2^t) at a parameter's t-th update (32x --adam-eps "
    "at step 1 with beta2 0.999), weight decay applied after the Adam update",
    "torch": "torch.optim.AdamW's: eps added after the bias correction (the same at every step), weight decay "
    "applied before the Adam update",
}
# A param group of an --adamw reference optimizer carries its eps (--adam-eps) under this key; the mark is saved in
# the optimizer's state_dict, so a checkpoint resumes with the update it ran.
EPS_KEY = "eps_before_bias_correction"
# What a run saved before an option existed ran (check_resume_args sets it when the run's saved arguments lack it).
BEFORE_THE_OPTION = {"adamw": "torch"}


def add_arg(group: argparse._ArgumentGroup, default: str) -> None:
    """--adamw, with `default` (the trainers: reference; a comparison system: what its source ran)."""
    shown = "; ".join(f"{k}: {v}" for k, v in VARIANTS.items())
    group.add_argument("--adamw", choices=tuple(VARIANTS), default=default, help=f"{shown} (default: {default})")


def set_update(optimizer: torch.optim.Optimizer, variant: str) -> None:
    """Marks every param group of a freshly built AdamW for `variant` "reference" (none for "torch")."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown AdamW variant {variant!r} (have: {', '.join(VARIANTS)})")
    if variant == "reference":
        for group in optimizer.param_groups:
            group[EPS_KEY] = group["eps"]


def step_counts(optimizer: torch.optim.Optimizer) -> list[list[int]]:
    """Per param group (marked or not), the update count of each parameter that has a gradient (the ones the next
    step updates), in the group's order; 0 for one never updated. One device-to-host copy for all of them."""
    stepping = [[p for p in g["params"] if p.grad is not None] for g in optimizer.param_groups]
    flat = [p for ps in stepping for p in ps]
    known = [(i, optimizer.state[p]["step"]) for i, p in enumerate(flat) if "step" in optimizer.state.get(p, {})]
    counts = [0] * len(flat)
    if known:
        values = torch.stack([torch.as_tensor(s).detach().reshape(()).double() for _, s in known]).tolist()
        for (i, _), v in zip(known, values):
            counts[i] = int(round(v))
    out, at = [], 0
    for ps in stepping:
        out.append(counts[at : at + len(ps)])
        at += len(ps)
    return out


def eps_at(group: dict, t: int) -> float:
    """The eps torch's AdamW needs at a parameter's t-th update to take the references' step."""
    return group[EPS_KEY] / math.sqrt(1.0 - group["betas"][1] ** t)


def _decay_after(group: dict) -> None:
    """lr, weight decay of a step that decays after the Adam update (module docstring)."""
    lr, wd = group["lr"], group["weight_decay"]
    group["lr"], group["weight_decay"] = lr * (1.0 - lr * wd), wd / (1.0 - lr * wd)


@contextmanager
def reference_update(optimizer: torch.optim.Optimizer):
    """Around optimizer.step(): each marked group's eps for the update its parameters are about to take, and the
    decay after the update; the groups' settings restored after. Within a group every parameter normally has the
    same count (freeze.param_groups: one group per layer or module, and a layer or module starts and stops training
    as a whole: tests/test_adamw_variant.py); a group whose stepping parameters differ (one without a gradient on
    some steps) steps as one temporary group per count. Unmarked groups (--adamw torch, another optimizer) are
    untouched."""
    groups = optimizer.param_groups
    if not any(EPS_KEY in g for g in groups):
        yield
        return
    saved = [(g, g["lr"], g["weight_decay"]) for g in groups if EPS_KEY in g]
    split = []
    for g, counts in zip(groups, step_counts(optimizer)):
        distinct = sorted(set(counts)) if EPS_KEY in g else []
        if EPS_KEY in g:
            _decay_after(g)
        if len(distinct) == 1:
            g["eps"] = eps_at(g, distinct[0] + 1)
        if len(distinct) <= 1:
            split.append(g)
            continue
        stepping = [p for p in g["params"] if p.grad is not None]
        for c in distinct:  # a temporary group per count: the same settings (lr, decay, betas), its own eps
            split.append({**g, "params": [p for p, n in zip(stepping, counts) if n == c], "eps": eps_at(g, c + 1)})
    optimizer.param_groups = split
    try:
        yield
    finally:
        optimizer.param_groups = groups
        for g, lr, wd in saved:
            g["lr"], g["weight_decay"] = lr, wd


def as_before_the_option(args: argparse.Namespace, saved: dict) -> None:
    """--resume of a run saved before an option existed: the option takes the value that run ran with."""
    for key, value in BEFORE_THE_OPTION.items():
        if key not in saved and hasattr(args, key):
            setattr(args, key, value)
