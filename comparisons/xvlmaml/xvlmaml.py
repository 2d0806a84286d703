"""XVL-MAML (Hu et al., arXiv 2305.14843) on UC2 and the IGLUE tasks: meta-train with one auxiliary
language's IGLUE few-shot/dev data, then evaluate zero-shot in every language (eval_zeroshot evaluate).
The algorithm itself is maml.py; this file wires it to UC2, IGLUE data, freeze policies and run folders.

  # continue an English-fine-tuned run (as `eval_zeroshot.py fewshot` does), auxiliary language German
  python -m comparisons.xvlmaml.xvlmaml train --run runs/uc2-xgqa-full --aux-lang de --features FEATS \
      --output-dir runs/uc2-xgqa-xvlmaml-de
  # or start from the pre-trained checkpoint
  python -m comparisons.xvlmaml.xvlmaml train --task xvnli --checkpoint uc2_checkpoint_200000.bin \
      --aux-lang fr --data-root DATA ...
  # auxiliary x target matrix (one run per auxiliary language, a table of target-language scores)
  python -m comparisons.xvlmaml.xvlmaml matrix --run runs/uc2-xgqa-full --aux-langs de pt ru \
      --output-dir runs/uc2-xgqa-xvlmaml

Data: the auxiliary pool is --aux-split of --aux-lang (default: its dev split if it has one, else its
largest few-shot train_<n>); a test split is refused (the target's test data is never trained on).
Each meta-iteration has --meta-batch episodes; episode e of iteration t draws its support and query
(disjoint) from np.random.default_rng([seed, t, e]) and seeds dropout from the same triple, so a run
is a function of (seed, iteration) only: bitwise-exact resume, and N processes (each takes its share of
the episodes whole, meta-gradients all-reduced) equal one process.

Run folder: args.json, metrics.jsonl, checkpoint_last.pt (engine's resume state, with the contrastive
head), model_final.pt (the UC2 task model as train_uc2 writes it, "cl_head" beside it, meta["xvlmaml"]),
results.json / IGLUE CSVs of the final zero-shot evaluation.

Off the reading path: a comparison system (comparisons/README.md); nothing on the card imports it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn
from tqdm import tqdm

import data
from formats import iglue_layout
from formats import readers
from checks import preflight
import engine
from console import cli
from training import after_epoch, devices, optim, progress
from formats import run_folder, tokenizer_check
import eval_zeroshot as Z
import freeze
import scoring.evaluate
import scoring.metrics
import train_uc2 as U
from comparisons.xvlmaml import maml as M
from formats import feature_sets, volta

CL_EMBEDS = ("separate", "joint")


INNER_PARAMS = ("all", "top")
# ============================================================================ model


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return ((1.0 - mask.to(dtype)) * -10000.0)[:, None, None, :]  # UC2.encode's (VOLTA's) key mask


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def positive_pairs(batch: dict, task: str = "") -> dict:
    """The (text, image) pairs of a batch: a grouped retrieval batch [B,4,...] keeps slot 0 (the positive); a marvl
    batch (VOLTA's nlvr layout: the caption twice [B,2,L], the two images [B,2,R,...]) pairs its caption (slot 0)
    with both images of the pair."""
    keys = ("input_ids", "attention_mask", "features", "spatials", "image_mask")
    if task == "marvl":
        return {**{k: batch[k][:, 0] for k in keys[:2]}, **{k: batch[k] for k in keys[2:]}}
    if batch["input_ids"].dim() == 3:
        return {k: batch[k][:, 0] for k in keys}
    return {k: batch[k] for k in keys}


def pair_embeddings(model: U.UC2, pairs: dict, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, text) embeddings [N, hidden] from single-stream UC2 (the seed is silent on how; our choice).
    separate (default): a text-only and an image-only pass through the shared encoder, text = the first
      token's final state, image = the mean of the valid regions' final states (no cross-modal leak, as
      the separate encoders of the contrastive models the seed describes); two extra encoder passes.
    joint: one joint pass over [text ; regions], the same two poolings of its states (cheaper; each
      embedding has already seen its own pair's other modality).
    Two images per text (marvl: features [N,2,R,F]): each image is pooled as above (joint: its own pass with the
    text, as the model's view(2B) rows) and the pair's image embedding is the mean of the two; the text embedding
    the mean over the two passes (separate: the same text-only state twice). Our choice: the seed does not say
    how XVL-MAML contrasts a statement with an image pair."""
    k = pairs["features"].shape[1] if pairs["features"].dim() == 4 else 1
    feats, spatials, image_mask = (
        pairs[x].flatten(0, 1) if k > 1 else pairs[x] for x in ("features", "spatials", "image_mask")
    )
    ids, att = (pairs[x].repeat_interleave(k, 0) for x in ("input_ids", "attention_mask"))
    text, image = model.embeddings(ids, feats, spatials)
    if mode == "separate":
        ht = model.encoder(text, _additive(att, text.dtype))
        hi = model.encoder(image, _additive(image_mask, image.dtype))
        img, txt = _masked_mean(hi, image_mask), ht[:, 0]
    elif mode == "joint":
        keep = torch.cat([att, image_mask], 1)
        h = model.encoder(torch.cat([text, image], 1), _additive(keep, text.dtype))
        img, txt = _masked_mean(h[:, text.shape[1] :], image_mask), h[:, 0]
    else:
        raise ValueError(f"--cl-embed must be one of {', '.join(CL_EMBEDS)}, got {mode!r}")
    if k > 1:
        img, txt = (x.view(-1, k, x.shape[-1]).mean(1) for x in (img, txt))
    return img, txt


class XVLModel(nn.Module):
    """UC2 task model + contrastive head. forward(batch, terms, cl_weight) -> the sum of the named loss
    terms: cl (contrastive, batch["aux"]), task_aux (task loss, batch["aux"]), task_en (batch["en"])."""

    def __init__(self, model: U.UC2, cl_head: M.ContrastiveHead, cl_embed: str, mask_same_image: bool = True):
        super().__init__()
        self.model, self.cl_head = model, cl_head
        self.cl_embed, self.mask_same_image = cl_embed, mask_same_image

    # parameters each loss term reads (by name prefix): the contrastive loss never reaches UC2's pooler
    # and task head, the task losses never reach the contrastive head
    TERM_PREFIXES = {
        "cl": ("model.embeddings.", "model.encoder.", "cl_head."),
        "task_aux": ("model.",),
        "task_en": ("model.",),
    }

    def used_by(self, name: str, terms: Sequence[str]) -> bool:
        return any(name.startswith(p) for t in terms for p in self.TERM_PREFIXES[t])

    def cl_loss(self, batch: dict) -> torch.Tensor:
        pairs = positive_pairs(batch, self.model.task)
        image, text = pair_embeddings(self.model, pairs, self.cl_embed)
        groups = M.groups_of(pairs["features"]) if self.mask_same_image else None  # marvl: the same image pair
        # marvl: NLVR2 and MaRVL write one statement for a set of image pairs; pairs sharing it are not negatives
        texts = M.groups_of(pairs["input_ids"]) if self.mask_same_image and self.model.task == "marvl" else None
        return self.cl_head(image.float(), text.float(), groups, texts)

    def forward(self, batch: dict, terms: Sequence[str] = ("cl",), cl_weight: float = 1.0) -> torch.Tensor:
        total = None
        for term in terms:
            loss = {
                "cl": lambda: cl_weight * self.cl_loss(batch["aux"]),
                "task_aux": lambda: self.model.loss(batch["aux"]),
                "task_en": lambda: self.model.loss(batch["en"]),
            }[term]()
            total = loss if total is None else total + loss
        return total


def xvl_layout(base: freeze.LayerLayout) -> freeze.LayerLayout:
    """UC2's layout under the "model." prefix; the contrastive head is a task head (it trains under every
    policy, top included: without it the contrastive loss has no output)."""

    def layer_of(name: str) -> int | None:
        return base.layer_of(name[len("model.") :]) if name.startswith("model.") else None

    def module_of(name: str) -> str:
        return base.module_of(name[len("model.") :]) if name.startswith("model.") else "cl_head"

    return freeze.LayerLayout(
        base.num_layers, layer_of, module_of, base.embedding_modules, tuple(base.task_head_modules) + ("cl_head",)
    )


# ============================================================================ episodes


def episode_rng(seed: int, iteration: int, episode: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, iteration, episode, stream])


