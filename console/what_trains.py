"""What trains when, shown without touching the model: --print-schedule's rows and table (print_schedule_only: the
trainers' --print-schedule, the model built on the meta device), and the line a run prints when its trainable set
changes (trainable_line).

Not on the reading path: freeze.py decides which parameters train (Schedule.trainable_layers, freeze.trains);
this module only counts and words it, for a person checking a schedule before paying for a run.
"""

from __future__ import annotations

import argparse
import json
from typing import Callable

import torch
import torch.nn as nn

import freeze
from freeze import LayerLayout, Schedule


def _row(located, layout: LayerLayout, schedule: Schedule, epoch: int, step: int) -> dict:
    layers = schedule.trainable_layers(epoch, step)
    train_modules, frozen_modules = set(), set()
    counts = {True: 0, False: 0}
    for _, p, layer, module in located:
        t = freeze.trains(layer, module, set(layers), layout, schedule)
        if layer is None:
            (train_modules if t else frozen_modules).add(module)
        counts[t] += p.numel()
    row = {
        "epoch": epoch + 1,
        "stage": schedule.stage(epoch, step),
        "trainable_layers": layers,
        "frozen_layers": [i for i in range(schedule.num_layers) if i not in layers],
        "always_trainable": sorted(train_modules),
        "frozen_modules": sorted(frozen_modules),
        "embeddings_trainable": not any(m in frozen_modules for m in layout.embedding_modules),
        "trainable_params": counts[True],
        "frozen_params": counts[False],
    }
    if schedule.policy == "top":
        row["task_head_modules"] = sorted(m for m in layout.task_head_modules if m in train_modules)
    if schedule.policy == "llrd":
        row["layer_lr_scale"] = [schedule.layer_lr_scale(i, None) for i in range(schedule.num_layers)]
        row["embedding_lr_scale"] = schedule.llrd_decay**schedule.num_layers
    return row


def describe_schedule(
    model: nn.Module, layout: LayerLayout, schedule: Schedule, epochs: int, steps_per_epoch: int | None = None
) -> list[dict]:
    """What trains when, without touching the model. One row per epoch (1-based "epoch").

    With unfreeze_unit == "step" (needs steps_per_epoch) an epoch in which the trainable set changes
    gets one row per stage it spans, each with "first_step"/"last_step" (global, 0-based, inclusive);
    with unit epoch every row covers its whole epoch (first/last_step given when steps_per_epoch is)."""
    freeze.check_layout(layout, schedule)
    located = freeze.locate(model, layout)
    rows = []
    for epoch in range(epochs):
        if schedule.unfreeze_unit == "step" and schedule.policy == "suf":
            if not steps_per_epoch or steps_per_epoch <= 0:
                raise ValueError("describe_schedule: --unfreeze-unit step needs steps_per_epoch > 0")
            start, end = epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch  # end exclusive
            s = start
            while s < end:
                nxt = min(end, (schedule.stage(epoch, s) + 1) * schedule.unfreeze_every)
                if len(schedule.trainable_layers(epoch, s)) == schedule.num_layers:
                    nxt = end  # fully unfrozen: nothing changes any more
                rows.append({**_row(located, layout, schedule, epoch, s), "first_step": s, "last_step": nxt - 1})
                s = nxt
        else:
            row = _row(located, layout, schedule, epoch, 0)
            if steps_per_epoch:
                row.update(first_step=epoch * steps_per_epoch, last_step=(epoch + 1) * steps_per_epoch - 1)
            rows.append(row)
    return rows


def _span(ls: list[int], dash: str = "\u2013") -> str:
    """Layer ids as text: "none", "7", "6\u201311" (a run: `dash` between its ends) or "0,2,5"."""
    if len(ls) <= 1:
        return str(ls[0]) if ls else "none"
    return f"{ls[0]}{dash}{ls[-1]}" if ls == list(range(ls[0], ls[-1] + 1)) else ",".join(map(str, ls))


def trainable_summary(model: nn.Module, layout: LayerLayout, schedule: Schedule, epoch: int, step: int = 0) -> str:
    """One line for the console: "layers 6\u201311 + embeddings, head train; 97.3M trainable" (what trains at
    epoch/step by the schedule, whether or not apply_schedule has run)."""
    freeze.check_layout(layout, schedule)
    r = _row(freeze.locate(model, layout), layout, schedule, epoch, step)
    layers = r["trainable_layers"]
    what = (
        "all layers" if len(layers) == schedule.num_layers else f"layer{'s' if len(layers) > 1 else ''} {_span(layers)}"
    )
    others = ", ".join(r["always_trainable"])
    frozen = f" ({', '.join(r['frozen_modules'])} frozen)" if r["frozen_modules"] else ""
    return (
        f"{what}{' + ' + others if others else ''} train{frozen}; "
        f"{_count(r['trainable_params'])} trainable of {_count(r['trainable_params'] + r['frozen_params'])}"
    )


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else (f"{n / 1e3:.1f}k" if n >= 1e3 else str(n))


