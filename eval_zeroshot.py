#!/usr/bin/env python
"""Zero-shot cross-lingual evaluation on IGLUE, translate-test, few-shot transfer, and the paper's
analyses (Figures 2-4, Tables 1-3), for UC2 and CCLM checkpoints written by train_uc2/train_cclm.

  python eval_zeroshot.py evaluate --run RUN [--langs en de] [--split test] [--translate-test]
  python eval_zeroshot.py --run RUN                  (same as `evaluate`)
  torchrun --nproc_per_node N eval_zeroshot.py evaluate --run-dir RUN   (torchrun would take --run as its own)
  python eval_zeroshot.py fewshot --checkpoint RUN/model_final.pt --lang de --shots 48 --output-dir OUT
  python eval_zeroshot.py plot RUN [RUN ...]         Figure 2 (per language) / 3 (per question type)
  python eval_zeroshot.py similarity --run RUN       Figure 4 ([CLS] similarity of parallel examples)
  python eval_zeroshot.py figures RUN [RUN ...]      plot + similarity
  python eval_zeroshot.py table RUN [RUN ...]        Tables 1-3 layout, the paper's numbers beside ours

Metrics are percentages, as IGLUE and the paper report them. `evaluate_task` is the library entry
point the trainers call after every epoch; its {lang: {metric: value}} goes to metrics.jsonl.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

import data
import engine

TASKS = data.TASKS
QTYPES = ("verify", "query", "choose", "logical", "compare")   # GQA structural types
RECALL_KS = (1, 5, 10)
MAIN_METRICS = {"xgqa": ("accuracy",), "xvnli": ("accuracy",), "xflickrco": ("tr_r1", "ir_r1")}
UNSCORED = -100.0   # CCLM reference: retrieval matrix entries outside the k_test prefilter
# IGLUE's results/ file stems (model,en,<langs>,avg rows); "_ir"/"_tr" for retrieval.
CSV_STEM = {"xgqa": "xGQA", "xvnli": "XVNLI", "xflickrco": "xFlickrCO"}
# IGLUE's target languages (test sets; the paper's ZS-XLT averages run over all of them)
TARGET_LANGS = {"xgqa": ("bn", "de", "id", "ko", "pt", "ru", "zh"), "xvnli": ("ar", "es", "fr", "ru"),
                "xflickrco": ("de", "es", "id", "ja", "ru", "tr", "zh")}

# ---------------------------------------------------------------------------------------------
# The paper's reported numbers (Reinhardt et al., "Improving Vision-Language Cross-Lingual Transfer
# with Scheduled Unfreezing"), printed beside ours by `table`.
# Table 1: (EN, ZS-XLT avg over the non-English languages); xGQA/XVNLI accuracy, xFlickrCo R@1.
# Note: Table 1 disagrees with the per-language appendix in three cells: XVNLI UC2 61.7 and
# UC2+SUF 61.2 (Table 4 averages to 61.9 / 61.75) and CCLM+SUF TR 66.7 (Table 6 averages to 66.1).
# We print Table 1 as published.
PAPER_TABLE1 = {
    ("uc2", "full"): {"xgqa": (57.1, 31.9), "xvnli": (77.1, 61.7), "tr_r1": (36.8, 18.0), "ir_r1": (43.0, 20.0)},
    ("uc2", "suf"): {"xgqa": (57.1, 41.3), "xvnli": (77.2, 61.2), "tr_r1": (36.4, 20.0), "ir_r1": (41.8, 22.3)},
    ("cclm", "full"): {"xgqa": (62.0, 42.8), "xvnli": (81.2, 68.6), "tr_r1": (77.7, 63.4), "ir_r1": (78.0, 64.2)},
    ("cclm", "suf"): {"xgqa": (62.8, 51.5), "xvnli": (80.6, 70.6), "tr_r1": (78.5, 66.7), "ir_r1": (78.6, 67.1)},
}
# Table 2: CCLM on xGQA, (EN, avg); "top" = CM only (only the 6 cross-modal layers train).
PAPER_TABLE2 = {"full": (62.0, 42.8), "suf": (62.8, 51.5), "top": (61.9, 49.7)}
# Table 3: UC2 on xGQA, avg over target languages: (zero-shot, few-shot 48 shots) by English policy.
PAPER_TABLE3 = {"full": (31.9, 44.3), "suf": (41.3, 46.7)}
# Tables 4-6 (appendix): per-language zero-shot results; retrieval is R@1.
PAPER_PER_LANG = {
    ("xvnli", "accuracy"): {  # Table 4
        ("uc2", "full"): {"en": 77.1, "ar": 56.6, "es": 58.1, "fr": 68.1, "ru": 64.9},
        ("uc2", "suf"): {"en": 77.2, "ar": 55.6, "es": 58.5, "fr": 69.2, "ru": 63.7},
        ("cclm", "full"): {"en": 81.2, "ar": 60.9, "es": 69.6, "fr": 75.6, "ru": 68.5},
        ("cclm", "suf"): {"en": 80.6, "ar": 63.6, "es": 70.9, "fr": 77.6, "ru": 70.4},
    },
    ("xgqa", "accuracy"): {  # Table 5
        ("uc2", "full"): {"en": 57.1, "de": 44.4, "bn": 20.8, "id": 30.7, "ko": 25.3, "pt": 34.1, "ru": 35.4, "zh": 32.8},
        ("uc2", "suf"): {"en": 57.1, "de": 51.6, "bn": 26.5, "id": 40.5, "ko": 38.6, "pt": 41.2, "ru": 43.8, "zh": 47.0},
        ("cclm", "full"): {"en": 62.0, "de": 57.2, "bn": 33.7, "id": 49.8, "ko": 29.1, "pt": 46.4, "ru": 39.9, "zh": 43.3},
        ("cclm", "suf"): {"en": 62.8, "de": 59.0, "bn": 49.5, "id": 52.5, "ko": 42.2, "pt": 51.7, "ru": 48.2, "zh": 57.5},
    },
    ("xflickrco", "tr_r1"): {  # Table 6, text retrieval
        ("uc2", "full"): {"en": 36.8, "de": 25.8, "es": 16.0, "id": 12.8, "ja": 21.6, "ru": 16.9, "tr": 7.3, "zh": 25.8},
        ("uc2", "suf"): {"en": 36.4, "de": 26.0, "es": 17.8, "id": 16.3, "ja": 23.5, "ru": 19.7, "tr": 8.2, "zh": 29.0},
        ("cclm", "full"): {"en": 77.7, "de": 68.8, "es": 66.4, "id": 55.3, "ja": 69.6, "ru": 64.5, "tr": 45.6, "zh": 73.6},
        ("cclm", "suf"): {"en": 78.5, "de": 71.0, "es": 69.5, "id": 58.1, "ja": 71.1, "ru": 68.9, "tr": 50.7, "zh": 73.2},
    },
    ("xflickrco", "ir_r1"): {  # Table 6, image retrieval
        ("uc2", "full"): {"en": 43.0, "de": 39.3, "es": 15.9, "id": 12.7, "ja": 26.3, "ru": 19.7, "tr": 6.4, "zh": 33.4},
        ("uc2", "suf"): {"en": 41.8, "de": 30.2, "es": 18.7, "id": 15.1, "ja": 28.1, "ru": 22.8, "tr": 8.0, "zh": 33.5},
        ("cclm", "full"): {"en": 78.0, "de": 69.2, "es": 68.6, "id": 54.8, "ja": 72.7, "ru": 64.8, "tr": 45.7, "zh": 73.7},
        ("cclm", "suf"): {"en": 78.6, "de": 70.5, "es": 70.9, "id": 60.0, "ja": 74.3, "ru": 68.7, "tr": 50.4, "zh": 74.6},
    },
}
# Figure 4 (UC2, last epoch): unpaired-baseline similarity in percentage points.
PAPER_FIG4_UNPAIRED = {("xgqa", "full"): 20, ("xgqa", "suf"): 22, ("xvnli", "full"): 17, ("xvnli", "suf"): 62}


# ---------------------------------------------------------------------------------------------
# Metrics (pure)

def classification_metrics(preds: Sequence[int], labels: Sequence[int],
                           qtypes: Sequence[str] | None = None) -> dict[str, float]:
    """Accuracy in percent = 100 * n_correct / n. A label < 0 (xGQA answer outside the 1,842-answer
    vocabulary, XVNLI gold "-" in UC2's data; CCLM's loader drops those pairs as X2-VLM does) can
    never be predicted and counts as wrong, as in IGLUE's string-match evaluation.
    XVNLI: X2-VLM's XVNLI.py prints n_correct / (n + 1) (its SmoothedValue starts with a dummy 0
    update; 1 of 3 correct prints 0.25); we report the correct n_correct / n.
    With qtypes (xGQA): accuracy_<type> and n_<type> per structural type, so that
    sum(n_t * accuracy_t) / n == accuracy exactly (same counts)."""
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels")
    n = len(labels)
    correct = [int(p) == int(l) and int(l) >= 0 for p, l in zip(preds, labels)]
    out = {"accuracy": 100.0 * sum(correct) / n if n else float("nan"), "n": n}
    if qtypes is not None:
        for t in QTYPES:
            idx = [i for i, q in enumerate(qtypes) if q == t]
            out[f"n_{t}"] = len(idx)
            out[f"accuracy_{t}"] = 100.0 * sum(correct[i] for i in idx) / len(idx) if idx else float("nan")
        other = [i for i, q in enumerate(qtypes) if q not in QTYPES]
        if other:   # keeps the per-type counts adding up to n even for unexpected type strings
            out["n_other"] = len(other)
            out["accuracy_other"] = 100.0 * sum(correct[i] for i in other) / len(other)
    return out


# Retrieval ranks. Both references rank the gold at its position in a numpy argsort with the default kind:
# VOLTA/IGLUE's eval_retrieval.py in np.argsort(-s) (s: float64 copy of the float32 logits), X2-VLM's itm_eval in
# np.argsort(s)[::-1] (float32). Among exactly equal scores (duplicate captions tie for a model that scores text)
# that order decides the rank, and the two orders differ. The references ran numpy's portable introsort (numpy
# < 1.25 had no other); numpy >= 1.25 sends float argsort to AVX-512 / AVX2 kernels whose order among equal values
# depends on the CPU, so np.argsort today would not give one answer on every machine. numpy_argsort below is the
# portable introsort's order, step for step (numpy's npysort/quicksort aquicksort_ and aheapsort_, BSD licence;
# written here), tested against np.argsort with numpy's SIMD dispatch switched off.
TIE_ORDERS = ("volta", "x2vlm")
TIE_ORDER_OF_MODEL = {"uc2": "volta", "cclm": "x2vlm"}
SMALL_SORT = 15   # numpy: partitions spanning at most 16 elements are insertion-sorted


def _less(a: float, b: float) -> bool:
    return a < b or (b != b and a == a)   # numpy's float order: NaN after every number


def numpy_argsort(values: Sequence[float]) -> list[int]:
    """np.argsort(values) (default kind) in the order of numpy's portable introsort: median-of-3 quicksort,
    insertion sort for partitions of at most 16 elements, heapsort for a partition popped below depth
    2 * floor(log2 n). Equal to np.argsort on every CPU where numpy has no SIMD argsort (and always before 1.25)."""
    v = [float(x) for x in values]
    a = list(range(len(v)))
    if len(a) < 2:
        return a
    stack: list[tuple[int, int, int]] = []
    pl, pr, depth = 0, len(a) - 1, 2 * (len(a).bit_length() - 1)
    while True:
        if depth < 0:
            _heapsort(v, a, pl, pr)
        else:
            while pr - pl > SMALL_SORT:
                pi = _partition(v, a, pl, pr)
                depth -= 1
                if pi - pl < pr - pi:   # the larger side waits on the stack, with the depth reached so far
                    stack.append((pi + 1, pr, depth))
                    pr = pi - 1
                else:
                    stack.append((pl, pi - 1, depth))
                    pl = pi + 1
            _insertion_sort(v, a, pl, pr)
        if not stack:
            return a
        pl, pr, depth = stack.pop()


def _partition(v, a, pl, pr):
    pm = pl + ((pr - pl) >> 1)
    if _less(v[a[pm]], v[a[pl]]):
        a[pm], a[pl] = a[pl], a[pm]
    if _less(v[a[pr]], v[a[pm]]):
        a[pr], a[pm] = a[pm], a[pr]
    if _less(v[a[pm]], v[a[pl]]):
        a[pm], a[pl] = a[pl], a[pm]
    vp = v[a[pm]]
    pi, pj = pl, pr - 1
    a[pm], a[pj] = a[pj], a[pm]
    while True:
        pi += 1
        while _less(v[a[pi]], vp):
            pi += 1
        pj -= 1
        while _less(vp, v[a[pj]]):
            pj -= 1
        if pi >= pj:
            break
        a[pi], a[pj] = a[pj], a[pi]
    a[pi], a[pr - 1] = a[pr - 1], a[pi]
    return pi


def _insertion_sort(v, a, pl, pr):
    for pi in range(pl + 1, pr + 1):
        vi = a[pi]
        vp = v[vi]
        pj = pi
        while pj > pl and _less(vp, v[a[pj - 1]]):
            a[pj] = a[pj - 1]
            pj -= 1
        a[pj] = vi


def _heapsort(v, a, pl, pr):
    n = pr - pl + 1
    base = pl - 1  # 1-based heap positions: a[base + 1] .. a[base + n]

    def sift(tmp, i, n):
        j = 2 * i
        while j <= n:
            if j < n and _less(v[a[base + j]], v[a[base + j + 1]]):
                j += 1
            if _less(v[tmp], v[a[base + j]]):
                a[base + i] = a[base + j]
                i, j = j, 2 * j
            else:
                break
        a[base + i] = tmp

    for l in range(n >> 1, 0, -1):
        sift(a[base + l], l, n)
    while n > 1:
        tmp = a[base + n]
        a[base + n] = a[base + 1]
        n -= 1
        sift(tmp, 1, n)


def reference_order(row: np.ndarray, order: str) -> list[int]:
    """Candidates of one score row, best first, in the reference's order (see TIE_ORDERS)."""
    if order == "volta":
        return numpy_argsort(-row)           # eval_retrieval.py: np.argsort(-score_matrix[i])
    if order == "x2vlm":
        return numpy_argsort(row)[::-1]      # itm_eval: np.argsort(score)[::-1]
    raise ValueError(f"unknown tie order {order!r}; expected one of {TIE_ORDERS}")