def episode_indices(
    seed: int, iteration: int, episode: int, pool: int, support: int, query: int, en_pool: int = 0, en_batch: int = 0
) -> tuple[list[int], list[int], list[int]]:
    """(support, query, English) example indices of one episode: support and query disjoint draws from
    the auxiliary pool, the English batch (variant full) from the English training set; a function of
    (seed, iteration, episode) only."""
    idx = episode_rng(seed, iteration, episode, 0).choice(pool, support + query, replace=False).tolist()
    en = episode_rng(seed, iteration, episode, 1).choice(en_pool, en_batch, replace=False).tolist() if en_batch else []
    return idx[:support], idx[support:], en


def episode_seed(seed: int, iteration: int, episode: int) -> int:
    return int(episode_rng(seed, iteration, episode, 2).integers(2**62))


def my_episodes(meta_batch: int, dist: devices.DistInfo) -> range:
    """This rank's episodes of an iteration: a contiguous share, each episode whole on one rank."""
    per = meta_batch // dist.world
    return range(dist.rank * per, (dist.rank + 1) * per)


class Episodes:
    """Batches of the episodes of one iteration, on the device; re-seeds torch (dropout) per episode."""

    def __init__(self, args, aux_ds, en_ds, collate, device: torch.device):
        self.args, self.aux_ds, self.en_ds, self.collate, self.device = args, aux_ds, en_ds, collate, device

    def _batch(self, ds, idx: list[int]) -> dict:
        return devices.to_device(self.collate([ds[i] for i in idx]), self.device)

    def __call__(self, iteration: int, episodes: range) -> Iterator[tuple[dict, dict]]:
        a = self.args
        for e in episodes:
            s, q, en = episode_indices(
                a.seed,
                iteration,
                e,
                len(self.aux_ds),
                a.support_size,
                a.query_size,
                len(self.en_ds) if self.en_ds is not None else 0,
                a.en_batch_size if self.en_ds is not None else 0,
            )
            support, query = {"aux": self._batch(self.aux_ds, s)}, {"aux": self._batch(self.aux_ds, q)}
            if en:
                query["en"] = self._batch(self.en_ds, en)
            torch.manual_seed(episode_seed(a.seed, iteration, e))  # dropout of this episode (inside fork_rng)
            yield support, query


# ============================================================================ one meta-step