def format_schedule(rows: list[dict]) -> str:
    """Human-readable table of describe_schedule rows (for --print-schedule)."""
    lines = []
    head = next((r["task_head_modules"] for r in rows if "task_head_modules" in r), None)
    if head is not None:
        lines.append(
            f"policy top: only the top layers and the task head ({', '.join(head) or 'none'}) train; "
            "everything else is frozen. The task head trains so that the task has an output (our choice: "
            "the paper says only the top layers train)"
        )
    for r in rows:
        steps = f" steps {r['first_step']}-{r['last_step']}" if "first_step" in r else ""
        line = (
            f"epoch {r['epoch']}{steps}: layers {_span(r['trainable_layers'], '-')} + "
            f"{', '.join(r['always_trainable']) or 'nothing else'}"
            f"{' (frozen: ' + ', '.join(r['frozen_modules']) + ')' if r['frozen_modules'] else ''}; "
            f"embeddings {'train' if r['embeddings_trainable'] else 'FROZEN'}; "
            f"{r['trainable_params']:,} trainable / {r['frozen_params']:,} frozen params"
        )
        if "layer_lr_scale" in r:
            line += (
                f"; lr scale bottom..top {r['layer_lr_scale'][0]:.4g}..{r['layer_lr_scale'][-1]:.4g}, "
                f"embeddings {r['embedding_lr_scale']:.4g}"
            )
        lines.append(line)
    return "\n".join(lines)


def trainable_line(
    model: nn.Module, layout: freeze.LayerLayout, schedule: freeze.Schedule, epoch: int, step: int, steps_per_epoch: int
) -> str:
    """ "epoch 2: layers 6-11 + embeddings, head train; 97.3M trainable" (printed when the trainable set changes)."""
    where = f"epoch {epoch + 1}" + (f", step {step}" if step % steps_per_epoch else "")
    return f"{where}: {trainable_summary(model, layout, schedule, epoch, step)}"


def two_image_rows(model: nn.Module, layout: LayerLayout, rows: list[dict]) -> str:
    """A model that reads an example's images one at a time (MaRVL: `images_per_example` 2) runs every layer
    once per image with one set of weights: layer j is still one layer (frozen in both passes or training on the
    sum of both passes' gradients). Adds that to the rows; returns the sentence for the table."""
    n = getattr(model, "images_per_example", 1)
    if n == 1:
        return ""
    head = sorted(
        {name.split(".")[0] for name, _, _, m in freeze.locate(model, layout) if m in layout.task_head_modules}
    )
    for r in rows:
        r.update(passes_per_layer=n, task_head=head)
    return (
        f"{n} images per example: every layer runs once per image with the same weights (layer j is one layer: "
        f"frozen in every pass, or trained on the sum of their gradients); task head: {', '.join(head)}\n"
    )


def print_schedule(model, layout, schedule, args, steps_per_epoch: int | None = None) -> None:
    rows = describe_schedule(model, layout, schedule, args.epochs, steps_per_epoch)
    note = two_image_rows(model, layout, rows)
    print(json.dumps(rows, indent=1) if args.json else note + format_schedule(rows), flush=True)


def print_schedule_only(
    build_model: Callable[[str, dict], nn.Module],
    config: dict,
    layout: freeze.LayerLayout,
    schedule: freeze.Schedule,
    args: argparse.Namespace,
    count_train: Callable[[], int],
    data_hint: str = "--data-root",
) -> None:
    """The trainers' --print-schedule: no weights, the model built on the meta device (instant even for
    base). Only a step-unit SUF schedule needs the data: count_train() = training examples."""
    steps = None
    if schedule.policy == "suf" and schedule.unfreeze_unit == "step":
        if not args.data_root:
            raise SystemExit(f"error: --print-schedule with --unfreeze-unit step needs {data_hint} (steps per epoch)")
        steps = count_train() // args.batch_size
        steps = min(steps, args.max_steps_per_epoch) if args.max_steps_per_epoch else steps
    with torch.device("meta"):
        model = build_model(args.task, config)
    print_schedule(model, layout, schedule, args, steps)
