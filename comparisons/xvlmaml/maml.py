"""XVL-MAML (Hu et al., "Meta-learning for vision-and-language cross-lingual transfer", arXiv 2305.14843)
as a small pure piece: the contrastive head and loss, the inner update and the meta-gradient.

Nothing here knows UC2, data or files: a model is reached only through an Objective, a function
(params, batch) -> scalar loss (module_objective wraps an nn.Module with torch.func.functional_call).
xvlmaml.py wires it to UC2 and IGLUE.

The algorithm (the seed summary's "critical path"; loop structure as in cross-lingual MAML, X-MAML):
  for every episode (a support and a query batch of the auxiliary language):
    theta' = theta - alpha * grad L_inner(support; theta)        (inner_steps times; plain SGD)
    meta-loss = L_outer(query; theta')
  theta <- outer optimizer step on the mean over episodes of d meta-loss / d theta
Second order differentiates through the inner gradient (grad of grad, torch.func.grad nested);
first order (FOMAML) treats the inner gradient as a constant, so d meta-loss/d theta = grad L_outer(theta').

The losses of each loop per variant (VARIANT_TERMS; the seed: "unsupervised contrastive MAML: only
contrastive loss in MAML, no task labels", "full: combine task loss and contrastive loss", "supervised
setting where labels of data in the auxiliary language are available"):
  unsupervised  inner: contrastive (support)   outer: contrastive (query)
  full          inner: contrastive (support)   outer: task loss on a labelled ENGLISH batch + contrastive (query)
  supervised    inner: contrastive (support)   outer: task loss on the auxiliary query (its labels) + contrastive
Our choices where the seed is silent (README "XVL-MAML" choices table): the task loss of "full" uses
English (source) labels, since the zero-shot setting has no auxiliary labels; the inner loss is
contrastive only in every variant (--inner-terms adds the auxiliary task loss); the contrastive loss is
the symmetric (image->text and text->image) InfoNCE over in-batch pairs, with cosine similarity and a
fixed temperature 0.07 and 256-d projections (ALBEF/CLIP's usual values); pairs sharing an image are
not used as each other's negatives (mask_same_image).

Off the reading path: a comparison system (comparisons/README.md); nothing on the card imports it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad

Params = dict[str, torch.Tensor]
Objective = Callable[[Params, object], torch.Tensor]  # (params by name, batch) -> scalar loss

VARIANTS = ("unsupervised", "full", "supervised")
TERMS = ("cl", "task_aux", "task_en")
# (inner-loop terms, outer-loop terms) per variant
VARIANT_TERMS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "unsupervised": (("cl",), ("cl",)),
    "full": (("cl",), ("task_en", "cl")),
    "supervised": (("cl",), ("task_aux", "cl")),
}


@dataclass(frozen=True)
class MamlConfig:
    variant: str = "full"
    inner_lr: float = 1e-4  # alpha (seed silent; our choice)
    inner_steps: int = 1  # seed silent; MAML's and X-MAML's usual single step
    first_order: bool = False  # seed silent; MAML proper is second order
    cl_weight: float = 1.0  # lambda on the contrastive loss ("adding them together": 1)
    inner_terms: tuple[str, ...] | None = None  # None: the variant's (VARIANT_TERMS)
    outer_terms: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown XVL-MAML variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if self.inner_steps < 0:
            raise ValueError(f"--inner-steps must be >= 0, got {self.inner_steps}")
        if self.inner_lr < 0:
            raise ValueError(f"--inner-lr must be >= 0, got {self.inner_lr}")
        for name in ("inner_terms", "outer_terms"):
            terms = getattr(self, name)
            if terms is not None and (not terms or any(t not in TERMS for t in terms)):
                raise ValueError(
                    f"--{name.replace('_', '-')} must be a non-empty subset of {', '.join(TERMS)}, got {terms}"
                )
        if self.variant == "unsupervised" and any(t.startswith("task") for t in self.inner + self.outer):
            raise ValueError("variant unsupervised uses no task labels; a task term needs variant full or supervised")
        if "task_aux" in self.inner + self.outer and self.variant != "supervised":
            raise ValueError("task_aux uses auxiliary-language labels: that is variant supervised")

    @property
    def inner(self) -> tuple[str, ...]:
        return tuple(self.inner_terms) if self.inner_terms is not None else VARIANT_TERMS[self.variant][0]

    @property
    def outer(self) -> tuple[str, ...]:
        return tuple(self.outer_terms) if self.outer_terms is not None else VARIANT_TERMS[self.variant][1]

    def to_dict(self) -> dict:
        return {**asdict(self), "inner_terms": list(self.inner), "outer_terms": list(self.outer)}


# ---------------------------------------------------------------- contrastive head and loss


def contrastive_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    temperature: float,
    groups: torch.Tensor | None = None,
    symmetric: bool = True,
    text_groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE over a batch of N (image, text) pairs: pair i is the positive of row/column i, every other
    pair in the batch a negative. Cosine similarity / temperature; symmetric: mean of the image->text and
    text->image cross-entropies (else image->text only). groups [N] (optional): pairs with equal ids
    share an image and are then not each other's negatives (masked out, not counted as positives); text_groups
    [N] (optional) the same for pairs whose texts are equal (MaRVL / NLVR2: one statement for a set of image
    pairs)."""
    if image.shape != text.shape or image.dim() != 2:
        raise ValueError(
            f"contrastive_loss: image {tuple(image.shape)} and text {tuple(text.shape)} must both be [N, d]"
        )
    # Under autocast (--amp bf16) the projections run in bf16 but the similarities do not: bf16 keeps 8
    # significant bits, so cos / 0.07 (up to |14.3|) would be rounded in steps of up to 1/16, which the softmax
    # reads as odds x1.06. Cast up, autocast off for this matmul (N x N x d flops); cross_entropy is float32
    # under autocast by itself (on its float32 list), so it needs no cast of ours.
    up = torch.promote_types(image.dtype, torch.float32)  # float32, or float64 where given (the exact tests)
    with torch.autocast(image.device.type, enabled=False):
        logits = F.normalize(image.to(up), dim=-1) @ F.normalize(text.to(up), dim=-1).T / temperature
    if groups is not None or text_groups is not None:
        same = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
        for g in (x for x in (groups, text_groups) if x is not None):
            same |= g[:, None] == g[None, :]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(logits.shape[0], device=logits.device)
    i2t = F.cross_entropy(logits, target)
    return (i2t + F.cross_entropy(logits.T, target)) / 2 if symmetric else i2t