def meta_step(
    net: XVLModel,
    cfg: M.MamlConfig,
    episodes: Iterator[tuple[dict, dict]],
    n_total: int,
    adapt_names: Sequence[str],
    dist: devices.DistInfo,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> tuple[list[float], int]:
    """Meta-gradients of this rank's episodes into p.grad of the trainable parameters the losses read,
    summed over ranks and divided by the iteration's episode count (n_total). Returns (this rank's episode
    losses, number of non-finite ones). Under torch.random.fork_rng: the global torch stream is untouched.
    A trainable parameter no loss reads (the task head under variant unsupervised) gets no .grad at all:
    AdamW then skips it (a zero gradient would still apply weight decay to it). amp_dtype: autocast (--amp bf16)
    over both loops' forwards and the torch.func gradients through them; the meta-gradients stay float32."""
    terms = tuple(cfg.inner) + tuple(cfg.outer)
    trainable = {n: p for n, p in net.named_parameters() if p.requires_grad and net.used_by(n, terms)}
    adapt_names = [n for n in adapt_names if n in trainable]
    inner = M.module_objective(net, terms=cfg.inner, cl_weight=cfg.cl_weight)
    outer = M.module_objective(net, terms=cfg.outer, cl_weight=cfg.cl_weight)
    rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    with rng, _attention_for(cfg), devices.autocast(device, amp_dtype):
        grads, losses = M.meta_gradient(inner, outer, trainable, episodes, adapt_names, cfg, scale=1.0 / n_total)
    M.accumulate_grads(trainable, grads)
    if dist.distributed:
        all_reduce_grads([p for p in trainable.values()])
    return losses, sum(not math.isfinite(x) for x in losses)


def _attention_for(cfg: M.MamlConfig):
    """Second order differentiates attention twice; torch's fused SDPA kernels have no double backward,
    the math one has (same result up to rounding)."""
    from contextlib import nullcontext

    if cfg.first_order or cfg.inner_steps == 0:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def all_reduce_grads(params: list[nn.Parameter]) -> None:
    """Sum every rank's p.grad (one flat buffer, one collective)."""
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    tdist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


# ============================================================================ CLI


# The defaults synthetic/xvlmaml_study scales (the others are in their add_argument below).
DEFAULTS = {
    "epochs": 1,
    "iters_per_epoch": 500,
    "lr": 1e-5,
    "inner_lr": 1e-4,
    "support_size": 16,
    "query_size": 16,
    "en_batch_size": 32,
    "meta_batch": 1,
}


def add_train_args(p: argparse.ArgumentParser) -> None:
    i = p.add_argument_group("initial weights (one of)")
    i.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        default=None,
        help="English-fine-tuned run folder of train_uc2.py (model_final.pt): task and config from it",
    )
    i.add_argument(
        "--checkpoint",
        default=None,
        help="pre-trained UC2 checkpoint (any format train_uc2 reads); needs --task and --model-config",
    )
    i.add_argument("--task", choices=engine.TASKS, default=None)
    i.add_argument("--model-config", default="base", help="with --checkpoint: base | config json")
    a = p.add_argument_group("auxiliary language")
    a.add_argument("--aux-lang", required=True, help="auxiliary language whose IGLUE data the meta-training reads")
    a.add_argument(
        "--aux-split",
        default=None,
        help="its split (default: dev if it has one, else its largest few-shot train_<n>; never test)",
    )
    a.add_argument("--en-split", default="train", help="variant full: the English training split of the task loss")
    m = p.add_argument_group("XVL-MAML (maml.py)")
    m.add_argument("--variant", choices=M.VARIANTS, default="full")
    m.add_argument(
        "--inner-lr",
        type=float,
        default=DEFAULTS["inner_lr"],
        help="alpha, plain SGD (the paper gives none): 1e-4 moves UC2's weights by ~1e-5 of their norm, so the "
        "default is close to multi-task training on the outer losses; docs/xvlmaml.md#inner-step",
    )
    m.add_argument("--inner-steps", type=int, default=1)
    m.add_argument("--first-order", action="store_true", help="FOMAML: no gradient through the inner gradient")
    m.add_argument("--cl-weight", type=float, default=1.0, help="lambda on the contrastive loss")
    m.add_argument("--inner-terms", nargs="+", choices=M.TERMS, default=None, help="override the variant's inner loss")
    m.add_argument("--outer-terms", nargs="+", choices=M.TERMS, default=None, help="override the variant's outer loss")
    m.add_argument(
        "--cl-embed",
        choices=CL_EMBEDS,
        default="separate",
        help="UC2 image/text embeddings: separate text-only/image-only passes, or the joint pass",
    )
    m.add_argument("--cl-dim", type=int, default=256, help="projection size of the contrastive head")
    m.add_argument("--cl-temperature", type=float, default=0.07)
    m.add_argument("--cl-asymmetric", action="store_true", help="image->text InfoNCE only (default: symmetric)")
    m.add_argument(
        "--cl-keep-same-image",
        action="store_true",
        help="count pairs sharing an image as negatives (default: masked out)",
    )
    m.add_argument(
        "--inner-params",
        choices=INNER_PARAMS,
        default="all",
        help="all trainable parameters adapt in the inner loop, or only the top layers + heads",
    )
    m.add_argument("--inner-top-layers", type=int, default=3, help="--inner-params top: encoder layers adapted")
    m.add_argument("--support-size", type=int, default=DEFAULTS["support_size"])
    m.add_argument("--query-size", type=int, default=DEFAULTS["query_size"])
    m.add_argument("--en-batch-size", type=int, default=DEFAULTS["en_batch_size"], help="variant full: English batch")
    m.add_argument(
        "--meta-batch",
        type=int,
        default=DEFAULTS["meta_batch"],
        help="episodes per meta-update (a multiple of the process count)",
    )
    o = p.add_argument_group("outer optimisation")
    o.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="blocks of --iters-per-epoch meta-updates")
    o.add_argument("--iters-per-epoch", type=int, default=DEFAULTS["iters_per_epoch"])
    o.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="beta: AdamW's peak learning rate")
    o.add_argument("--weight-decay", type=float, default=0.01)  # the trainers' (engine.add_common_args)
    o.add_argument("--adam-eps", type=float, default=1e-8)
    o.add_argument("--adam-betas", type=float, nargs=2, default=[0.9, 0.999])
    optim.add_arg(o, "torch")  # --adamw; no public XVL-MAML code: torch's, as every run before the option
    o.add_argument("--warmup-ratio", type=float, default=0.1)
    o.add_argument("--clip-grad", type=float, default=0.0)
    o.add_argument("--max-nonfinite", type=int, default=20)
    o.add_argument("--dropout", type=float, default=None, help="override the model config's dropout")
    o.add_argument(
        "--amp",
        choices=("auto", "bf16", "fp16", "off"),
        default="auto",
        help="meta-training precision, as the trainers: auto = bf16 on GPUs that support it, else off (always off "
        "on CPU); fp16 is refused (see check_args)",
    )
    o.add_argument(
        "--eval-amp",
        choices=("off", "bf16", "fp16"),
        default="off",
        help="precision of the per-epoch and final evaluations (default float32)",
    )
    after_epoch.add_tf32_arg(o)
    r = p.add_argument_group("run")
    r.add_argument("--output-dir", required=True)
    r.add_argument("--resume", action="store_true")
    r.add_argument("--seed", type=int, default=42)
    r.add_argument("--log-every", type=int, default=50)
    r.add_argument("--data-root", default=None, help="IGLUE folder holding datasets/ (default: the run's)")
    r.add_argument("--features", nargs="+", default=None, help="region-feature files (default: the run's)")
    r.add_argument("--tokenizer", default=None, help="default: the run's")
    r.add_argument("--max-regions", type=int, default=None, help="default: the run's, else 36")
    r.add_argument("--eval-langs", nargs="+", default=None, help="final zero-shot evaluation (default: every language)")
    r.add_argument("--eval-batch-size", type=int, default=64)
    r.add_argument("--num-workers", type=int, default=0, help="evaluation loader workers")
    r.add_argument("--no-eval", action="store_true", help="skip every evaluation (per epoch and final)")
    r.add_argument(
        "--epoch-eval-split",
        default="dev",
        help="split evaluated after every epoch in those --eval-langs that have it, into metrics.jsonl (the "
        "per-epoch curves of eval_zeroshot plot/figures; logged, never used to pick a state); test is evaluated "
        "once, at the end, into results.json; none: only the final evaluation",
    )
    freeze.add_policy_args(p)


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    add_train_args(sub.add_parser("train", help="meta-train with one auxiliary language, then evaluate"))
    mx = sub.add_parser("matrix", help="one run per auxiliary language; auxiliary x target table")
    add_train_args(mx)
    mx.set_defaults(aux_lang=None)
    for action in mx._actions:
        if action.dest == "aux_lang":
            action.required = False
    mx.add_argument("--aux-langs", nargs="+", required=True, help="auxiliary languages, one run each")
    return p