def _gold_ranks(scores: np.ndarray, rows: np.ndarray, golds: np.ndarray, unscored: float | None,
                order: str) -> np.ndarray:
    """0-based position of candidate golds[i] in row rows[i] of `scores`, in the reference's order. A gold that
    ties with no other candidate ranks after the strictly higher ones in any order (no sort needed); a tied one
    (or a row with NaN) takes its position in reference_order. `unscored` (CCLM: UNSCORED, entries outside the
    top-k prefilter): such a gold ranks behind all its ties (never scored; X2-VLM would place it anywhere
    among them: only with k_test < 10, not a reference setting, can that change R@1/5/10)."""
    vals = scores[rows]
    gold = vals[np.arange(len(rows)), golds][:, None]
    ranks = (vals > gold).sum(1)
    positions: dict[int, np.ndarray] = {}
    for i in np.flatnonzero(((vals == gold).sum(1) > 1) | np.isnan(vals).any(1)):
        r = int(rows[i])
        if r not in positions:
            positions[r] = np.argsort(np.asarray(reference_order(scores[r], order)), kind="stable")
        ranks[i] = positions[r][golds[i]]
    if unscored is not None:
        out = gold[:, 0] == unscored
        ranks[out] = (vals[out] >= gold[out]).sum(1) - 1
    return ranks


def retrieval_ranks(score_i2t: torch.Tensor, score_t2i: torch.Tensor, txt2img: Sequence[int],
                    unscored: float | None = None, ties: str = "volta") -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks as VOLTA's eval_retrieval.py (ties="volta", UC2) / X2-VLM's itm_eval (ties="x2vlm", CCLM)
    compute them. score_i2t [n_img, n_txt], score_t2i [n_txt, n_img] (UC2: both views of one caption x image
    matrix). Text retrieval (image -> captions): rank of the best-ranked caption of each image. Image retrieval
    (caption -> images): rank of the caption's image. Exactly tied scores are ordered as the reference's argsort
    orders them (see TIE_ORDERS); `unscored`: see _gold_ranks."""
    if ties not in TIE_ORDERS:
        raise ValueError(f"unknown tie order {ties!r}; expected one of {TIE_ORDERS}")
    txt2img = np.asarray(list(txt2img), dtype=np.int64)
    n_img, n_txt = score_i2t.shape
    if score_t2i.shape != (n_txt, n_img) or txt2img.size != n_txt:
        raise ValueError(f"score shapes {tuple(score_i2t.shape)} / {tuple(score_t2i.shape)} do not fit "
                         f"{txt2img.size} captions")
    captions = np.arange(n_txt)
    ir_ranks = _gold_ranks(score_t2i.double().numpy(), captions, txt2img, unscored, ties)
    caption_ranks = _gold_ranks(score_i2t.double().numpy(), txt2img, captions, unscored, ties)  # within its image's row
    tr_ranks = np.full(n_img, n_txt, dtype=np.int64)
    np.minimum.at(tr_ranks, txt2img, caption_ranks)
    if (tr_ranks == n_txt).any():
        raise ValueError(f"{int((tr_ranks == n_txt).sum())} images have no caption")
    return torch.from_numpy(tr_ranks), torch.from_numpy(ir_ranks.astype(np.int64))


def recall_metrics(score_i2t: torch.Tensor, score_t2i: torch.Tensor, txt2img: Sequence[int],
                   unscored: float | None = None, ties: str = "volta") -> dict[str, float]:
    """tr_r1/5/10, ir_r1/5/10 (percent), medr/meanr as VOLTA prints them (floor(median)+1, mean+1)."""
    for scores in (score_i2t, score_t2i):
        if torch.isnan(scores).any() or torch.isposinf(scores).any():  # would rank arbitrarily, not fail
            bad = int((~torch.isfinite(scores)).sum())
            raise FloatingPointError(f"non-finite retrieval scores (NaN or inf) in {bad} of {scores.numel()} "
                                     "caption-image pairs")
    tr, ir = retrieval_ranks(score_i2t, score_t2i, txt2img, unscored, ties)
    out: dict[str, float] = {}
    for name, ranks in (("tr", tr), ("ir", ir)):
        for k in RECALL_KS:
            out[f"{name}_r{k}"] = 100.0 * (ranks < k).double().mean().item()
        out[f"{name}_medr"] = math.floor(ranks.double().quantile(0.5).item()) + 1.0   # = numpy median
        out[f"{name}_meanr"] = ranks.double().mean().item() + 1.0
    out["n_images"], out["n_captions"] = score_i2t.shape
    out["ties"] = ties
    return out


# ---------------------------------------------------------------------------------------------
# Running a model over examples (distributed: each rank its engine.shard, engine.gather after)

def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The task model behind a DDP (or similar) wrapper: predict/pair_scores live there."""
    return getattr(model, "module", model)


AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_for(device: torch.device | str, amp: str = "off"):
    """Evaluation precision: float32 unless asked (--amp bf16|fp16; our choice: exact numbers by default)."""
    return engine.autocast(torch.device(device), AMP_DTYPES[amp])


def _pad_cat(tensors: Sequence[torch.Tensor], value: float = 0) -> torch.Tensor:
    """Concatenate along dim 0, right-padding dim 1 to the longest (text lengths differ by batch/rank)."""
    if tensors and tensors[0].dim() >= 2:
        width = max(t.shape[1] for t in tensors)
        tensors = [F.pad(t, [0, 0] * (t.dim() - 2) + [0, width - t.shape[1]], value=value) for t in tensors]
    return torch.cat(list(tensors), 0)


@torch.no_grad()
def predict_records(model: torch.nn.Module, batches: Iterable[dict], device, amp: str = "off") -> list[tuple]:
    """(id, predicted index, gold label, question type or "") for every example in `batches`."""
    records = []
    for batch in batches:
        with autocast_for(device, amp):
            pred = model.predict(engine.to_device(batch, device)).cpu().tolist()
        labels = batch["label"].tolist()
        qtypes = batch.get("qtype") or [""] * len(labels)
        records += [(str(i), int(p), int(l), str(q)) for i, p, l, q in zip(batch["id"], pred, labels, qtypes)]
    return records


@torch.no_grad()
def uc2_score_matrix(model: torch.nn.Module, images: dict[str, torch.Tensor], texts: dict[str, torch.Tensor],
                     pair_batch: int = 1024, device="cpu", amp: str = "off") -> torch.Tensor:
    """UC2/VOLTA protocol: the VL logit of EVERY (caption, image) pair, scored `pair_batch` pairs
    per forward. images: stacked features/spatials/image_mask [n_img, R, ...]; texts: stacked
    input_ids/attention_mask [n_txt, L]. Returns [n_txt, n_img] (on CPU, float32)."""
    images = engine.to_device(images, device)
    texts = engine.to_device(texts, device)
    n_img, n_txt = images["features"].shape[0], texts["input_ids"].shape[0]
    total = n_img * n_txt
    out = torch.empty(total)
    for start in range(0, total, pair_batch):
        pair = torch.arange(start, min(start + pair_batch, total), device=device)
        t, i = pair // n_img, pair % n_img
        length = int(texts["attention_mask"][t].sum(1).max())   # trim padding common to the batch
        batch = {"input_ids": texts["input_ids"][t, :length], "attention_mask": texts["attention_mask"][t, :length],
                 "features": images["features"][i], "spatials": images["spatials"][i],
                 "image_mask": images["image_mask"][i]}
        with autocast_for(device, amp):
            out[start:start + len(pair)] = model.pair_scores(batch).float().reshape(-1).cpu()
    return out.view(n_txt, n_img)


