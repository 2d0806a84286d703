"""Which parameters train when: layer layouts, unfreezing schedules and optimizer param groups.

Policies (paper sections 3 and 5):
  full  everything trains from the start.
  suf   scheduled unfreezing: the top k encoder layers train in stage 0, k more (top-down) join
        in every later stage; a stage lasts `unfreeze_every` epochs or optimizer steps.
  llrd  everything trains; layer j (0 = bottom) gets lr * d^(N-1-j) (top layer: lr), the embedding
        modules lr * d^N (timm/BEiT: embeddings are "layer -1"), other modules lr undecayed.
  top   only the top m encoder layers and the layout's task head train, for the whole run; everything
        else (embeddings, CCLM's ViT, ...) is frozen: the paper's "CM only" (Table 2) with CCLM and m=6.
Under full/suf/llrd, parameters outside the encoder layers (heads, embeddings, CCLM's ViT and answer
decoder, ...) always train, except the layout's embedding modules under --freeze-embeddings.

The optimizer is built ONCE over every parameter (frozen ones included, see param_groups); freezing
only flips requires_grad (apply_schedule). Frozen parameters then get no .grad, and torch's AdamW
skips parameters without a gradient: no update, no weight decay, no optimizer state. Adding param
groups later would break LR schedulers and make optimizer checkpoints unloadable.

Choices where the paper is silent: LLRD gives the embedding modules lr*d^N (timm/BEiT) and every
other non-layer module its undecayed base lr; --freeze-embeddings applies under every policy;
suf_k > num_layers trains everything from the start; with --unfreeze-unit step, stages count
GLOBAL optimizer steps from the start of training; a stage that would pass the bottom layer
simply trains all layers. Under top, the task head (LayerLayout.task_head_modules: what must train
for the task to have an output, e.g. CCLM's randomly initialised XVNLI head or its xGQA answer
decoder) trains although the paper says only "the top 6 cross-modal layers" train.

What trains when, shown without touching the model (--print-schedule, the run's log): console/what_trains.py.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch.nn as nn

POLICIES = ("full", "suf", "llrd", "top")
UNITS = ("epoch", "step")


@dataclass(frozen=True)
class LayerLayout:
    num_layers: int  # encoder layers, 0 = bottom
    layer_of: Callable[[str], int | None]  # param name -> encoder layer id, None if not in a layer
    module_of: Callable[[str], str]  # param name (not in a layer) -> always-trainable module
    embedding_modules: tuple[str, ...] = ("embeddings",)  # frozen by --freeze-embeddings (ablation)
    task_head_modules: tuple[str, ...] = ("head",)  # the only non-layer modules policy top trains


@dataclass(frozen=True)
class Schedule:
    policy: str  # full | suf | llrd | top
    num_layers: int
    suf_k: int = 3  # layers unfrozen at start and per stage
    unfreeze_every: int = 1  # stage length ...
    unfreeze_unit: str = "epoch"  # ... in "epoch" or "step" (optimizer steps)
    top_layers: int = 6  # for policy top
    llrd_decay: float = 0.88  # for policy llrd
    freeze_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.num_layers <= 0:
            raise ValueError(f"num_layers must be > 0, got {self.num_layers}")
        if self.suf_k <= 0:
            raise ValueError(f"--suf-k must be > 0, got {self.suf_k}")
        if self.unfreeze_every <= 0:
            raise ValueError(f"--unfreeze-every must be > 0, got {self.unfreeze_every}")
        if self.unfreeze_unit not in UNITS:
            raise ValueError(f"--unfreeze-unit must be one of {', '.join(UNITS)}, got {self.unfreeze_unit!r}")
        if not 0.0 < self.llrd_decay <= 1.0:
            raise ValueError(f"--llrd-decay must be in (0, 1], got {self.llrd_decay}")
        if self.top_layers <= 0:
            raise ValueError(f"--top-layers must be > 0, got {self.top_layers}")
        # Only checked for policy top: the default m=6 must not break other policies on tiny models.
        if self.policy == "top" and self.top_layers > self.num_layers:
            raise ValueError(f"--top-layers {self.top_layers} exceeds the model's {self.num_layers} encoder layers")

    def stage(self, epoch: int, step: int = 0) -> int:
        """SUF stage (0-based). epoch: 0-based epoch; step: GLOBAL optimizer step since the start of
        training (0-based index of the step about to run), used only when unfreeze_unit == "step"."""
        if self.policy != "suf":
            return 0
        return (epoch if self.unfreeze_unit == "epoch" else step) // self.unfreeze_every

    def trainable_layers(self, epoch: int, step: int = 0) -> list[int]:
        n = self.num_layers
        if self.policy == "suf":
            # k > num_layers simply trains everything from the start (not an error: tiny models).
            n = min(self.num_layers, self.suf_k * (self.stage(epoch, step) + 1))
        elif self.policy == "top":
            n = self.top_layers
        return list(range(self.num_layers - n, self.num_layers))

    def layer_lr_scale(
        self, layer: int | None, module: str | None, embedding_modules: Sequence[str] = ("embeddings",)
    ) -> float:
        """LR multiplier of a parameter in encoder `layer`, or (layer None) in module `module`."""
        if self.policy != "llrd":
            return 1.0
        if layer is not None:
            return self.llrd_decay ** (self.num_layers - 1 - layer)
        if module in embedding_modules:
            return self.llrd_decay**self.num_layers
        return 1.0  # heads, ViT, answer decoder, pooler: undecayed

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- layouts


def layout_from_rules(
    num_layers: int,
    layer_rules: Sequence[tuple[str, int, int]],
    module_rules: Sequence[tuple[str, str]],
    default_module: str | None = None,
    embedding_modules: tuple[str, ...] = ("embeddings",),
    task_head_modules: tuple[str, ...] = ("head",),
) -> LayerLayout:
    """Build a LayerLayout from name prefixes.

    layer_rules: (prefix, offset, blocks_per_layer): a name `prefix + "<i>." + ...` belongs to layer
      offset + i // blocks_per_layer (blocks_per_layer=2 for VOLTA's split attention/FFN blocks).
    module_rules: (prefix, module): first matching prefix names the module of a non-layer parameter;
      default_module for the rest (None: an unmatched name is an error, so layouts stay complete).
    task_head_modules: modules the task needs to produce an output; under policy top nothing else
      outside the top layers trains.
    """
    compiled = [(re.compile(re.escape(p) + r"(\d+)\."), off, per) for p, off, per in layer_rules]

    def layer_of(name: str) -> int | None:
        for rx, off, per in compiled:
            m = rx.match(name)
            if m:
                return off + int(m.group(1)) // per
        return None

    def module_of(name: str) -> str:
        for prefix, module in module_rules:
            if name.startswith(prefix):
                return module
        if default_module is None:
            raise ValueError(f"freeze layout: parameter {name!r} is in no encoder layer and matches no module rule")
        return default_module

    return LayerLayout(num_layers, layer_of, module_of, tuple(embedding_modules), tuple(task_head_modules))


def locate(model: nn.Module, layout: LayerLayout) -> list[tuple[str, nn.Parameter, int | None, str | None]]:
    """(name, param, layer, module) for every parameter; checks the layout covers every layer."""
    out, seen = [], set()
    for name, p in model.named_parameters():
        layer = layout.layer_of(name)
        if layer is not None and not 0 <= layer < layout.num_layers:
            raise ValueError(
                f"freeze layout: parameter {name!r} maps to layer {layer}, outside 0..{layout.num_layers - 1}"
            )
        module = None if layer is not None else layout.module_of(name)
        seen.add(layer)
        out.append((name, p, layer, module))
    missing = [i for i in range(layout.num_layers) if i not in seen]
    if missing:
        raise ValueError(f"freeze layout: encoder layers {missing} have no parameters in {type(model).__name__}")
    return out


def check_layout(layout: LayerLayout, schedule: Schedule) -> None:
    """The schedule and the layout must count the same encoder layers."""
    if layout.num_layers != schedule.num_layers:
        raise ValueError(f"schedule is for {schedule.num_layers} layers but the layout declares {layout.num_layers}")


def trains(layer: int | None, module: str | None, layers: set[int], layout: LayerLayout, schedule: Schedule) -> bool:
    """Whether a parameter in encoder `layer` (or, layer None, in module `module`) trains while `layers` do."""
    if layer is not None:
        return layer in layers
    if schedule.policy == "top":
        return module in layout.task_head_modules
    return not (schedule.freeze_embeddings and module in layout.embedding_modules)


# ---------------------------------------------------------------- CLI


def add_policy_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("fine-tuning policy (freeze.py)")
    g.add_argument(
        "--policy",
        choices=POLICIES,
        default="full",
        help="full: standard fine-tuning; suf: scheduled unfreezing; llrd: layer-wise LR decay; "
        "top: only the top m layers and the task head train (CCLM m=6: the paper's 'CM only')",
    )
    g.add_argument(
        "--suf-k", type=int, default=3, help="suf: layers trainable at start and unfrozen per stage (paper: 3)"
    )
    g.add_argument(
        "--unfreeze-every", type=int, default=1, help="suf: stage length, in --unfreeze-unit (paper: 1 epoch)"
    )
    g.add_argument("--unfreeze-unit", choices=UNITS, default="epoch", help="suf: unit of --unfreeze-every")
    g.add_argument("--llrd-decay", type=float, default=0.88, help="llrd: decay factor d in (0, 1] (paper's best: 0.88)")
    g.add_argument(
        "--top-layers", type=int, default=6, help="top: number m of top encoder layers that train (CCLM cross-modal: 6)"
    )
    g.add_argument(
        "--freeze-embeddings",
        action="store_true",
        help="ablation: also freeze the embedding modules (the paper keeps them trainable)",
    )


def schedule_from_args(args: argparse.Namespace, num_layers: int) -> Schedule:
    try:
        return Schedule(
            policy=args.policy,
            num_layers=num_layers,
            suf_k=args.suf_k,
            unfreeze_every=args.unfreeze_every,
            unfreeze_unit=args.unfreeze_unit,
            top_layers=args.top_layers,
            llrd_decay=args.llrd_decay,
            freeze_embeddings=args.freeze_embeddings,
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


# ---------------------------------------------------------------- optimizer / freezing


def no_decay_ndim(name: str, p: nn.Parameter) -> bool:
    """The paper-recipe rule: no weight decay on 1-D (and 0-D) tensors: biases, LayerNorm weights, layer scales,
    temperatures. (CCLM's cls token and relative-position tables are not 1-D: decayed, as in X2-VLM.)"""
    return p.ndim <= 1


def param_groups(
    model: nn.Module,
    layout: LayerLayout,
    schedule: Schedule,
    lr: float,
    weight_decay: float,
    module_lr: dict[str, float] | None = None,
    no_decay: Callable[[str, nn.Parameter], bool] | None = None,
    lr_mult: Callable[[str], float] | None = None,
) -> list[dict]:
    """Param groups over EVERY parameter (frozen ones included), one per (layer/module, lr multiplier,
    decay), in order of first appearance. lr is absolute per group (a LambdaLR scales all groups alike).
    module_lr overrides the base lr of a non-layer module, e.g. CCLM {"vision_encoder": 2e-5}.
    no_decay(name, param) -> True exempts a parameter from weight decay (default no_decay_ndim;
    e.g. IGLUE/VOLTA's name-based rule for --recipe iglue, X2-VLM's for CCLM).
    lr_mult(name) -> factor on top of the (LLRD-scaled) base lr, e.g. X2-VLM's lr_mult 2 for newly
    initialised parameters; a parameter with factor != 1 gets its own group ("<unit>.lr_x2.decay")."""
    check_layout(layout, schedule)
    module_lr = module_lr or {}
    rule = no_decay or no_decay_ndim
    groups: dict[str, dict] = {}
    for name, p, layer, module in locate(model, layout):
        exempt = bool(rule(name, p))
        mult = float(lr_mult(name)) if lr_mult is not None else 1.0
        key = (
            (f"layer_{layer:02d}" if layer is not None else module)
            + (f".lr_x{mult:g}" if mult != 1.0 else "")
            + (".no_decay" if exempt else ".decay")
        )
        if key not in groups:
            base = lr if layer is not None else module_lr.get(module, lr)
            groups[key] = {
                "params": [],
                "name": key,
                "lr": base * mult * schedule.layer_lr_scale(layer, module, layout.embedding_modules),
                "weight_decay": 0.0 if exempt else weight_decay,
            }
        groups[key]["params"].append(p)
    return list(groups.values())


def apply_schedule(model: nn.Module, layout: LayerLayout, schedule: Schedule, epoch: int, step: int = 0) -> bool:
    """Set requires_grad for (0-based) epoch and global step; True iff the trainable set changed
    (the trainer must then re-wrap DDP)."""
    check_layout(layout, schedule)
    layers = set(schedule.trainable_layers(epoch, step))
    changed = False
    for _, p, layer, module in locate(model, layout):
        train = trains(layer, module, layers, layout, schedule)
        if p.requires_grad != train:
            p.requires_grad_(train)
            changed = True
        if not train:
            p.grad = None  # a stale gradient would let AdamW keep updating/decaying a frozen parameter
    return changed