def maml_config(args) -> M.MamlConfig:
    try:
        return M.MamlConfig(
            variant=args.variant,
            inner_lr=args.inner_lr,
            inner_steps=args.inner_steps,
            first_order=args.first_order,
            cl_weight=args.cl_weight,
            inner_terms=tuple(args.inner_terms) if args.inner_terms else None,
            outer_terms=tuple(args.outer_terms) if args.outer_terms else None,
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


# Ranges of XVL-MAML's own numbers, checked with engine's (epochs, lr, AdamW's, batch sizes, ...) by the trainers'
# one check (engine.check_arg_ranges) right after parsing.
ARG_RULES = {
    "inner_lr": engine.NOT_NEGATIVE,  # 0: the plain gradient of the outer loss
    "inner_steps": (lambda v: v >= 0, ">= 0"),
    "cl_weight": engine.NOT_NEGATIVE,
    "cl_temperature": engine.POSITIVE,
    **dict.fromkeys(
        "cl_dim inner_top_layers support_size query_size en_batch_size meta_batch iters_per_epoch".split(),
        engine.AT_LEAST_1,
    ),
}


def check_args(args, dist: devices.DistInfo) -> None:
    engine.check_arg_ranges(args, ARG_RULES)
    if args.meta_batch % dist.world:
        raise SystemExit(
            f"error: --meta-batch {args.meta_batch} must be a multiple of the {dist.world} processes "
            "(each episode runs whole on one process)"
        )
    if bool(args.run) == bool(args.checkpoint):
        raise SystemExit("error: give exactly one of --run RUN_DIR (English-fine-tuned) or --checkpoint FILE")
    if args.checkpoint and not args.task:
        raise SystemExit("error: --checkpoint needs --task")
    if args.aux_lang == "en":
        raise SystemExit("error: --aux-lang en: the auxiliary language must differ from the source language English")
    if args.amp == "fp16":  # a GradScaler scales the loss it differentiates; theta' must use the unscaled inner grad
        raise SystemExit(
            "error: --amp fp16 is not supported by XVL-MAML: the inner update needs the unscaled inner gradient "
            "inside the torch.func graph, which a GradScaler does not provide; use --amp bf16 (no scaler) or off"
        )


# Why XVL-MAML does not run CCLM (docs/xvlmaml.md#cclm): the model would allow it, this file is not wired for it;
# the two-image CCLM model (marvl) changes nothing in that.
CCLM_NOT_WIRED = (
    "XVL-MAML is wired for UC2 only: CCLM's structure would allow it (its text_proj / vision_proj give the "
    "contrastive embeddings, maml.py is model-agnostic), but the episodes here are UC2 region-feature batches "
    "(data.UC2Collate), the embeddings UC2's shared-encoder passes (pair_embeddings) and the task losses and "
    "layer layout UC2's; CCLM's image batches, losses and layout are not wired in (MaRVL's two-image CCLM too: "
    "it adds a second image per example to the same missing wiring)"
)


def resolve_init(args) -> dict:
    """Fill task / config / data arguments from the English run (args.json, checkpoint meta)."""
    if not args.run:
        args.init = str(args.checkpoint)
        return {}
    init = Z.run_checkpoint(Path(args.run))
    try:
        meta = Z.load_meta(init)
    except ValueError as e:
        raise SystemExit(f"error: --run: {e}") from None
    if meta.get("model") != "uc2":
        raise SystemExit(f"error: --run {args.run}: a {meta.get('model')} run; {CCLM_NOT_WIRED}")
    if args.task and args.task != meta["task"]:
        raise SystemExit(f"error: --task {args.task} but the run {args.run} is {meta['task']}")
    args.task, args.init = meta["task"], str(init)
    run_args = Z.read_run_args(Path(args.run))
    for key in ("data_root", "features", "tokenizer", "max_regions"):
        if getattr(args, key) is None:
            setattr(args, key, run_args.get(key, meta.get(key)))
    return meta


def _shot_count(split: str) -> tuple[int, str]:
    """train_48 -> 48, train_100x5 -> 100 (IGLUE's few-shot names); the name breaks ties."""
    head = split.split("_", 1)[1].split("x")[0]
    return (int(head) if head.isdigit() else 0, split)


def aux_split(args) -> str:
    """--aux-split, else dev when the auxiliary language has it, else its largest few-shot train_<n>."""
    if args.aux_split:
        split = args.aux_split
    elif args.aux_lang in iglue_layout.available_langs(args.data_root, args.task, "dev"):
        split = "dev"
    else:
        shots = [
            s
            for s in iglue_layout.available_splits(args.data_root, args.task)
            if s.startswith("train_") and args.aux_lang in iglue_layout.available_langs(args.data_root, args.task, s)
        ]
        if not shots:
            raise SystemExit(
                f"error: {args.task}: language {args.aux_lang!r} has no dev or few-shot train_<n> split "
                f"under {args.data_root}"
            )
        split = max(shots, key=_shot_count)
    if "test" in split:
        raise SystemExit(f"error: --aux-split {split}: test data is never meta-trained on (use dev or train_<n>)")
    if args.aux_lang not in iglue_layout.available_langs(args.data_root, args.task, split):
        raise SystemExit(
            f"error: {args.task}: no split {split!r} for language {args.aux_lang!r} under {args.data_root}"
        )
    return split


def build_model(args, meta: dict, dist) -> tuple[XVLModel, dict, object]:
    config = dict(meta["config"]) if meta else U.resolve_config(args.model_config)
    if args.dropout is not None:
        config.update(hidden_dropout=args.dropout, attention_dropout=args.dropout, classifier_dropout=args.dropout)
    tokenizer = engine.load_tokenizer(args, config["vocab_size"])
    engine.seed_everything(args.seed)  # identical contrastive-head init on every rank
    model = U.build_model(args.task, config)
    try:
        state, extra = volta.read_checkpoint(args.init)
        plan = volta.load_into(model, state)
    except ValueError as e:
        raise SystemExit(f"error: {args.init}: {str(e).splitlines()[0]}") from None
    # released weights: XLM-R's vocabulary; ours (an English run): the tokenizer recorded in its meta
    tokenizer_check.check_tokenizer_vocab(
        tokenizer,
        config["vocab_size"],
        args.tokenizer,
        args.init,
        extra.get("meta", {}) if plan.fmt == "ours" else None,
    )
    if dist.is_main:
        print(plan.report(), flush=True)
    head = M.ContrastiveHead(config["hidden_size"], args.cl_dim, args.cl_temperature, not args.cl_asymmetric)
    return XVLModel(model, head, args.cl_embed, not args.cl_keep_same_image), config, tokenizer


def build_data(args, tokenizer, num_answers: int = data.NUM_ANSWERS):
    """(auxiliary pool, English training set or None, collate); every feature key checked now, and every auxiliary
    record (1,000 English ones) decoded. num_answers: the model's answer-head width (config["num_answers"]), the
    width of the xGQA training targets."""
    try:
        serialized, keyed = feature_sets.split_features(args.features or [])
        features = feature_sets.FeatureSet(keyed) if keyed else None
        if features is None:
            raise SystemExit("error: --features is required (image-keyed region-feature LMDB/H5)")
        aux = data.load_split(args.data_root, args.task, args.aux_split, args.aux_lang)
        preflight.check_inputs(aux, features=features, sample=None)  # every record decoded now, not mid-training
        # xFlickrCo: VOLTA's hard negatives exist for Flickr30k's training images only, so the auxiliary pool
        # draws random negatives (read only by a task_aux retrieval loss; the contrastive loss uses the positives)
        aux_ds = data.make_dataset(
            "uc2",
            args.task,
            aux,
            features=features,
            train=True,
            max_regions=args.max_regions,
            seed=args.seed,
            hard_negatives=None,
            negatives="volta",
        )
        en_ds = None
        if "task_en" in maml_config(args).outer + maml_config(args).inner:
            hard = U.find_hard_negatives(argparse.Namespace(**{**vars(args), "hard_negatives": None}))
            en_args = argparse.Namespace(
                **{
                    **vars(args),
                    "train_split": args.en_split,
                    "train_lang": "en",
                    "hard_negatives": hard,
                    "retrieval_negatives": "volta",
                }
            )
            en_ds = U.build_train_dataset(en_args, features, serialized)
            if isinstance(en_ds, data.UC2Dataset):
                preflight.check_inputs(en_ds.examples, features=features, sample=preflight.VERIFY_SAMPLE)
    except ValueError as e:
        raise SystemExit(f"error: training data: {e}") from None
    if args.support_size + args.query_size > len(aux_ds):
        raise SystemExit(
            f"error: --support-size {args.support_size} + --query-size {args.query_size} exceed the "
            f"{len(aux_ds)} examples of {args.aux_lang} {args.aux_split}"
        )
    if en_ds is not None and args.en_batch_size > len(en_ds):
        raise SystemExit(f"error: --en-batch-size {args.en_batch_size} exceeds the {len(en_ds)} English examples")
    return aux_ds, en_ds, data.UC2Collate(args.task, tokenizer, train=True, num_answers=num_answers), features


# Arguments a --resume must repeat (they change the result): engine's (those this parser has) and ours.
RESUME_KEYS = engine.RESUME_KEYS + tuple(
    """variant inner_lr inner_steps first_order cl_weight inner_terms outer_terms cl_embed cl_dim cl_temperature
    cl_asymmetric cl_keep_same_image inner_params inner_top_layers aux_lang aux_split support_size query_size
    en_batch_size en_split meta_batch iters_per_epoch init eval_amp""".split()
)


def check_resume_args(args, run_dir: Path) -> None:
    saved_path = run_dir / run_folder.ARGS
    if args.resume and saved_path.is_file():
        engine.check_resume_args(args, readers.read_json(saved_path, annotations=False), RESUME_KEYS, run_dir)


def train(args, dist: devices.DistInfo) -> Path:
    """Meta-train (resumable) in the caller's process group; returns the run folder holding model_final.pt."""
    check_args(args, dist)
    meta0 = resolve_init(args)
    run_dir = engine.check_run_dir(args, dist)
    if not args.data_root:
        raise SystemExit("error: --data-root is required (folder holding IGLUE's datasets/)")
    args.max_regions = args.max_regions or 36
    args.aux_split = aux_split(args)
    args.recipe, args.langs = "paper", args.eval_langs  # what run_folder.base_meta / run_meta record
    check_resume_args(args, run_dir)  # after the defaults derived from the data are filled in
    cfg = maml_config(args)
    net, config, tokenizer = build_model(args, meta0, dist)
    aux_ds, en_ds, collate, features = build_data(args, tokenizer, config["num_answers"])
    evaluate_fn = epoch_evaluate_fn(args, tokenizer, features, dist)
    layout = xvl_layout(U.layer_layout(args.task, config))
    schedule = freeze.schedule_from_args(args, layout.num_layers)
    meta = {
        **run_folder.base_meta("uc2", args, config, tokenizer),
        "max_regions": args.max_regions,
        "xvlmaml": {
            **cfg.to_dict(),
            "aux_lang": args.aux_lang,
            "aux_split": args.aux_split,
            "init": args.init,
            "init_policy": meta0.get("policy") if args.run else None,
            "cl_embed": args.cl_embed,
            "inner_params": args.inner_params,
        },
    }
    _meta_train(
        args,
        net,
        layout,
        schedule,
        cfg,
        Episodes(args, aux_ds, en_ds, collate, dist.device),
        meta,
        dist,
        run_dir,
        evaluate_fn,
    )
    return run_dir


def epoch_evaluate_fn(args, tokenizer, features, dist):
    """The trainers' per-epoch evaluation (scoring.evaluate.trainer_evaluate_fn) on --epoch-eval-split; None when off.
    Every feature key of the evaluated languages is checked now, before meta-training."""
    if args.no_eval or args.epoch_eval_split == "none":
        return None
    ns = argparse.Namespace(
        task=args.task,
        data_root=args.data_root,
        langs=args.eval_langs,
        eval_split=args.epoch_eval_split,
        eval_batch_size=args.eval_batch_size,
        num_workers=args.num_workers,
    )
    try:
        return scoring.evaluate.trainer_evaluate_fn(
            "uc2", ns, tokenizer, dist, features=features, max_regions=args.max_regions
        )
    except ValueError as e:
        hint = (
            " (the per-epoch evaluation reads --epoch-eval-split dev; --epoch-eval-split none turns it off)"
            if args.epoch_eval_split == "dev"
            else ""
        )
        raise SystemExit(f"error: evaluation data: {e}{hint}") from None


def _meta_train(
    args,
    net: XVLModel,
    layout,
    schedule,
    cfg: M.MamlConfig,
    episodes: Episodes,
    meta: dict,
    dist: devices.DistInfo,
    run_dir: Path,
    evaluate_fn=None,
) -> None:
    net.to(dist.device)
    amp_dtype, _ = engine.setup_amp(args.amp, dist.device)  # no GradScaler: fp16 is refused in check_args
    optimizer, lr_sched = engine.build_optimizer(
        net, layout, schedule, args, total_steps=args.epochs * args.iters_per_epoch
    )
    log = run_folder.MetricsLog(run_dir / run_folder.METRICS, dist.is_main)
    if run_folder.resuming(args, run_dir):
        prog = engine.resume(run_dir / run_folder.CHECKPOINT, net, optimizer, lr_sched, None, args, dist, log, meta)
    else:
        prog = engine.start_fresh(run_dir, args, dist, log)
    names = [n for n, _ in net.named_parameters()]
    for epoch in range(prog.epoch, args.epochs):
        net.train()
        bar = tqdm(
            total=args.iters_per_epoch,
            desc=f"xvl-maml epoch {epoch + 1}/{args.epochs}",
            disable=not dist.is_main,
            dynamic_ncols=True,
        )
        window: list[float] = []
        for i in range(args.iters_per_epoch):
            freeze.apply_schedule(net, layout, schedule, epoch, prog.step)
            trainable = [n for n in names if net.get_parameter(n).requires_grad]
            adapt = M.adapt_names_for(
                trainable,
                layout.layer_of,
                layout.num_layers,
                args.inner_params,
                args.inner_top_layers,
                lambda n: layout.layer_of(n) is None and layout.module_of(n) in layout.embedding_modules,
            )
            losses, n_bad = meta_step(
                net,
                cfg,
                episodes(prog.step, my_episodes(args.meta_batch, dist)),
                args.meta_batch,
                adapt,
                dist,
                dist.device,
                amp_dtype,
            )
            window += [x for x in losses if math.isfinite(x)]
            ok, _, lr, grad_norm = engine.optimizer_step(
                net, optimizer, lr_sched, None, args.clip_grad, torch.tensor(float(n_bad), device=dist.device), dist
            )
            engine.count_step(prog, ok, False, epoch, args, run_dir, dist)
            bar.update(1)
            if (args.log_every and prog.step % args.log_every == 0) or i == args.iters_per_epoch - 1:
                loss = _mean_over_ranks(window, dist)
                log.write(
                    {
                        **engine.train_record(epoch, prog, loss, lr, grad_norm, net, schedule),
                        "meta_loss": loss,
                        "adapted_params": sum(net.get_parameter(n).numel() for n in adapt),
                    }
                )
                bar.set_postfix(meta_loss=f"{loss:.4f}" if loss is not None else "nan", lr=f"{lr:.2e}")
                window = []
        bar.close()
        if evaluate_fn is not None:  # the UC2 task model, as the trainers evaluate it
            kept = progress.last_checkpoint(prog, run_dir)  # this epoch's is written after its evaluation
            amp = scoring.evaluate.AMP_DTYPES[args.eval_amp]
            results = after_epoch.evaluate_or_stop(evaluate_fn, net.model, epoch, kept, amp_dtype=amp)
            after_epoch.log_eval(log, results, epoch, prog.step, args.epoch_eval_split, dist)
        prog.epoch = epoch + 1
        prog.metrics_offset = log.size()
        engine.save_training_state(
            run_dir / run_folder.CHECKPOINT, net, optimizer, lr_sched, None, prog, args, meta, schedule, dist
        )
    progress.check_made_progress(prog, run_dir)  # the trainers' guard: no result from a run without a finite step
    if dist.is_main:
        final_meta = {
            **run_folder.run_meta(meta, schedule, prog, args),
            "policy": setup_name(meta["xvlmaml"], schedule),
        }
        run_folder.save_checkpoint(
            run_dir / run_folder.FINAL,
            {"model": net.model.state_dict(), "cl_head": net.cl_head.state_dict(), "meta": final_meta},
        )
        print(f"done: {run_dir / run_folder.FINAL}", flush=True)
    engine.barrier(dist)


def setup_name(xvl: dict, schedule: freeze.Schedule) -> str:
    """meta["policy"] of the final model, which eval_zeroshot records and groups its tables by: an XVL-MAML
    run is its own setup per auxiliary language, freeze policy and starting point (xvlmaml-de: from an
    English run fine-tuned with policy full; xvlmaml-de+suf/from-suf; .../from-pretrained), never averaged
    into the rows of plainly fine-tuned runs (meta["schedule"] keeps the freeze policy)."""
    init = xvl.get("init_policy") or "pretrained"
    return (
        f"xvlmaml-{xvl['aux_lang']}"
        + ("" if schedule.policy == "full" else f"+{schedule.policy}")
        + ("" if init == "full" else f"/from-{init}")
    )


def _mean_over_ranks(values: list[float], dist: devices.DistInfo) -> float | None:
    total = torch.tensor([sum(values), len(values)], dtype=torch.float64)
    if dist.distributed:
        tdist.all_reduce(total)
    return (total[0] / total[1]).item() if total[1] > 0 else None


def evaluate(args, run_dir: Path, dist: devices.DistInfo) -> int:
    """The existing zero-shot evaluation of model_final.pt in every language (results.json, IGLUE CSVs)."""
    eargs = argparse.Namespace(
        run=str(run_dir),
        checkpoint=None,
        output_dir=None,
        model_name=None,
        data_root=args.data_root,
        features=args.features,
        images=None,
        tokenizer=args.tokenizer,
        max_regions=args.max_regions,
        langs=args.eval_langs,
        split="test",
        translate_test=False,
        batch_size=args.eval_batch_size,
        num_workers=args.num_workers,
        amp=args.eval_amp,
        eval_tf32=args.eval_tf32,
        k_test=None,
        pair_batch=1024,
        itm_batch=128,
    )
    return Z.evaluate(eargs, dist)


def cmd_train(args, dist: devices.DistInfo) -> int:
    run_dir = train(args, dist)
    return 0 if args.no_eval else evaluate(args, run_dir, dist)


# ============================================================================ auxiliary x target matrix


def matrix_table(task: str, results: dict[str, dict], baseline: dict | None = None) -> dict:
    """{"metric", "targets", "rows": {aux: {target: score}}, "baseline": {target: score} | None}; the score is
    accuracy (retrieval: mean of tr_r1 and ir_r1)."""

    def score(m: dict) -> float:
        return Z.selection_score(task, m)

    targets = scoring.metrics.ordered_langs({t for langs in results.values() for t in langs})
    rows = {aux: {t: score(langs[t]) for t in targets if t in langs} for aux, langs in results.items()}
    base = {t: score(m) for t, m in baseline.items()} if baseline else None
    return {
        "task": task,
        "metric": "mean(tr_r1, ir_r1)" if task == "xflickrco" else "accuracy",
        "targets": targets,
        "rows": rows,
        "baseline": base,
    }


def format_matrix(t: dict) -> str:
    head = "| aux \\ target | " + " | ".join(t["targets"]) + " |"
    lines = [
        f"{t['task']} XVL-MAML, {t['metric']} (rows: auxiliary language; * = the auxiliary language itself"
        + ("; in brackets: minus the initial model" if t["baseline"] else "")
        + ")",
        "",
        head,
        "|" + "---|" * (len(t["targets"]) + 1),
    ]
    for aux, row in t["rows"].items():
        cells = []
        for target in t["targets"]:
            v = row.get(target)
            cell = "" if v is None else f"{v:.2f}{'*' if target == aux else ''}"
            if v is not None and t["baseline"] and target in t["baseline"]:
                cell += f" ({v - t['baseline'][target]:+.2f})"
            cells.append(cell)
        lines.append(f"| {aux} | " + " | ".join(cells) + " |")
    if t["baseline"]:
        base = t["baseline"]
        lines.append("| (initial) | " + " | ".join(f"{base.get(x, float('nan')):.2f}" for x in t["targets"]) + " |")
    return "\n".join(lines)


def cmd_matrix(args, dist: devices.DistInfo) -> int:
    out = Path(args.output_dir)
    results, task = {}, args.task
    for aux in args.aux_langs:
        sub = argparse.Namespace(**{**vars(args), "aux_lang": aux, "output_dir": str(out / f"aux-{aux}")})
        run = Path(sub.output_dir)
        done = run / "results.json"
        if done.is_file() and dist.is_main:
            print(f"matrix: {run} already evaluated, reusing it", flush=True)
        if not done.is_file():
            if (run / run_folder.CHECKPOINT).is_file() or (run / run_folder.FINAL).is_file():
                sub.resume = True
            if not (run / run_folder.FINAL).is_file():
                train(sub, dist)
            if not sub.no_eval:
                evaluate(sub, run, dist)
        engine.barrier(dist)
        if not done.is_file():
            raise SystemExit(f"error: {run}: no results.json (run without --no-eval to fill the matrix)")
        record = readers.read_json(done, annotations=False)["test"]
        results[aux], task = record["langs"], record["task"]
    baseline = None
    if args.run and (Path(args.run) / "results.json").is_file():
        baseline = readers.read_json(Path(args.run) / "results.json", annotations=False).get("test", {}).get("langs")
    table = matrix_table(task, results, baseline)
    if dist.is_main:
        run_folder.atomic_write_text(out / "matrix.json", json.dumps(table, indent=1) + "\n")
        run_folder.atomic_write_text(out / "matrix.md", format_matrix(table) + "\n")
        print(format_matrix(table), flush=True)
    return 0


def main(argv: Sequence[str] | None = None, *, dist: devices.DistInfo | None = None) -> int:
    """dist: the caller's process group (several commands in one group); None: set up and end one here.
    Under torchrun every training and evaluation of a command shares ONE group: a second group on the
    same store can read the first one's addresses and fail to connect."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    engine.check_arg_ranges(args, ARG_RULES)  # before anything is read or written (train repeats it)
    command = {"train": cmd_train, "matrix": cmd_matrix}[args.command]
    if dist is not None:
        return command(args, dist)
    dist = engine.setup_distributed()
    try:
        return command(args, dist)
    finally:
        engine.cleanup_distributed()


if __name__ == "__main__":
    sys.exit(main())