@torch.no_grad()
def cclm_score_matrices(model: torch.nn.Module, image_batches: Iterable[dict], text_batches: Iterable[dict],
                        image_offset: int, n_images: int, n_texts: int, k: int = 128, itm_batch: int = 128,
                        dist=None, device="cpu", amp: str = "off") -> tuple[torch.Tensor, torch.Tensor]:
    """CCLM/X2-VLM protocol: every image and every caption is encoded once (this rank: its shard of
    each); ITC similarity image_feat @ text_feat.T; for every image the top-k captions and for every
    caption the top-k images are re-scored with the ITM head; all other entries are -100.
    Returns score_i2t [n_images, n_texts], score_t2i [n_texts, n_images] (CPU, float32), identical
    on every rank. Only ITC features and text states travel between ranks; a pair is ITM-scored on
    the rank that holds its image's encoder states. k is capped at the candidate count (the
    reference would fail for k > n; the sample has 40 images)."""
    vis, img_feat = [], []
    for b in image_batches:
        if "encoded" in b:   # encoded for another language's test set of the same images (evaluate_task)
            v, f = b["encoded"]
        else:
            with autocast_for(device, amp):
                v, f = model.encode_images(b["images"].to(device))
            b["encoded"] = (v, f)
        vis.append(v)
        img_feat.append(f.float())
    txt_states, txt_atts, txt_feat = [], [], []
    for b in text_batches:
        ids, atts = b["text_ids"].to(device), b["text_atts"].to(device)
        with autocast_for(device, amp):
            s, f = model.encode_texts(ids, atts)
        txt_states.append(s.cpu())
        txt_atts.append(atts.cpu())
        txt_feat.append(f.float().cpu())
    n_local = sum(v.shape[0] for v in vis)
    vis = torch.cat(vis) if vis else None
    local_feat = torch.cat(img_feat).cpu() if img_feat else torch.empty(0, 0)
    image_feat = torch.cat([t for t in engine.gather([local_feat], dist) if t.numel()]).to(device)
    text_states = _pad_cat([t for t in engine.gather([_pad_cat(txt_states)] if txt_states else [], dist)]).to(device)
    text_atts = _pad_cat([t for t in engine.gather([_pad_cat(txt_atts)] if txt_atts else [], dist)]).to(device)
    text_feat = torch.cat(engine.gather([torch.cat(txt_feat)] if txt_feat else [], dist)).to(device)
    if image_feat.shape[0] != n_images or text_feat.shape[0] != n_texts:
        raise ValueError(f"encoded {image_feat.shape[0]} images / {text_feat.shape[0]} captions, "
                         f"expected {n_images} / {n_texts}")
    sims = image_feat @ text_feat.t()

    def itm(local_img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        scores = []
        for s in range(0, len(txt), itm_batch):
            li, t = local_img[s:s + itm_batch], txt[s:s + itm_batch]
            atts = text_atts[t]
            length = int(atts.sum(1).max())
            with autocast_for(device, amp):
                scores.append(model.itm_scores(vis[li], text_states[t, :length], atts[:, :length]).float().cpu())
        return torch.cat(scores) if scores else torch.empty(0)

    triples = []   # (direction, row, col, score) computed on this rank
    if n_local:
        k_i2t = min(k, n_texts)
        top_t = sims[image_offset:image_offset + n_local].topk(k_i2t, dim=1).indices    # [n_local, k]
        li = torch.arange(n_local, device=device).repeat_interleave(k_i2t)
        t = top_t.reshape(-1)
        k_t2i = min(k, n_images)
        top_i = sims.t().topk(k_t2i, dim=1).indices                                      # [n_texts, k]
        t_all = torch.arange(n_texts, device=device).repeat_interleave(k_t2i)
        img = top_i.reshape(-1)
        mine = (img >= image_offset) & (img < image_offset + n_local)
        if hasattr(model, "itm_scores_with_image_kv"):
            both = itm_by_image(model, vis, torch.cat([li, img[mine] - image_offset]), torch.cat([t, t_all[mine]]),
                                text_states, text_atts, itm_batch, device, amp)
            s_i2t, s_t2i = both[:len(li)], both[len(li):]
        else:   # X2-VLM's way: every pair's fusion from the image's tokens
            s_i2t, s_t2i = itm(li, t), itm(img[mine] - image_offset, t_all[mine])
        triples.append(("i2t", (li + image_offset).cpu(), t.cpu(), s_i2t))
        triples.append(("t2i", t_all[mine].cpu(), img[mine].cpu(), s_t2i))
    score_i2t = torch.full((n_images, n_texts), UNSCORED)
    score_t2i = torch.full((n_texts, n_images), UNSCORED)
    for direction, rows, cols, vals in engine.gather(triples, dist):
        (score_i2t if direction == "i2t" else score_t2i)[rows, cols] = vals
    return score_i2t, score_t2i


def itm_by_image(model: torch.nn.Module, vis: torch.Tensor, img: torch.Tensor, txt: torch.Tensor,
                 text_states: torch.Tensor, text_atts: torch.Tensor, itm_batch: int, device, amp: str) -> torch.Tensor:
    """ITM scores (CPU, float32) of the pairs (vis[img[j]], text txt[j]), as model.itm_scores gives them, but
    each image's cross-attention keys/values are computed once (model.itm_image_kv) for all its candidate
    captions, and a pair asked for twice (both directions' top-k) is scored once. X2-VLM recomputes the
    keys/values over the image's tokens for every pair: most of the re-rank's work (bench/retrieval.py)."""
    n_txt = text_states.shape[0]
    pairs, where = torch.unique(img * n_txt + txt, return_inverse=True)   # sorted: grouped by image
    p_img, p_txt = pairs // n_txt, pairs % n_txt
    scores = torch.empty(len(pairs))
    images, counts = torch.unique_consecutive(p_img, return_counts=True)
    start = 0
    for i, c in zip(images.tolist(), counts.tolist()):
        with autocast_for(device, amp):
            kv = model.itm_image_kv(vis[i:i + 1])
        for s in range(start, start + c, itm_batch):
            t = p_txt[s:min(s + itm_batch, start + c)]
            atts = text_atts[t]
            length = int(atts.sum(1).max())
            with autocast_for(device, amp):
                scores[s:s + len(t)] = model.itm_scores_with_image_kv(text_states[t, :length], atts[:, :length],
                                                                      kv).float().cpu()
        start += c
    return scores[where.cpu()]


class CallCounter(torch.nn.Module):
    """Wraps a retrieval model and counts, per method, the calls and the rows (images / captions /
    pairs) that went through it: bench/retrieval.py and the tests check the protocols with it."""
    METHODS = ("encode_images", "encode_texts", "itm_scores", "pair_scores", "itm_image_kv", "itm_scores_with_image_kv")

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.config = getattr(model, "config", {})
        self.calls = {m: 0 for m in self.METHODS}
        self.rows = {m: 0 for m in self.METHODS}
        for m in self.METHODS:
            if hasattr(model, m):
                setattr(self, m, self._counted(m))

    def _counted(self, name: str) -> Callable:
        fn = getattr(self.model, name)

        def counted(*args, **kwargs):
            self.calls[name] += 1
            first = args[0] if args else next(iter(kwargs.values()))
            self.rows[name] += first["input_ids"].shape[0] if isinstance(first, dict) else first.shape[0]
            return fn(*args, **kwargs)
        return counted


@torch.no_grad()
def cls_records(model: torch.nn.Module, batches: Iterable[dict], device, amp: str = "off") -> list[tuple]:
    """(id, final [CLS] vector) per example: model.cls_features, the classifier's input."""
    records = []
    for batch in batches:
        with autocast_for(device, amp):
            feats = model.cls_features(engine.to_device(batch, device)).float().cpu()
        records += [(str(i), f) for i, f in zip(batch["id"], feats)]
    return records


def cls_similarity(features: dict[str, dict[str, torch.Tensor]]) -> dict:
    """Figure 4. features: lang -> {example id -> [CLS] vector}; the same id in two languages is a
    translation pair. Returns {"langs", "matrix" (mean cosine similarity over the ids both languages
    have; the paper prints it x100), "n_pairs", "unpaired"}. The paper's baseline samples non-parallel pairs at random; we
    compute its expectation exactly (our choice): the mean cosine over ALL pairs of examples with
    different ids, from every language (same and different), via sums of unit vectors:
    sum_{x,y} cos(x,y) = |sum x^|^2, minus the same-id blocks."""
    langs = sorted(features)
    unit = {l: {i: F.normalize(v.double(), dim=0) for i, v in features[l].items()} for l in langs}
    matrix, n_pairs = [], []
    for a in langs:
        row, counts = [], []
        for b in langs:
            ids = sorted(set(unit[a]) & set(unit[b]))
            sims = [float(unit[a][i] @ unit[b][i]) for i in ids]
            row.append(sum(sims) / len(sims) if sims else float("nan"))
            counts.append(len(ids))
        matrix.append(row)
        n_pairs.append(counts)
    vectors = [v for l in langs for v in unit[l].values()]
    total = torch.stack(vectors).sum(0) if vectors else torch.zeros(1, dtype=torch.float64)
    by_id: dict[str, list] = {}
    for l in langs:
        for i, v in unit[l].items():
            by_id.setdefault(i, []).append(v)
    same = sum(float(torch.stack(vs).sum(0).square().sum()) for vs in by_id.values())
    n_same = sum(len(vs) ** 2 for vs in by_id.values())
    n_all = len(vectors) ** 2
    unpaired = (float(total.square().sum()) - same) / (n_all - n_same) if n_all > n_same else float("nan")
    return {"langs": langs, "matrix": matrix, "n_pairs": n_pairs, "unpaired": unpaired}


# ---------------------------------------------------------------------------------------------
# Results files, printed tables

def ordered_langs(langs: Iterable[str]) -> list[str]:
    """English first, then the target languages alphabetically (IGLUE's results/ column order)."""
    langs = set(langs)
    return (["en"] if "en" in langs else []) + sorted(langs - {"en"})


def zs_average(per_lang: dict[str, dict], metric: str) -> float:
    """The paper's ZS-XLT number: the mean over the non-English languages."""
    vals = [m[metric] for l, m in per_lang.items() if l != "en" and metric in m]
    return sum(vals) / len(vals) if vals else float("nan")


def summarize(task: str, per_lang: dict[str, dict]) -> dict[str, dict]:
    """{main metric: {"en": .., "avg": .., "langs": [non-English languages averaged]}}."""
    targets = [l for l in ordered_langs(per_lang) if l != "en"]
    return {m: {"en": per_lang.get("en", {}).get(m, float("nan")), "avg": zs_average(per_lang, m),
                "langs": targets} for m in MAIN_METRICS[task]}


def table_rows(task: str, per_lang: dict[str, dict]) -> list[str]:
    """Metrics shown by `evaluate` (the same numbers results.json holds, 2 decimals)."""
    if task == "xflickrco":
        return [f"{d}_r{k}" for d in ("tr", "ir") for k in RECALL_KS]
    rows = ["accuracy"]
    if task == "xgqa":
        rows += [f"accuracy_{t}" for t in QTYPES]
    return rows


def format_table(task: str, per_lang: dict[str, dict], title: str = "") -> str:
    langs = ordered_langs(per_lang)
    rows = table_rows(task, per_lang)
    head = ["metric"] + langs + ["avg"]
    lines = [title] if title else []
    width = max(len(r) for r in rows + ["metric"])
    lines.append(f"{head[0]:<{width}} " + " ".join(f"{h:>7}" for h in head[1:]))
    for r in rows:
        vals = [per_lang[l].get(r, float("nan")) for l in langs] + [zs_average(per_lang, r)]
        lines.append(f"{r:<{width}} " + " ".join(f"{v:7.2f}" for v in vals))
    lines.append(f"{'n':<{width}} " + " ".join(f"{int(per_lang[l].get('n', per_lang[l].get('n_captions', 0))):>7d}"
                                             for l in langs))
    lines.append("avg = mean over the non-English languages (the paper's ZS-XLT number)")
    return "\n".join(lines)


MISSING = -1.0   # IGLUE's results/ scripts write -1.0 for a language without a result and keep its column
N_ROW = "n"      # second CSV row: how many examples each number is over


def csv_langs(task: str, shots: int | str = 0) -> list[str]:
    """IGLUE's results/ columns: en + the target languages (zero-shot); the target languages only (few-shot)."""
    return (["en"] if not _is_fewshot(shots) else []) + list(TARGET_LANGS[task])


def _is_fewshot(shots: int | str) -> bool:
    return str(shots) not in ("0", "")


def csv_n(task: str, metrics: dict, metric: str) -> int:
    """Examples a number is over: questions / pairs (xgqa, xvnli), images (text retrieval), captions (image
    retrieval)."""
    if task == "xflickrco":
        return int(metrics["n_images" if metric.startswith("tr_") else "n_captions"])
    return int(metrics["n"])


def iglue_csv(task: str, per_lang: dict[str, dict], model_name: str, metric: str, shots: int | str = 0,
              extra_langs: Sequence[str] = ()) -> str:
    """IGLUE's results/ CSV: header model,<IGLUE's languages>,avg (get_<task>_zero.py / _few.py column order),
    the model's row, and a row "n" with the number of examples of each language (-1 where missing). A language
    without a result is -1.0, as IGLUE writes it; avg is IGLUE's mean over the target languages when all of them
    have a result, else -1.0 (IGLUE's formula would average the -1.0s in). Languages outside IGLUE's list
    (extra_langs, e.g. a dev split's) are appended before avg."""
    langs = csv_langs(task, shots) + [l for l in extra_langs if l not in csv_langs(task, shots)]
    targets = [l for l in TARGET_LANGS[task] if l in langs]
    values = {l: float(per_lang[l][metric]) if l in per_lang and metric in per_lang[l] else MISSING for l in langs}
    avg = sum(values[l] for l in targets) / len(targets) if all(l in per_lang for l in targets) else MISSING
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model"] + langs + ["avg"])
    w.writerow([model_name] + [values[l] for l in langs] + [avg])
    w.writerow([N_ROW] + [csv_n(task, per_lang[l], metric) if l in per_lang else -1 for l in langs] + [""])
    return buf.getvalue()


def csv_name(task: str, metric: str, shots: int, translate_test: bool, split: str = "test") -> str:
    """IGLUE's file names for the test split: xGQA_0.csv, XVNLI_0.mt.csv, xFlickrCO_ir_0.csv, xGQA_48.csv
    (few-shot); another split is named in the file (xGQA_0.dev.csv), so it never replaces the test numbers."""
    part = {"tr_r1": "_tr", "ir_r1": "_ir"}.get(metric, "")
    other = "" if split == "test" else f".{split}"
    return f"{CSV_STEM[task]}{part}_{shots}{other}{'.mt' if translate_test else ''}.csv"


def eval_key(split: str, translate_test: bool) -> str:
    return split + (".mt" if translate_test else "")


def predictions_name(record: dict, lang: str) -> str:
    """IGLUE's per-language result file: <split>_<lang>_<shots>_result.json (VOLTA's eval_task.py writes
    <split>_result.json; IGLUE's analysis notebooks read results/xgqa/<zero|few>_shot/<model>/
    test_<lang>_<shots>_result.json). Translate-test: <split>_<lang>_mt_<shots>_result.json."""
    mt = "_mt" if record["translate_test"] and lang != "en" else ""
    return f"{record['split']}_{lang}{mt}_{record.get('shots', 0)}_result.json"


def predictions_json(task: str, preds: Sequence[tuple[str, int]], names: Sequence[str]) -> str:
    """One language's per-example predictions as VOLTA's eval_task.py writes them: xGQA (VL-classifier-GQA)
    [{"questionId", "prediction": answer}], the input of GQA_score.py and of IGLUE's xGQA analysis notebook;
    XVNLI (VL-classifier) [{"question_id": pairID, "answer": entailment|neutral|contradiction}]. names[label]:
    the answer / class name of each label id of the model (see label_names)."""
    if task not in ("xgqa", "xvnli"):
        raise ValueError(f"no per-example predictions file for {task}")
    key, value = ("questionId", "prediction") if task == "xgqa" else ("question_id", "answer")
    return json.dumps([{key: str(i), value: names[p] if 0 <= p < len(names) else ""} for i, p in preds]) + "\n"


def label_names(model_name: str, task: str, data_root) -> list[str]:
    """Name of each label id the model predicts: the GQA answers (label2ans) or the model's XVNLI class order."""
    if task == "xgqa":
        return data.load_answer_vocab(data_root)[1]
    return list(data.XVNLI_LABELS_UC2 if model_name == "uc2" else data.XVNLI_LABELS_CCLM)


def write_results(out_dir: str | Path, record: dict, model_name: str) -> Path:
    """Merge one evaluation into out_dir/results.json under its key (split[.mt]) and write the
    IGLUE CSV(s). Called only after the evaluation finished, so a failed run never replaces a good
    result; other keys (e.g. translate-test next to test) are kept, and so are the other languages of
    an earlier evaluation of the same checkpoint file (`--langs de` after a full evaluation)."""
    out_dir = Path(out_dir)
    path = out_dir / "results.json"
    results = data.read_json(path, annotations=False) if path.exists() else {}
    key = eval_key(record["split"], record["translate_test"])
    prev = results.get(key)
    if prev and prev.get("checkpoint_file") == record.get("checkpoint_file") and record.get("checkpoint_file"):
        langs = {**prev["langs"], **record["langs"]}
        record = {**record, "langs": langs, "summary": summarize(record["task"], langs),
                  "files": {**prev.get("files", {}), **record.get("files", {})}}
    results[key] = record
    engine.atomic_write_text(path, json.dumps(results, indent=1, sort_keys=True) + "\n")
    for metric in MAIN_METRICS[record["task"]]:
        name = csv_name(record["task"], metric, record.get("shots", 0), record["translate_test"], record["split"])
        extra = [l for l in ordered_langs(record["langs"]) if l not in ("en",) + TARGET_LANGS[record["task"]]]
        engine.atomic_write_text(out_dir / name, iglue_csv(record["task"], record["langs"], model_name, metric,
                                                    record.get("shots", 0), extra))
    return path


def checkpoint_file_id(path: str | Path) -> str:
    """Which checkpoint file an evaluation used: path, size and modification time (a re-trained run differs)."""
    st = Path(path).stat()
    return f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}"