class ContrastiveHead(nn.Module):
    """Separate linear projections of image and text embeddings into one space, and the temperature
    (fixed, our choice: the seed names a temperature but not whether it is learnt)."""

    def __init__(self, dim_in: int, dim_out: int = 256, temperature: float = 0.07, symmetric: bool = True):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"--cl-temperature must be > 0, got {temperature}")
        self.image_proj = nn.Linear(dim_in, dim_out)
        self.text_proj = nn.Linear(dim_in, dim_out)
        self.temperature, self.symmetric = temperature, symmetric

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        groups: torch.Tensor | None = None,
        text_groups: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return contrastive_loss(
            self.image_proj(image), self.text_proj(text), self.temperature, groups, self.symmetric, text_groups
        )


def groups_of(rows: torch.Tensor) -> torch.Tensor:
    """Group id per row of [N, ...]: equal rows (e.g. the region features of one image) share an id."""
    return torch.unique(rows.flatten(1), dim=0, return_inverse=True)[1]


# ---------------------------------------------------------------- inner update and meta-gradient


def module_objective(module: nn.Module, **kwargs) -> Objective:
    """(params, batch) -> module(batch, **kwargs) with `params` (a subset of its parameters, by name)
    swapped in; parameters not given (frozen ones) are used as they are."""

    def objective(params: Params, batch) -> torch.Tensor:
        return functional_call(module, params, (batch,), kwargs)

    return objective


