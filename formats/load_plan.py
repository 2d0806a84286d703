"""Load plans: how a checkpoint's keys become a model's state. A reference format's rule table (formats/volta.py,
formats/x2vlm.py) or plan_same_names fills a LoadPlan, finish_load_plan completes and checks it against the
model's shapes, apply_load_plan carries it out, LoadPlan.report() says what happened to every key.

Not on the reading path: a trainer loads a released checkpoint with one call that returns its plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn


def check_checkpoint_model(meta: dict | None, model_name: str, path) -> None:
    """Our checkpoints name their model: one of another model is refused (ValueError) before keys are compared."""
    if meta and meta.get("model") not in (None, model_name):
        raise ValueError(
            f"checkpoint {path} holds a {meta['model']} model, not {model_name}; give a {model_name} checkpoint"
        )


@dataclass
class LoadPlan:
    """How a checkpoint's keys become a model's state. A trainer's rule table fills it (train_uc2.plan_load,
    train_cclm.plan_pretrained), finish_load_plan completes it, apply_load_plan carries it out, report() says
    what happened to every key. `copy`: our key -> (source key, how); how "full" = the tensor as it is, any other
    name = a transform the trainer gives apply_load_plan (and, for its shape check, finish_load_plan)."""

    fmt: str
    source: str = ""
    copy: dict[str, tuple[str, str]] = field(default_factory=dict)
    aliases: list[tuple[str, str]] = field(default_factory=list)  # (source key, key it duplicates)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (source key, reason)
    initialised: list[tuple[str, str]] = field(default_factory=list)  # (our key, how/why): keeps the model's value
    constant: dict[str, float] = field(default_factory=dict)  # our key -> fill value
    missing: list[str] = field(default_factory=list)  # our keys with no source: error
    unexpected: list[str] = field(default_factory=list)  # source keys we cannot place: error
    mismatched: list[str] = field(default_factory=list)  # shape errors, readable
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def report(self, verbose: bool = False) -> str:
        lines = [
            f"checkpoint {self.source or '(in memory)'}: format {self.fmt}; {len(self.copy)} parameters loaded, "
            f"{len(self.aliases)} alias keys, {len(self.dropped)} dropped, {len(self.initialised)} initialised "
            f"fresh, {len(self.missing)} missing, {len(self.unexpected)} unexpected, {len(self.mismatched)} "
            "shape mismatches"
        ]
        lines += [f"  note: {n}" for n in self.notes]
        if verbose:
            lines += [
                f"  loaded   {dst} <- {src}{'' if how == 'full' else ' [' + how + ']'}"
                for dst, (src, how) in self.copy.items()
            ]
            lines += [f"  alias    {src} (same tensor as {of})" for src, of in self.aliases]
        lines += [f"  dropped  {k}: {why}" for k, why in self.dropped]
        lines += [f"  init     {k}: {why}" for k, why in self.initialised]
        lines += [f"  MISSING  {k}" for k in self.missing]
        lines += [f"  UNEXPECTED {k}" for k in self.unexpected]
        lines += [f"  SHAPE    {m}" for m in self.mismatched]
        return "\n".join(lines)

    def raise_if_bad(self) -> None:
        """ValueError naming the first missing / unexpected / mis-shaped key; the report follows its first line."""
        if not self.ok:
            first = (
                (self.missing and f"missing key {self.missing[0]!r}")
                or (self.unexpected and f"unexpected key {self.unexpected[0]!r}")
                or self.mismatched[0]
            )
            raise ValueError(
                f"{self.source or 'checkpoint'} ({self.fmt}): {first} "
                f"({len(self.missing)} missing, {len(self.unexpected)} unexpected, "
                f"{len(self.mismatched)} shape mismatches)\n{self.report()}"
            )


ShapeFits = Callable[[tuple, tuple], bool]  # (source shape, our shape) -> can `how` copy it


def finish_load_plan(
    plan: LoadPlan,
    source: dict[str, tuple],
    target: dict[str, tuple],
    fresh: Callable[[str], str | None] = lambda key: None,
    fits: dict[str, ShapeFits] | None = None,
) -> LoadPlan:
    """Complete a plan of `source` (key -> shape) into a model of `target` (key -> shape): an our-key the rules
    placed nowhere keeps its initial value if fresh(key) gives the reason, else it is missing; every copy is
    checked by shape (fits[how]; "full": equal shapes) and a copy to no key of ours is unexpected."""
    placed = set(plan.copy) | set(plan.constant) | {k for k, _ in plan.initialised}
    for k in target:
        if k not in placed:
            why = fresh(k)
            (plan.missing.append(k) if why is None else plan.initialised.append((k, why)))
    fits = {"full": lambda s, t: s == t, **(fits or {})}
    for dst, (src, how) in plan.copy.items():
        if dst not in target:
            plan.unexpected.append(src)
            continue
        s, t = tuple(source[src]), tuple(target[dst])
        if not fits[how](s, t):
            plan.mismatched.append(f"{src} {list(s)} -> {dst} {list(t)}")
    plan.copy = {d: v for d, v in plan.copy.items() if d in target}
    return plan


def plan_same_names(source: dict[str, tuple], target: dict[str, tuple], fmt: str, name: str = "") -> LoadPlan:
    """A checkpoint of the model's own layout (ours, or a fine-tuned reference one): every key copied as it is."""
    plan = LoadPlan(fmt, name)
    for k in source:
        (plan.copy.__setitem__(k, (k, "full")) if k in target else plan.unexpected.append(k))
    return finish_load_plan(plan, source, target)


Transform = Callable[[torch.Tensor, torch.Tensor], None]  # (our tensor, source tensor): writes ours in place


def apply_load_plan(
    model: nn.Module, state: dict[str, torch.Tensor], plan: LoadPlan, transforms: dict[str, Transform] | None = None
) -> None:
    """Carry out a checked plan in place: copies (cast to our dtype; how != "full" through transforms[how]) and
    constants. Keys the plan initialises keep the model's values."""
    plan.raise_if_bad()
    ours = model.state_dict()
    transforms = {"full": lambda dst, src: dst.copy_(src), **(transforms or {})}
    with torch.no_grad():
        for dst, (src, how) in plan.copy.items():
            transforms[how](ours[dst], state[src])
        for dst, value in plan.constant.items():
            ours[dst].fill_(value)