# ---------------------------------------------------------------------------------------------
# Runs: identity, per-epoch metrics log

def run_info(run: str | Path) -> dict:
    """model/task/policy/... of a run folder: results.json (what `evaluate` recorded), else
    args.json + the checkpoint's meta. Keys: model, task, policy, llrd_decay, top_layers, shots,
    fewshot_lang, init_policy (few-shot: the English run's policy)."""
    run = Path(run)
    info: dict = {}
    res = run / "results.json"
    if res.exists():
        for rec in data.read_json(res, annotations=False).values():
            info.update({k: rec.get(k) for k in ("model", "task", "policy", "llrd_decay", "top_layers",
                                                  "shots", "fewshot_lang", "init_policy") if rec.get(k) is not None})
            break
    if not {"model", "task", "policy"} <= set(info):
        args = data.read_json(run / "args.json", annotations=False) if (run / "args.json").exists() else {}
        meta = {}
        for name in ("model_final.pt", "checkpoint_last.pt"):
            if (run / name).exists() and "model" not in args:
                meta = load_meta(run / name)
                break
        for k in ("model", "task", "policy", "llrd_decay", "top_layers"):
            info.setdefault(k, args.get(k, meta.get(k)))
        fs = (data.read_json(run / "fewshot.json", annotations=False) if (run / "fewshot.json").exists() else {})
        for k in ("shots", "fewshot_lang", "init_policy"):
            if fs.get(k) is not None:
                info.setdefault(k, fs[k])
    info.setdefault("shots", 0)
    return info


def load_meta(path: str | Path) -> dict:
    """The metadata dict of a checkpoint, memory-mapped so the weights are not read."""
    try:
        ckpt = engine.read_torch_file(path, mmap=True)
    except engine.UnsafeCheckpointError:
        raise
    except Exception as e:   # noqa: BLE001 - any unreadable file: one clear line
        raise ValueError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from None
    meta = ckpt.get("meta") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: no 'meta' dict in the checkpoint (not written by train_uc2/train_cclm?)")
    return meta


def read_epoch_metrics(run: str | Path, split: str | None = None) -> list[tuple[int, dict[str, dict]]]:
    """[(epoch, {lang: metrics})] from the run's metrics.jsonl (engine.train writes one line per
    epoch and language: {"type": "eval", "epoch", "step", "lang", "split", <metric>: value, ...}),
    only the lines of `split` if given. A later line for the same epoch and language wins (a resumed
    run re-logs its epoch)."""
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        raise ValueError(f"{path}: not found (no per-epoch metrics log in this run folder)")
    by_epoch: dict[int, dict] = {}
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):   # a run killed mid-write leaves half a last line: the epochs before it stand
                break
            raise ValueError(f"{path}:{n}: not valid JSON") from None
        if rec.get("type") == "eval" and "lang" in rec and "epoch" in rec and split in (None, rec.get("split")):
            metrics = {k: v for k, v in rec.items() if k not in ("type", "epoch", "step", "lang", "split")
                       and isinstance(v, (int, float))}
            by_epoch.setdefault(int(rec["epoch"]), {})[rec["lang"]] = metrics
    return sorted(by_epoch.items())


# ---------------------------------------------------------------------------------------------
# Figures 2-4

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def run_label(run: str | Path, info: dict) -> str:
    pol = info.get("policy") or "?"
    if pol == "llrd" and info.get("llrd_decay") is not None:
        pol += f" d={info['llrd_decay']}"
    if pol == "top" and info.get("top_layers") is not None:
        pol += f" m={info['top_layers']}"
    return f"{Path(run).name} ({info.get('model', '?')}, {pol})"


def curves(runs: Sequence[str | Path]) -> dict:
    """The numbers behind Figures 2 and 3: per run, per epoch, per language, every metric logged."""
    out = {}
    for run in runs:
        info = run_info(run)
        epochs = read_epoch_metrics(run)
        if not epochs:
            raise ValueError(f"{Path(run) / 'metrics.jsonl'}: no per-epoch evaluation lines")
        langs = ordered_langs({l for _, ev in epochs for l in ev})
        metrics = sorted({m for _, ev in epochs for lm in ev.values() for m in lm})
        series = {m: {l: [ev.get(l, {}).get(m, float("nan")) for _, ev in epochs] for l in langs} for m in metrics}
        for m in metrics:
            series[m]["avg"] = [zs_average(ev, m) for _, ev in epochs]
        out[str(run)] = {"label": run_label(run, info), "info": info, "epochs": [e for e, _ in epochs],
                         "langs": langs, "series": series}
    return out


def _write_curve_numbers(data: dict, metrics: Sequence[str], stem: Path) -> None:
    engine.atomic_write_text(stem.with_suffix(".json"), json.dumps(
        {r: {"label": d["label"], "epochs": d["epochs"], "series": {m: d["series"][m] for m in metrics if m in d["series"]}}
         for r, d in data.items()}, indent=1) + "\n")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["run", "epoch", "lang", "metric", "value"])
    for r, d in data.items():
        for m in metrics:
            for lang, vals in d["series"].get(m, {}).items():
                for e, v in zip(d["epochs"], vals):
                    w.writerow([Path(r).name, e, lang, m, v])
    engine.atomic_write_text(stem.with_suffix(".csv"), buf.getvalue())