def adapt(
    inner: Objective, params: Params, support, adapt_names: Sequence[str], lr: float, steps: int, first_order: bool
) -> Params:
    """The inner loop: `steps` SGD steps of `inner` on `support`, on the parameters named in adapt_names
    (the rest of `params` enter unchanged). Returns the temporary parameters theta' (all of `params`).
    Under an enclosing torch.func.grad the result stays differentiable in params: second order through
    the inner gradient; first order detaches it (theta' = theta - alpha * stop_grad(g))."""
    fast = dict(params)
    for _ in range(steps):
        sub = {n: fast[n] for n in adapt_names}
        rest = {n: t for n, t in fast.items() if n not in sub}
        g = grad(lambda s: inner({**rest, **s}, support))(sub)
        fast.update({n: sub[n] - lr * (g[n].detach() if first_order else g[n]) for n in adapt_names})
    return fast


def episode_meta_loss(
    inner: Objective, outer: Objective, params: Params, support, query, adapt_names: Sequence[str], cfg: MamlConfig
) -> torch.Tensor:
    """L_outer(query; theta') with theta' = adapt(...) from params: a function of params whose
    torch.func.grad is the episode's meta-gradient."""
    fast = adapt(inner, params, support, adapt_names, cfg.inner_lr, cfg.inner_steps, cfg.first_order)
    return outer(fast, query)


def meta_gradient(
    inner: Objective,
    outer: Objective,
    params: Params,
    episodes: Iterable[tuple[object, object]],
    adapt_names: Sequence[str],
    cfg: MamlConfig,
    scale: float = 1.0,
) -> tuple[Params, list[float]]:
    """Sum over episodes of scale * d L_outer(query; theta'(theta)) / d theta, one episode at a time (only
    one episode's graph alive), and each episode's meta-loss. params: the meta-parameters (trainable),
    detached or not; the result holds one gradient per name in params."""
    unknown = [n for n in adapt_names if n not in params]
    if unknown:
        raise ValueError(f"adapt_names not among the meta-parameters: {unknown[:3]}")
    leaves = {n: p.detach() for n, p in params.items()}

    def loss_of(ps: Params, support, query):
        loss = episode_meta_loss(inner, outer, ps, support, query, adapt_names, cfg)
        return loss * scale, loss.detach()

    total: Params = {n: torch.zeros_like(p) for n, p in leaves.items()}
    losses = []
    for support, query in episodes:
        g, loss = grad(loss_of, has_aux=True)(leaves, support, query)
        for n in total:
            total[n] += g[n]
        losses.append(loss.item())
    return total, losses


def accumulate_grads(named: Mapping[str, nn.Parameter], grads: Params) -> None:
    """p.grad += grads[name] (p.grad None -> the gradient itself)."""
    for n, g in grads.items():
        p = named[n]
        p.grad = g.clone() if p.grad is None else p.grad + g


def adapt_names_for(
    names: Sequence[str],
    layer_of: Callable[[str], int | None],
    num_layers: int,
    inner_params: str,
    top_layers: int,
    is_embedding: Callable[[str], bool] = lambda name: False,
) -> list[str]:
    """Which meta-parameters the inner loop adapts. all: every trainable one (MAML proper; our default);
    top: only those in the top `top_layers` encoder layers and the non-layer modules that are not
    embeddings (heads, pooler, contrastive projections): a cheaper inner loop; the others enter theta'
    unchanged but still get outer gradients."""
    if inner_params == "all":
        return list(names)
    if inner_params != "top":
        raise ValueError(f"--inner-params must be all or top, got {inner_params!r}")
    if not 0 < top_layers <= num_layers:
        raise ValueError(f"--inner-top-layers must be in 1..{num_layers}, got {top_layers}")
    keep = []
    for n in names:
        layer = layer_of(n)
        if (layer is None and not is_embedding(n)) or (layer is not None and layer >= num_layers - top_layers):
            keep.append(n)
    return keep