def plot_curves(runs: Sequence[str | Path], out_dir: str | Path, tag: str = "") -> list[Path]:
    """Figure 2 (per-epoch metric per language, one panel per run, side by side like the paper's
    standard vs SUF) and, for xGQA, Figure 3 (per-epoch accuracy per question type: mean over the
    non-English languages solid, English dashed). PNG + .json + .csv of the numbers."""
    plt = _plt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = curves(runs)
    tasks = {d["info"].get("task") for d in data.values()}
    task = tasks.pop() if len(tasks) == 1 else None
    main = list(MAIN_METRICS.get(task, ("accuracy",)))
    written = []
    stem = out_dir / f"fig2_per_language{tag}"
    fig, axes = plt.subplots(len(main), len(data), figsize=(5 * len(data), 3.6 * len(main)),
                             squeeze=False, sharey="row")
    for col, d in enumerate(data.values()):
        for row, m in enumerate(main):
            ax = axes[row][col]
            for lang in d["langs"] + ["avg"]:
                vals = d["series"].get(m, {}).get(lang)
                if vals is None:
                    continue
                style = {"en": dict(lw=2.5, color="black"), "avg": dict(lw=2, ls="--", color="gray")}.get(lang, {})
                ax.plot(d["epochs"], vals, marker="o", ms=3, label=lang if lang != "avg" else "avg (non-en)", **style)
            ax.set_title(d["label"], fontsize=9)
            ax.set_xticks(d["epochs"])
            ax.set_xlabel("epoch")
            ax.set_ylabel(m)
            ax.grid(alpha=0.3)
        axes[0][col].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    plt.close(fig)
    _write_curve_numbers(data, main, stem)
    written.append(stem.with_suffix(".png"))
    if task == "xgqa":
        stem = out_dir / f"fig3_per_qtype{tag}"
        metrics = [f"accuracy_{t}" for t in QTYPES]
        fig, axes = plt.subplots(1, len(data), figsize=(5 * len(data), 3.6), squeeze=False, sharey="row")
        for col, d in enumerate(data.values()):
            ax = axes[0][col]
            for i, m in enumerate(metrics):
                if m not in d["series"]:
                    continue
                color = f"C{i}"
                ax.plot(d["epochs"], d["series"][m]["avg"], marker="o", ms=3, color=color, label=m.split("_")[1])
                if "en" in d["series"][m]:
                    ax.plot(d["epochs"], d["series"][m]["en"], ls=":", color=color)
            ax.set_title(d["label"], fontsize=9)
            ax.set_xticks(d["epochs"])
            ax.set_xlabel("epoch")
            ax.set_ylabel("accuracy (solid: non-en avg, dotted: en)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(stem.with_suffix(".png"), dpi=120)
        plt.close(fig)
        _write_curve_numbers(data, metrics, stem)
        written.append(stem.with_suffix(".png"))
    return written


def plot_similarity(sim: dict, path: str | Path, title: str = "") -> None:
    """Figure 4 heat map: cosine similarity of translation pairs x100 (the paper's percentage
    points), the unpaired baseline in the title."""
    plt = _plt()
    langs, mat = sim["langs"], [[100.0 * v for v in row] for row in sim["matrix"]]
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(langs), 0.8 + 0.6 * len(langs)))
    ax.imshow(mat, vmin=0, vmax=100, cmap="viridis")
    ax.set_xticks(range(len(langs)), langs)
    ax.set_yticks(range(len(langs)), langs)
    for i in range(len(langs)):
        for j in range(len(langs)):
            ax.text(j, i, f"{mat[i][j]:.0f}", ha="center", va="center", fontsize=8,
                    color="white" if mat[i][j] < 60 else "black")
    ax.set_title(f"{title}\n(unpaired similarity: {100 * sim['unpaired']:.0f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Tables 1-3 from run folders

def run_results(run: str | Path, split: str = "test") -> dict | None:
    """The run's evaluation for the table: results.json[split] (written by `evaluate`), else the last
    epoch of metrics.jsonl evaluated on that split (the evaluation the trainer ran after its final epoch)."""
    run = Path(run)
    info = run_info(run)
    res = data.read_json(run / "results.json", annotations=False) if (run / "results.json").exists() else {}
    if split in res:
        ckpt = str(res[split].get("checkpoint", ""))
        unfinished = f"evaluated {ckpt} (epoch {res[split].get('epoch')})" if ckpt.endswith(engine.CHECKPOINT) else None
        return {**info, "langs": res[split]["langs"], "source": f"results.json[{split}]", "unfinished": unfinished}
    if (run / "metrics.jsonl").exists():
        epochs = read_epoch_metrics(run, split)
        if epochs:
            e, ev = epochs[-1]
            return {**info, "langs": ev, "source": f"metrics.jsonl epoch {e} ({split})",
                    "unfinished": _unfinished(run, e)}
    return None


def _unfinished(run: Path, last_epoch: int) -> str | None:
    """Why a run's last evaluated epoch is not its final result (None: finished): no model_final.pt while a
    checkpoint_last.pt shows it stopped (or paused), or fewer epochs evaluated than args.json planned."""
    if (run / engine.FINAL).exists():
        return None
    args = data.read_json(run / "args.json", annotations=False) if (run / "args.json").exists() else {}
    planned = args.get("epochs")
    if (run / engine.CHECKPOINT).exists() or (planned and last_epoch < planned):
        return f"epoch {last_epoch} of {planned or '?'}, no {engine.FINAL}"
    return None


def _mean(vals: list[float]) -> float:
    vals = [v for v in vals if v == v]
    return sum(vals) / len(vals) if vals else float("nan")


def _cell(ours: float | None, paper: float | None, partial: bool = False, unfinished: bool = False) -> str:
    o = "-" if ours is None or ours != ours else f"{ours:.1f}" + ("*" if partial else "") + ("!" if unfinished else "")
    return o if paper is None else f"{o} ({paper:.1f})"


def _setup_name(r: dict) -> str:
    name = {"uc2": "UC2", "cclm": "CCLM"}.get(r.get("model"), str(r.get("model")))
    pol = r.get("policy")
    extra = {"full": "", "suf": "+SUF", "llrd": f"+LLRD(d={r.get('llrd_decay')})",
             "top": f"+top{r.get('top_layers')}"}.get(pol, f"+{pol}")
    return name + extra


def build_tables(runs: Sequence[str | Path], split: str = "test") -> dict:
    """Rows of Tables 1-3 (ours beside the paper's). Several runs of one setup are averaged."""
    recs = [{**r, "run": str(run)} for run in runs if (r := run_results(run, split)) is not None]
    zs = [r for r in recs if not r.get("shots")]
    fs = [r for r in recs if r.get("shots")]
    groups: dict[tuple, list] = {}
    for r in zs:
        key = (r.get("model"), r.get("policy"), r.get("llrd_decay") if r.get("policy") == "llrd" else None,
               r.get("top_layers") if r.get("policy") == "top" else None)
        groups.setdefault(key, []).append(r)

    def en_avg(rs: list[dict], task: str, metric: str) -> tuple[float, float]:
        rs = [r for r in rs if r.get("task") == task]
        return (_mean([r["langs"].get("en", {}).get(metric, float("nan")) for r in rs]),
                _mean([zs_average(r["langs"], metric) for r in rs]))

    def unfinished(rs: list[dict], task: str) -> bool:
        """True when a number comes from a run that has not finished (marked ! in the table)."""
        return any(r.get("unfinished") for r in rs if r.get("task") == task)

    def partial(rs: list[dict], task: str) -> bool:
        """True when a run's average misses some of IGLUE's target languages (marked * in the table)."""
        return any(set(TARGET_LANGS[task]) - set(r["langs"]) for r in rs if r.get("task") == task)

    cols = [("xgqa", "accuracy"), ("xvnli", "accuracy"), ("xflickrco", "tr_r1"), ("xflickrco", "ir_r1")]
    table1 = []
    order = sorted(groups, key=lambda k: (str(k[0]), ["full", "suf", "top", "llrd"].index(k[1])
                                           if k[1] in ("full", "suf", "top", "llrd") else 9, str(k[2]), str(k[3])))
    for key in order:
        rs = groups[key]
        paper = PAPER_TABLE1.get((key[0], key[1])) if key[2] is None and key[3] is None else None
        row = {"setup": _setup_name(rs[0]), "runs": [r.get("source") for r in rs], "cells": {}}
        for task, metric in cols:
            en, avg = en_avg(rs, task, metric)
            p = (paper or {}).get(task if metric == "accuracy" else metric)
            row["cells"][f"{task}:{metric}"] = {"en": en, "avg": avg, "paper_en": p[0] if p else None,
                                                 "paper_avg": p[1] if p else None, "partial": partial(rs, task),
                                                 "unfinished": unfinished(rs, task)}
        table1.append(row)
    table2 = []
    for key in order:
        if key[0] != "cclm":
            continue
        en, avg = en_avg(groups[key], "xgqa", "accuracy")
        paper = PAPER_TABLE2.get(key[1]) if (key[1] != "top" or key[3] == 6) and key[2] is None else None
        if en == en or avg == avg:
            table2.append({"setup": _setup_name(groups[key][0]), "en": en, "avg": avg,
                           "partial": partial(groups[key], "xgqa"), "unfinished": unfinished(groups[key], "xgqa"),
                           "paper_en": paper[0] if paper else None, "paper_avg": paper[1] if paper else None})
    table3 = []
    for pol in ("full", "suf"):
        zs_avg = en_avg(groups.get(("uc2", pol, None, None), []), "xgqa", "accuracy")[1]
        fs_runs = [r for r in fs if r.get("model") == "uc2" and r.get("task") == "xgqa" and r.get("init_policy") == pol]
        # each few-shot run adapts to one language: the few-shot number is the mean of those languages
        fs_vals = {r["fewshot_lang"]: r["langs"].get(r["fewshot_lang"], {}).get("accuracy", float("nan"))
                   for r in fs_runs if r.get("fewshot_lang")}
        table3.append({"setup": {"full": "Standard", "suf": "SUF"}[pol], "zero_shot": zs_avg,
                       "few_shot": _mean(list(fs_vals.values())), "few_shot_langs": sorted(fs_vals),
                       "shots": sorted({r["shots"] for r in fs_runs}), "paper_zero_shot": PAPER_TABLE3[pol][0],
                       "paper_few_shot": PAPER_TABLE3[pol][1]})
    per_lang = {}
    for (task, metric), paper_rows in PAPER_PER_LANG.items():
        for key in order:
            rs = [r for r in groups[key] if r.get("task") == task]
            if not rs:
                continue
            langs = ordered_langs({l for r in rs for l in r["langs"]})
            paper = paper_rows.get((key[0], key[1])) if key[2] is None and key[3] is None else None
            per_lang.setdefault(f"{task}:{metric}", []).append(
                {"setup": _setup_name(rs[0]),
                 "ours": {l: _mean([r["langs"].get(l, {}).get(metric, float("nan")) for r in rs]) for l in langs},
                 "paper": paper})
    unfinished_runs = [f"{r['source']} of {r['run']}: {r['unfinished']}" for r in recs if r.get("unfinished")]
    return {"table1": table1, "table2": table2, "table3": table3, "per_language": per_lang,
            "unfinished": unfinished_runs}


def merged_iglue_csvs(runs: Sequence[str | Path], split: str = "test") -> dict[str, str]:
    """{file name: CSV text}: IGLUE's results/ files over several runs, one row per run (named by its folder, as
    `evaluate` names it) and the row "n" of each (see iglue_csv). A few-shot run adapts to one language, so the
    few-shot runs that start from one English run (one folder per target language) are merged into one row,
    named by that English run: xGQA_48.csv with IGLUE's few-shot columns (target languages, avg over them;
    -1.0 where a language has no run yet)."""
    rows: dict[str, dict[str, dict]] = {}   # file name -> {setup name -> {lang: metrics}}
    for run in runs:
        r = run_results(run, split)
        if r is None or r.get("task") not in TASKS:
            continue
        shots = r.get("shots") or 0
        fewshot = _is_fewshot(shots)
        setup = Path(run).name
        if fewshot and (Path(run) / "fewshot.json").is_file():
            info = data.read_json(Path(run) / "fewshot.json", annotations=False)
            setup = Path(info.get("init_checkpoint", run)).parent.name
        langs = {r["fewshot_lang"]: r["langs"][r["fewshot_lang"]]} if fewshot and r.get("fewshot_lang") in r["langs"] \
            else r["langs"]
        for metric in MAIN_METRICS[r["task"]]:
            merged = rows.setdefault(csv_name(r["task"], metric, shots, False, split), {}).setdefault(setup, {})
            merged.update(langs)
            merged.setdefault("_task", {"task": r["task"], "metric": metric, "shots": shots})
    out = {}
    for name, setups in rows.items():
        lines = []
        for setup, langs in setups.items():
            spec = langs["_task"]
            per_lang = {l: m for l, m in langs.items() if l != "_task"}
            text = iglue_csv(spec["task"], per_lang, setup, spec["metric"], spec["shots"]).splitlines()
            lines += ([text[0]] if not lines else []) + text[1:]
        out[name] = "\n".join(lines) + "\n"
    return out


def format_tables(t: dict, per_language: bool = False) -> str:
    out = ["Table 1: ours (paper). EN and ZS-XLT = mean over non-English languages; accuracy / R@1; "
           "* = not all of IGLUE's target languages were evaluated; ! = from a run that has not finished.",
           f"{'setup':<20}" + "".join(f"{h:>15}" for h in (
               "xGQA EN", "xGQA ZS", "XVNLI EN", "XVNLI ZS", "TR EN", "TR ZS", "IR EN", "IR ZS"))]
    for row in t["table1"]:
        cells = []
        for c in ("xgqa:accuracy", "xvnli:accuracy", "xflickrco:tr_r1", "xflickrco:ir_r1"):
            v = row["cells"][c]
            cells += [_cell(v["en"], v["paper_en"], unfinished=v["unfinished"]),
                      _cell(v["avg"], v["paper_avg"], v["partial"], v["unfinished"])]
        out.append(f"{row['setup']:<20}" + "".join(f"{c:>15}" for c in cells))
    if t["table2"]:
        out += ["", "Table 2: CCLM on xGQA, ours (paper); top6 = CM only.", f"{'setup':<20}{'en':>15}{'avg':>15}"]
        out += [f"{r['setup']:<20}{_cell(r['en'], r['paper_en'], unfinished=r['unfinished']):>15}"
                f"{_cell(r['avg'], r['paper_avg'], r['partial'], r['unfinished']):>15}" for r in t["table2"]]
    if any(r["few_shot"] == r["few_shot"] or r["zero_shot"] == r["zero_shot"] for r in t["table3"]):
        out += ["", "Table 3: UC2 on xGQA, target-language mean, ours (paper); few-shot = standard fine-tuning "
                "on the target language after English training with the row's policy.",
                f"{'setup':<20}{'zero-shot':>15}{'few-shot':>15}  few-shot languages"]
        out += [f"{r['setup']:<20}{_cell(r['zero_shot'], r['paper_zero_shot']):>15}"
                f"{_cell(r['few_shot'], r['paper_few_shot']):>15}  {','.join(r['few_shot_langs']) or '-'}"
                for r in t["table3"]]
    if t.get("unfinished"):
        out += ["", "! unfinished runs (their last evaluated epoch is shown):"] + [f"  {u}" for u in t["unfinished"]]
    if per_language:
        for name, rows in t["per_language"].items():
            langs = ordered_langs({l for r in rows for l in r["ours"]})
            out += ["", f"Per language ({name}), ours (paper):", f"{'setup':<20}" + "".join(f"{l:>13}" for l in langs)]
            out += [f"{r['setup']:<20}" + "".join(
                f"{_cell(r['ours'].get(l), (r['paper'] or {}).get(l)):>13}" for l in langs) for r in rows]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Evaluation sets (data.py) and evaluate_task (the trainers' per-epoch evaluate_fn)

@dataclass
class EvalSet:
    """One language's test data: `dataset` (xgqa/xvnli) or `images` + `captions` (xflickrco)."""
    lang: str
    split: str
    translate_test: bool
    collate: Callable
    dataset: Any = None
    images: Any = None
    captions: Any = None
    source: str = ""
    examples: Sequence = ()   # the annotations read (data.check_inputs)


def eval_langs(data_root, task: str, split: str = "test", langs=None, translate_test: bool = False) -> list[str]:
    """Languages of (task, split) found under data_root (`langs` selects). With translate_test the
    English test set is the original one (IGLUE's .mt results keep the English column)."""
    found = set(data.available_langs(data_root, task, split, translate_test))
    if translate_test:
        found = (found - {"en"}) | ({"en"} & set(data.available_langs(data_root, task, split)))
    if not found:
        raise ValueError(f"{task}: no {'translate-test ' if translate_test else ''}{split!r} files under "
                         f"{data_root}; splits found: {', '.join(data.available_splits(data_root, task, translate_test)) or 'none'}")
    return ordered_langs(data.select_langs(langs, ordered_langs(found)))


def build_eval_sets(model_name: str, task: str, data_root, tokenizer, langs=None, split: str = "test",
                    translate_test: bool = False, features=None, images=None, max_regions: int = 36,
                    image_res: int = 384) -> dict[str, EvalSet]:
    """{lang: EvalSet} for every language of (task, split) under data_root (or `langs`)."""
    collate = data.make_collate(model_name, task, tokenizer, train=False)
    features = feature_reader(features) if model_name == "uc2" else None
    sets = {}
    for lang in eval_langs(data_root, task, split, langs, translate_test):
        mt = translate_test and lang != "en"
        examples = data.load_split(data_root, task, split, lang, translate_test=mt)
        source = str(data.split_file(data_root, task, split, lang, translate_test=mt))
        if task == "xflickrco":
            imgs, caps = data.make_retrieval_eval(model_name, examples, features=features, images=images,
                                                  max_regions=max_regions, image_res=image_res)
            sets[lang] = EvalSet(lang, split, mt, collate, images=imgs, captions=caps, source=source, examples=examples)
        else:
            ds = data.make_dataset(model_name, task, examples, features=features, images=images, train=False,
                                   max_regions=max_regions, image_res=image_res)
            sets[lang] = EvalSet(lang, split, mt, collate, dataset=ds, source=source, examples=examples)
    return sets


def trainer_evaluate_fn(model_name: str, args: argparse.Namespace, tokenizer, dist, *, features=None, images=None,
                        max_regions: int = 36, image_res: int = 384, pair_batch: int = 1024) -> Callable:
    """The trainers' per-epoch evaluate_fn(model, epoch) -> {lang: metrics}: evaluate_task on --eval-split of
    --langs, sharded over ranks. Every feature key / image file is checked now (ValueError): a missing
    one stops the run before training, not after its first epoch."""
    sets = build_eval_sets(model_name, args.task, args.data_root, tokenizer, langs=args.langs, split=args.eval_split,
                           features=features, images=images, max_regions=max_regions, image_res=image_res)
    for s in sets.values():
        data.check_inputs(s.examples, features=feature_reader(features), images=images)
    # every evaluation image decoded once (languages share them): a corrupt one stops the run now, not after epoch 1
    data.check_inputs([ex for s in sets.values() for ex in s.examples], features=feature_reader(features),
                      images=images, sample=None)
    unknown = [lang for lang in getattr(args, "eval_langs", None) or [] if lang not in sets]
    if unknown:
        raise ValueError(f"--eval-langs {' '.join(unknown)}: not among the evaluated languages "
                         f"({' '.join(ordered_langs(sets))}; see --langs)")

    def evaluate_fn(model: torch.nn.Module, epoch: int, langs: Sequence[str] | None = None) -> dict:
        return evaluate_task(model, args.task, sets, dist, batch_size=args.eval_batch_size,
                             num_workers=args.num_workers, pair_batch=pair_batch, langs=langs)
    return evaluate_fn


def feature_reader(features):
    """--features as the trainers take it (one path or several): the image-keyed files (a per-question
    serialized GQA LMDB holds no test images), several searched in order (train_uc2.FeatureSet)."""
    if features is None or not isinstance(features, (list, tuple)):
        return features
    keyed = [str(p) for p in features if not data.is_serialized_lmdb(p)]
    if len(keyed) <= 1:
        return keyed[0] if keyed else None
    return importlib.import_module("train_uc2").FeatureSet(keyed)


def _loader(dataset, indices, collate, batch_size: int, num_workers: int):
    from torch.utils.data import Subset
    return data.BatchLoader(Subset(dataset, list(indices)), batch_size=batch_size, shuffle=False, collate_fn=collate,
                            num_workers=num_workers, persistent_workers=False)


def _progress(batches, desc: str, dist):
    """A progress bar over evaluation batches, on rank 0 only (it goes away when done)."""
    from tqdm import tqdm
    return tqdm(batches, desc=desc, leave=False, dynamic_ncols=True, disable=dist is not None and not dist.is_main)


def _device_of(model: torch.nn.Module, dist) -> torch.device:
    if dist is not None:
        return dist.device
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def evaluate_task(model: torch.nn.Module, task: str, sets: dict[str, EvalSet], dist=None, *, batch_size: int = 64,
                  num_workers: int = 0, amp: str = "off", k_test: int | None = None, pair_batch: int = 1024,
                  itm_batch: int = 128, langs: Sequence[str] | None = None,
                  predictions: dict | None = None) -> dict[str, dict]:
    """{lang: metrics} on every rank. Each rank runs its engine.shard of every test set; engine.gather
    assembles the predictions (retrieval: the score matrices), so every example counts exactly once and
    the numbers equal a single-process run. The model is put in eval mode and restored afterwards.
    `predictions` (xgqa/xvnli): filled with {lang: [(example id, predicted label), ...]} in file order."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    device = _device_of(model, dist)
    results = {}
    encoded: dict = {}   # CCLM retrieval: the last language's encoded images, reused by the next with the same ones
    try:
        for lang in (langs or ordered_langs(sets)):
            s = sets[lang]
            if task == "xflickrco":
                results[lang] = _evaluate_retrieval(model, s, dist, device, batch_size, num_workers, amp,
                                                    k_test, pair_batch, itm_batch, encoded=encoded)
                continue
            n = len(s.dataset)
            mine = engine.shard(n, dist)
            batches = _progress(_loader(s.dataset, mine, s.collate, batch_size, num_workers), f"{task} {lang}", dist)
            local = predict_records(model, batches, device, amp)
            records = engine.gather(list(zip(mine, local, strict=True)), dist)
            if sorted(i for i, _ in records) != list(range(n)):   # every example exactly once
                raise RuntimeError(f"{task} {lang}: gathered {len(records)} predictions for {n} examples")
            ids, preds, labels, qtypes = zip(*(r for _, r in sorted(records)))
            results[lang] = classification_metrics(preds, labels, qtypes if task == "xgqa" else None)
            if predictions is not None:
                predictions[lang] = list(zip(ids, preds))
    finally:
        model.train(was_training)
    return results


def _recorded(batches, kept: list):
    """Yield the batches, keeping each (cclm_score_matrices stores its encoding in it; pixels dropped after)."""
    for b in batches:
        kept.append(b)
        yield b
        b.pop("images", None)


def _evaluate_retrieval(model, s: EvalSet, dist, device, batch_size, num_workers, amp, k_test, pair_batch, itm_batch,
                        encoded: dict | None = None):
    n_img, n_txt = len(s.images), len(s.captions)
    txt2img = [ex.label for ex in s.captions.examples]
    cap_shard = engine.shard(n_txt, dist)
    captions = _progress(_loader(s.captions, cap_shard, s.collate, batch_size, num_workers),
                         f"xflickrco {s.lang} captions", dist)
    if hasattr(model, "pair_scores"):   # UC2: every pair; images on every rank, captions sharded
        img_batches = list(_loader(s.images, range(n_img), s.collate, batch_size, num_workers))
        images = {k: torch.cat([b[k] for b in img_batches]) for k in ("features", "spatials", "image_mask")}
        cap_batches = list(captions)
        texts = {"input_ids": _pad_cat([b["input_ids"] for b in cap_batches], value=1) if cap_batches
                 else torch.ones(0, 1, dtype=torch.long),
                 "attention_mask": _pad_cat([b["attention_mask"] for b in cap_batches]) if cap_batches
                 else torch.zeros(0, 1, dtype=torch.long)}
        rows = uc2_score_matrix(model, images, texts, pair_batch, device, amp)
        scores = torch.cat([r for r in engine.gather([rows], dist)])
        if scores.shape != (n_txt, n_img):
            raise RuntimeError(f"xflickrco {s.lang}: gathered a {tuple(scores.shape)} score matrix for "
                               f"{n_txt} captions x {n_img} images")
        return recall_metrics(scores.t(), scores, txt2img, ties=TIE_ORDER_OF_MODEL["uc2"])
    img_shard = engine.shard(n_img, dist)
    key = (tuple(s.images.items[i].image for i in img_shard), getattr(s.images, "image_res", None))
    if encoded is not None and key in encoded:   # xFlickrCo's languages share their test images
        images = encoded[key]
    else:
        images = _recorded(_progress(_loader(s.images, img_shard, s.collate, batch_size, num_workers),
                                     f"xflickrco {s.lang} images", dist), kept := [])
        if encoded is not None:
            encoded.clear()   # one language's images at a time: the memory a single evaluation holds anyway
            encoded[key] = kept
    k = k_test if k_test is not None else int(getattr(model, "config", {}).get("k_test", 128))
    i2t, t2i = cclm_score_matrices(model, images, captions, img_shard.start, n_img, n_txt, k=k,
                                   itm_batch=itm_batch, dist=dist, device=device, amp=amp)
    return recall_metrics(i2t, t2i, txt2img, unscored=UNSCORED, ties=TIE_ORDER_OF_MODEL["cclm"])


# ---------------------------------------------------------------------------------------------
# Checkpoints -> models

def load_model(path: str | Path, device="cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the task model from a checkpoint written by train_uc2/train_cclm ({"model", "meta"}):
    meta["model"] picks the script (imported lazily), build_model(meta["task"], meta["config"])."""
    state = engine.load_checkpoint(path)
    meta = state.get("meta") if isinstance(state, dict) else None
    if not isinstance(meta, dict) or meta.get("model") not in ("uc2", "cclm") or "config" not in meta:
        raise ValueError(f"{path}: no meta with model uc2|cclm and config (not a train_uc2/train_cclm checkpoint)")
    script = importlib.import_module(f"train_{meta['model']}")
    model = script.build_model(meta["task"], meta["config"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit a {meta['model']} {meta['task']} model "
                         f"({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), meta


def load_released_uc2(path: str | Path, task: str, config: str = "base", device="cpu") -> tuple[torch.nn.Module, dict]:
    """A released fine-tuned UC2 checkpoint (IGLUE's VOLTA-format pytorch_model_best.bin / .tar, no meta of
    ours) as a task model, with the meta evaluate needs (policy "released")."""
    train_uc2 = importlib.import_module("train_uc2")
    cfg = train_uc2.resolve_config(config)
    model = train_uc2.build_model(task, cfg)
    try:
        plan = train_uc2.load_into(model, str(path))
    except ValueError as e:   # its first line names the file and the first bad key; the plan follows
        raise ValueError(f"{str(e).splitlines()[0]} (is it a fine-tuned UC2 {task} checkpoint?)") from None
    if plan.initialised:
        raise ValueError(f"{path}: not a fine-tuned UC2 {task} checkpoint (no weights for "
                         f"{', '.join(k for k, _ in plan.initialised[:3])})")
    return model.to(device).eval(), {"model": "uc2", "task": task, "config": cfg, "policy": "released"}


def prepare_model(model: torch.nn.Module, data_root, tokenizer) -> None:
    """CCLM xGQA ranks the 1,842 GQA answers: give the model the tokenised answer list in X2-VLM's order
    (tokenizer(answer_list, padding='longest'): <s> answer </s>)."""
    if hasattr(model, "set_answer_list"):
        # X2-VLM's xgqa_dataset: answer_list = list(json.load(trainval_ans2label.json).keys()), the candidate order
        # that decides first-token ties at the top-k prune; predictions map back to our label ids
        ans2label, _ = data.load_answer_vocab(data_root)
        answers = list(ans2label)
        model.set_answer_list(*data.encode_texts(tokenizer, answers, None),
                              labels=torch.tensor([ans2label[a] for a in answers]))


def _run_checkpoint(run: Path) -> Path:
    for name in (engine.FINAL, engine.CHECKPOINT):
        if (run / name).is_file():
            return run / name
    raise SystemExit(f"error: {run}: no {engine.FINAL} or {engine.CHECKPOINT} (not a finished run folder?)")


# ---------------------------------------------------------------------------------------------
# CLI

def _data_args(p: argparse.ArgumentParser, *, langs: bool = True, translate_test: bool = True,
               retrieval: bool = True) -> None:
    """Data and evaluation options; a command that would ignore one of them does not offer it
    (similarity: no translate-test or retrieval options; fewshot: --eval-langs instead of --langs)."""
    g = p.add_argument_group("data (default: the run's args.json)")
    g.add_argument("--data-root", default=None, help="IGLUE folder holding datasets/")
    g.add_argument("--features", nargs="+", default=None, help="UC2 region-feature LMDB/H5 file(s) holding the test images")
    g.add_argument("--images", default=None, help="CCLM image root (gqa/, flickr30k/, coco/)")
    g.add_argument("--tokenizer", default=None, help="XLM-R tokenizer folder or cached hub id (default: checkpoint meta)")
    g.add_argument("--max-regions", type=int, default=None, help="UC2 regions per image (default: run's, else 36)")
    e = p.add_argument_group("evaluation")
    if langs:
        e.add_argument("--langs", nargs="+", default=None, help="languages (default: all found)")
    e.add_argument("--split", default="test", help="IGLUE split (xGQA's IGLUE test = few_shot/<lang>/test.json)")
    if translate_test:
        e.add_argument("--translate-test", action="store_true",
                       help="IGLUE's machine-translated test files (English: original)")
    e.add_argument("--batch-size", type=int, default=64, help="examples per forward")
    e.add_argument("--num-workers", type=int, default=2, help="data-loader workers")
    e.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off", help="evaluation precision (default float32)")
    if retrieval:
        e.add_argument("--k-test", type=int, default=None, help="CCLM retrieval prefilter size (default: model config, 128)")
        e.add_argument("--pair-batch", type=int, default=1024, help="UC2 retrieval: (caption, image) pairs per forward")
        e.add_argument("--itm-batch", type=int, default=128, help="CCLM retrieval: pairs per ITM forward")


def _run_args(run: Path | None) -> dict:
    path = run / engine.ARGS if run is not None else None
    return data.read_json(path, annotations=False) if path is not None and path.is_file() else {}


def _resolve_data(args, run_args: dict, meta: dict) -> None:
    """Fill data arguments left unset from the run's args.json / the checkpoint meta."""
    for key in ("data_root", "features", "images", "max_regions"):
        if getattr(args, key) is None:
            setattr(args, key, run_args.get(key, meta.get(key)))
    if args.tokenizer is None:
        args.tokenizer = meta.get("tokenizer") or run_args.get("tokenizer")
    if isinstance(args.features, str):
        args.features = [args.features]
    if args.max_regions is None:
        args.max_regions = 36
    if not args.data_root:
        raise SystemExit("error: --data-root not given and not in the run's args.json")
    if not args.tokenizer:
        raise SystemExit("error: --tokenizer not given and not in the checkpoint meta / args.json")


def cmd_evaluate(args) -> int:
    dist = engine.setup_distributed()
    try:
        return _evaluate(args, dist)
    finally:
        engine.cleanup_distributed()


def _evaluate(args, dist) -> int:
    if bool(args.run) == bool(args.checkpoint):
        raise SystemExit("error: give exactly one of --run RUN_DIR or --checkpoint FILE")
    run = Path(args.run) if args.run else None
    ckpt = _run_checkpoint(run) if run else Path(args.checkpoint)
    out_dir = Path(args.output_dir) if args.output_dir else (run or ckpt.parent)
    try:
        if getattr(args, "released_task", None):
            model, meta = load_released_uc2(ckpt, args.released_task, args.released_config, dist.device)
        else:
            model, meta = load_model(ckpt, dist.device)
        _resolve_data(args, _run_args(run or ckpt.parent), meta)
        tokenizer = data.load_tokenizer(args.tokenizer)
        prepare_model(model, args.data_root, tokenizer)
        task = meta["task"]
        sets = build_eval_sets(meta["model"], task, args.data_root, tokenizer, args.langs, args.split,
                               args.translate_test, features=args.features, images=args.images,
                               max_regions=args.max_regions, image_res=meta["config"].get("image_res", 384))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    start = time.time()
    preds: dict[str, list] = {}
    try:   # bad data found while evaluating (e.g. a missing feature key or image): one line, nothing written
        results = evaluate_task(model, task, sets, dist, batch_size=args.batch_size, num_workers=args.num_workers,
                                amp=args.amp, k_test=args.k_test, pair_batch=args.pair_batch, itm_batch=args.itm_batch,
                                predictions=preds)
    except (ValueError, FloatingPointError) as e:  # FloatingPointError: NaN logits/scores are not an accuracy
        raise SystemExit(f"error: {e}") from None
    if dist.is_main:
        fewshot_file = out_dir / "fewshot.json"
        fewshot = data.read_json(fewshot_file, annotations=False) if fewshot_file.is_file() else {}
        sched = meta.get("schedule") or {}
        record = {"model": meta["model"], "task": task, "policy": meta.get("policy"),
                  "llrd_decay": sched.get("llrd_decay"), "top_layers": sched.get("top_layers"),
                  "suf_k": sched.get("suf_k"), "split": args.split, "translate_test": args.translate_test,
                  "shots": fewshot.get("shots", 0), "fewshot_lang": fewshot.get("fewshot_lang"),
                  "init_policy": fewshot.get("init_policy"), "checkpoint": str(ckpt), "epoch": meta.get("epoch"),
                  "checkpoint_file": checkpoint_file_id(ckpt),
                  "langs": results, "summary": summarize(task, results),
                  "files": {l: s.source for l, s in sets.items()}, "processes": dist.world,
                  "seconds": round(time.time() - start, 1), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        name = args.model_name or (run.name if run else ckpt.parent.name)
        title = (f"{task} {meta['model']} policy={meta.get('policy')} split={args.split}"
                 f"{' translate-test' if args.translate_test else ''} ({ckpt}, epoch {meta.get('epoch')})")
        print(format_table(task, results, title), flush=True)
        path = write_results(out_dir, record, name)
        names = label_names(meta["model"], task, args.data_root) if preds else []
        for lang, rows in preds.items():
            engine.atomic_write_text(out_dir / predictions_name(record, lang), predictions_json(task, rows, names))
        print(f"wrote {path} [{eval_key(args.split, args.translate_test)}] and "
              + ", ".join(csv_name(task, m, record['shots'], args.translate_test, args.split) for m in MAIN_METRICS[task]),
              flush=True)
    engine.barrier(dist)
    return 0


def cmd_similarity(args) -> int:
    """Figure 4 for one run: [CLS] features of every test language, pairwise parallel similarity."""
    dist = engine.setup_distributed()
    run = Path(args.run)
    try:
        model, meta = load_model(_run_checkpoint(run), dist.device)
        if meta["task"] not in ("xgqa", "xvnli"):
            raise SystemExit(f"error: similarity needs an xgqa or xvnli run (translation-parallel examples), "
                             f"{run} is {meta['task']}")
        _resolve_data(args, _run_args(run), meta)
        tokenizer = data.load_tokenizer(args.tokenizer)
        sets = build_eval_sets(meta["model"], meta["task"], args.data_root, tokenizer, args.langs, args.split,
                               features=args.features, images=args.images, max_regions=args.max_regions,
                               image_res=meta["config"].get("image_res", 384))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    sim = similarity_for(model, sets, dist, batch_size=args.batch_size, num_workers=args.num_workers, amp=args.amp)
    if dist.is_main:
        out = Path(args.out or run)
        out.mkdir(parents=True, exist_ok=True)
        sim.update(model=meta["model"], task=meta["task"], policy=meta.get("policy"), split=args.split,
                   checkpoint=str(_run_checkpoint(run)))
        engine.atomic_write_text(out / "fig4_cls_similarity.json", json.dumps(sim, indent=1) + "\n")
        plot_similarity(sim, out / "fig4_cls_similarity.png",
                        f"{meta['task']} {meta['model']} {meta.get('policy')}: [CLS] similarity x100")
        print("\n".join([" " * 4 + "".join(f"{l:>6}" for l in sim["langs"])] +
                        [f"{a:>4}" + "".join(f"{100 * v:6.0f}" for v in row) for a, row in zip(sim["langs"], sim["matrix"])]))
        print(f"unpaired similarity: {100 * sim['unpaired']:.1f}\nwrote {out / 'fig4_cls_similarity.json'}, .png")
    engine.cleanup_distributed()
    return 0


@torch.no_grad()
def similarity_for(model: torch.nn.Module, sets: dict[str, EvalSet], dist=None, *, batch_size: int = 64,
                   num_workers: int = 0, amp: str = "off") -> dict:
    """cls_similarity over the [CLS] features of every language's test set (sharded + gathered)."""
    model = unwrap(model).eval()
    device = _device_of(model, dist)
    feats = {}
    for lang, s in sets.items():
        loader = _loader(s.dataset, engine.shard(len(s.dataset), dist), s.collate, batch_size, num_workers)
        feats[lang] = dict(engine.gather(cls_records(model, loader, device, amp), dist))
    return cls_similarity(feats)


def cmd_plot(args) -> int:
    try:
        return _plot(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def _plot(args) -> int:
    runs = [Path(r) for r in args.runs if (Path(r) / engine.METRICS).is_file()]
    for r in sorted(set(map(Path, args.runs)) - set(runs)):
        print(f"note: {r} has no {engine.METRICS}: no curves", file=sys.stderr)
    if not runs:
        raise SystemExit(f"error: none of the folders given holds a {engine.METRICS}")
    groups: dict[tuple, list] = {}
    for r in runs:
        info = run_info(r)
        groups.setdefault((info.get("model"), info.get("task")), []).append(r)
    for (model, task), rs in groups.items():
        out = Path(args.out) if args.out else (rs[0] if len(rs) == 1 else rs[0].parent / "figures")
        tag = "" if len(groups) == 1 and (args.out or len(rs) == 1) else f"_{model}_{task}"
        for f in plot_curves(rs, out, tag):
            print(f"wrote {f} (+ .json, .csv)")
    return 0


def cmd_figures(args) -> int:
    """plot for all runs; similarity for every xgqa/xvnli run whose data is reachable."""
    cmd_plot(args)
    for r in args.runs:
        if not (Path(r) / engine.FINAL).is_file() and not (Path(r) / engine.CHECKPOINT).is_file():
            continue
        info = run_info(r)
        if info.get("task") not in ("xgqa", "xvnli"):
            continue
        sargs = argparse.Namespace(**{**vars(args), "run": r, "out": None})
        try:
            cmd_similarity(sargs)
        except SystemExit as e:
            print(f"note: Figure 4 skipped for {r}: {e}", file=sys.stderr)
    return 0


def cmd_table(args) -> int:
    runs = [Path(r) for r in args.runs]
    try:
        missing = [r for r in runs if run_results(r, args.split) is None]
        if len(missing) == len(runs):
            raise SystemExit(f"error: none of the {len(runs)} run folder(s) has {args.split} results (results.json "
                             f"or {args.split} evaluations in {engine.METRICS}); evaluate them first (make eval RUN=...)")
        for r in missing:
            print(f"note: {r} has no {args.split} results: not in the tables", file=sys.stderr)
        tables = build_tables(runs, args.split)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(format_tables(tables, args.per_language))
    if args.out:
        engine.atomic_write_text(args.out, json.dumps(tables, indent=1) + "\n")
        print(f"wrote {args.out}")
    if args.iglue_csv:
        for name, text in merged_iglue_csvs([Path(r) for r in args.runs], args.split).items():
            engine.atomic_write_text(Path(args.iglue_csv) / name, text)
            print(f"wrote {Path(args.iglue_csv) / name}")
    return 0


# ---------------------------------------------------------------------------------------------
# Few-shot cross-lingual transfer (paper Table 3; IGLUE few-shot protocol)

# IGLUE's few-shot scripts: 20 epochs, batch 64, lr grid {1e-4, 5e-5, 1e-5}, UC2 with IGLUE's
# optimizer recipe, the best checkpoint on the validation split kept (xGQA: the target language's
# dev; XVNLI: English dev). The paper only says it follows IGLUE for xGQA with UC2, 48 shots, and
# that few-shot training is standard fine-tuning (policy full) whatever the English policy was.
FEWSHOT_DEFAULTS = {"epochs": 20, "batch_size": 64, "lrs": (1e-4, 5e-5, 1e-5)}


def add_fewshot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, help="English-trained checkpoint (model_final.pt)")
    p.add_argument("--run", "--run-dir", dest="run", default=None,
                   help="English run folder instead of --checkpoint (--run-dir under torchrun)")
    p.add_argument("--lang", required=True, help="target language of the few-shot split")
    p.add_argument("--shots", default="48", help="IGLUE shot count: train_<shots> (xFlickrCo also e.g. 100x5)")
    p.add_argument("--output-dir", required=True, help="few-shot run folder (one sub-folder per learning rate)")
    p.add_argument("--lrs", type=float, nargs="+", default=list(FEWSHOT_DEFAULTS["lrs"]), help="learning-rate grid")
    p.add_argument("--epochs", type=int, default=FEWSHOT_DEFAULTS["epochs"])
    p.add_argument("--fs-batch-size", type=int, default=FEWSHOT_DEFAULTS["batch_size"], help="training batch size")
    p.add_argument("--select-split", default=None,
                   help="validation split (default: the target language's dev, else English dev/valid, else none: last epoch)")
    p.add_argument("--eval-langs", nargs="+", default=None, help="test languages reported (default: the target language)")
    p.add_argument("--model-name", default=None)
    p.add_argument("--trainer-args", nargs=argparse.REMAINDER, default=[],
                   help="anything after this goes to train_<model>.py unchanged (e.g. --micro-batch-size 16)")
    _data_args(p, langs=False)


def selection_split(data_root, task: str, lang: str, requested: str | None) -> tuple[str | None, str | None]:
    """(split, lang) the few-shot checkpoints are selected on; (None, None) = take the last epoch.
    Default: the target language's dev split (xGQA); else English dev (what IGLUE's XVNLI few-shot
    scripts validate on). xFlickrCo: last epoch unless --select-split (our choice: IGLUE validates
    on a 4-way proxy of Flickr30k valid; full retrieval on it every epoch would cost more than the
    training)."""
    if requested:
        return requested, lang if lang in data.available_langs(data_root, task, requested) else "en"
    if task == "xflickrco":
        return None, None
    if lang in data.available_langs(data_root, task, "dev"):
        return "dev", lang
    if "en" in data.available_langs(data_root, task, "dev"):
        return "dev", "en"
    return None, None


def selection_score(task: str, metrics: dict) -> float:
    """Few-shot model selection: accuracy; retrieval: mean of text and image R@1 (our choice)."""
    if task == "xflickrco":
        return (metrics["tr_r1"] + metrics["ir_r1"]) / 2
    return metrics["accuracy"]


def cmd_fewshot(args) -> int:
    engine.setup_distributed()  # one process group for the trainings and the evaluation (see engine._GROUP_USERS)
    try:
        return _fewshot(args)
    finally:
        engine.cleanup_distributed()


def _fewshot(args) -> int:
    if bool(args.run) == bool(args.checkpoint):
        raise SystemExit("error: give exactly one of --run RUN_DIR or --checkpoint FILE")
    init = _run_checkpoint(Path(args.run)) if args.run else Path(args.checkpoint)
    try:
        meta = load_meta(init)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    task, model_name = meta["task"], meta["model"]
    _resolve_data(args, _run_args(init.parent), meta)
    train_split = f"train_{args.shots}"
    if args.lang not in data.available_langs(args.data_root, task, train_split):
        raise SystemExit(f"error: {task}: no few-shot split {train_split!r} for language {args.lang!r} under "
                         f"{args.data_root}; languages with it: "
                         f"{', '.join(data.available_langs(args.data_root, task, train_split)) or 'none'}")
    sel_split, sel_lang = selection_split(args.data_root, task, args.lang, args.select_split)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    script = importlib.import_module(f"train_{model_name}")
    options = {o for a in script.build_parser()._actions for o in a.option_strings}
    if "--train-lang" not in options:
        raise SystemExit(f"error: train_{model_name}.py has no --train-lang option: few-shot training needs it to "
                         f"read the {args.lang} split {train_split} (see eval_zeroshot.cmd_fewshot)")
    config_file = out / "model_config.json"   # the English run's architecture, whatever its config name
    engine.atomic_write_text(config_file, json.dumps(meta["config"], indent=1) + "\n")
    trials = []
    for lr in args.lrs:
        run_dir = out / f"lr{lr:g}"
        argv = ["--task", task, "--checkpoint", str(init), "--model-config", str(config_file),
                "--train-split", train_split, "--train-lang", args.lang, "--policy", "full", "--lr", str(lr),
                "--epochs", str(args.epochs), "--batch-size", str(args.fs_batch_size), "--data-root", str(args.data_root),
                "--tokenizer", str(args.tokenizer), "--output-dir", str(run_dir)]
        if model_name == "uc2":   # the paper follows IGLUE's few-shot setup for UC2: its optimizer recipe too
            argv += ["--recipe", "iglue", "--features", *map(str, args.features or []), "--max-regions", str(args.max_regions)]
        else:
            argv += ["--images", str(args.images)] if args.images else []
        argv += (["--eval-split", sel_split, "--langs", sel_lang, "--eval-every", "1"] if sel_split else ["--no-eval"])
        argv += list(args.trainer_args)
        if (run_dir / engine.FINAL).is_file():
            print(f"few-shot lr {lr:g}: {run_dir} already finished, reusing it", flush=True)
        else:
            if (run_dir / engine.CHECKPOINT).is_file():
                argv.append("--resume")
            print(f"few-shot lr {lr:g}: train_{model_name}.py " + " ".join(argv), flush=True)
            with keep_best_checkpoint(run_dir, task, sel_lang, meta, {"shots": args.shots, "fewshot_lang": args.lang}):
                script.main(argv)
        trials.append(_fewshot_trial(run_dir, task, sel_lang, lr))
    best = max(trials, key=lambda t: t["score"] if t["score"] == t["score"] else -math.inf)
    info = {"shots": args.shots, "fewshot_lang": args.lang, "init_checkpoint": str(init),
            "init_policy": meta.get("policy"), "model": model_name, "task": task, "train_split": train_split,
            "selection": {"split": sel_split, "lang": sel_lang,
                          "metric": "mean(tr_r1, ir_r1)" if task == "xflickrco" else "accuracy"},
            "trials": trials, "best": best}
    engine.atomic_write_text(out / "fewshot.json", json.dumps(info, indent=1) + "\n")
    print(f"few-shot: best lr {best['lr']:g}, epoch {best['epoch']} ({best['checkpoint']})", flush=True)
    eargs = argparse.Namespace(**{**vars(args), "run": None, "checkpoint": best["checkpoint"], "output_dir": str(out),
                                  "langs": args.eval_langs or [args.lang], "translate_test": False})
    return cmd_evaluate(eargs)


def _fewshot_trial(run_dir: Path, task: str, sel_lang: str | None, lr: float) -> dict:
    """Best epoch of one learning rate: by the selection split (model_best.pt), else the last epoch."""
    epochs = read_epoch_metrics(run_dir) if (run_dir / engine.METRICS).is_file() else []
    scored = [(selection_score(task, ev[sel_lang]), e) for e, ev in epochs if sel_lang and sel_lang in ev]
    if scored and (run_dir / "model_best.pt").is_file():
        score, epoch = max(scored, key=lambda t: (t[0], -t[1]))   # earliest epoch among equal scores
        return {"lr": lr, "epoch": epoch, "score": score, "checkpoint": str(run_dir / "model_best.pt")}
    return {"lr": lr, "epoch": epochs[-1][0] if epochs else None, "score": float("nan"),
            "checkpoint": str(run_dir / engine.FINAL)}


class keep_best_checkpoint:
    """While a trainer's main() runs in this process, save <run_dir>/model_best.pt whenever the
    per-epoch evaluation (on the selection split) improves. engine.train calls the module-level
    engine.evaluate after every epoch; we wrap it for the duration (no trainer option needed)."""

    def __init__(self, run_dir: Path, task: str, lang: str | None, meta: dict, fewshot: dict):
        self.run_dir, self.task, self.lang, self.meta, self.fewshot = run_dir, task, lang, meta, fewshot
        self.best = -math.inf   # a resumed run: the best epoch logged so far
        if lang and (run_dir / engine.METRICS).is_file() and (run_dir / "model_best.pt").is_file():
            self.best = max([selection_score(task, ev[lang]) for _, ev in read_epoch_metrics(run_dir) if lang in ev],
                            default=-math.inf)

    def __enter__(self):
        self.original = engine.evaluate

        def evaluate(fn, model, epoch, **kwargs):
            results = self.original(fn, model, epoch, **kwargs)
            if self.lang and self.lang in (results or {}):
                score = selection_score(self.task, results[self.lang])
                if score > self.best:   # strictly better: the earliest best epoch is kept
                    self.best = score
                    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
                        meta = {**self.meta, "policy": "full", "epoch": epoch + 1, "fewshot": self.fewshot,
                                "selection_score": score}
                        engine.save_checkpoint(self.run_dir / "model_best.pt",
                                               {"model": unwrap(model).state_dict(), "meta": meta})
            return results

        engine.evaluate = evaluate
        return self

    def __exit__(self, *exc):
        engine.evaluate = self.original
        return False


COMMANDS = ("evaluate", "fewshot", "plot", "similarity", "figures", "table")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help="zero-shot / translate-test evaluation of a run in every language")
    ev.add_argument("--run", "--run-dir", dest="run", default=None,
                    help="run folder (model_final.pt, else checkpoint_last.pt); under torchrun write --run-dir "
                         "(torchrun's parser takes --run as an abbreviation of its --run-path)")
    ev.add_argument("--checkpoint", default=None, help="a checkpoint file instead of --run")
    ev.add_argument("--output-dir", default=None, help="where results.json/CSV go (default: the run folder)")
    ev.add_argument("--model-name", default=None, help="model column of the IGLUE CSV (default: run folder name)")
    ev.add_argument("--released-task", choices=engine.TASKS, default=None,
                    help="--checkpoint is a released fine-tuned UC2 checkpoint for this task (IGLUE's VOLTA format)")
    ev.add_argument("--released-config", default="base", help="its UC2 config (train_uc2.py --model-config)")
    _data_args(ev)
    sim = sub.add_parser("similarity", help="Figure 4: [CLS] similarity of translation-parallel examples")
    sim.add_argument("--run", "--run-dir", dest="run", required=True, help="run folder (--run-dir under torchrun)")
    sim.add_argument("--out", default=None, help="output folder (default: the run folder)")
    _data_args(sim, translate_test=False, retrieval=False)
    pl = sub.add_parser("plot", help="Figures 2/3: per-epoch curves from metrics.jsonl")
    pl.add_argument("runs", nargs="+")
    pl.add_argument("--out", default=None, help="output folder (default: the run, or <parent>/figures for several)")
    fg = sub.add_parser("figures", help="plot + similarity for every run given")
    fg.add_argument("runs", nargs="+")
    fg.add_argument("--out", default=None, help="output folder of the curves (default: beside the runs)")
    _data_args(fg, translate_test=False, retrieval=False)
    tb = sub.add_parser("table", help="Tables 1-3 from run folders, the paper's numbers beside ours")
    tb.add_argument("runs", nargs="+")
    tb.add_argument("--split", default="test", help="results.json entry to use (default test)")
    tb.add_argument("--per-language", action="store_true", help="also per-language tables (paper Tables 4-6)")
    tb.add_argument("--out", default=None, help="also write the tables as JSON here")
    tb.add_argument("--iglue-csv", default=None, metavar="DIR",
                    help="also write IGLUE's results/ CSVs here, one row per setup (few-shot: the per-language runs "
                         "of a setup merged into one row, e.g. xGQA_48.csv)")
    fs = sub.add_parser("fewshot", help="few-shot fine-tuning of an English-trained checkpoint on one language")
    add_fewshot_args(fs)
    for parser in (p, ev, sim, pl, fg, tb, fs):
        parser.formatter_class = engine.HelpFormatter
        engine.one_line_errors(parser)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["evaluate"] + argv   # `eval_zeroshot.py --run RUN` = evaluate
    args = build_parser().parse_args(argv)
    return {"evaluate": cmd_evaluate, "fewshot": cmd_fewshot, "plot": cmd_plot, "similarity": cmd_similarity,
            "figures": cmd_figures, "table": cmd_table}[args.command](args)


if __name__ == "__main__":
    engine.run_main(main)
