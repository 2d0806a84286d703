"""Metrics with the references' tie orders: accuracy per xGQA question type, retrieval ranks and R@K in the order
VOLTA's and X2-VLM's numpy argsort gives exactly tied scores (a port of numpy's portable introsort), the language
order of IGLUE's result columns. Pure functions of numbers (no model code): the evaluation driver
(scoring/evaluate.py) and the reports call them; below the reading path because a reader of SUF needs only
"accuracy" and "R@1", not how ties are broken."""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch

QTYPES = ("verify", "query", "choose", "logical", "compare")  # GQA structural types
RECALL_KS = (1, 5, 10)


def classification_metrics(
    preds: Sequence[int], labels: Sequence[int], qtypes: Sequence[str] | None = None
) -> dict[str, float]:
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
        if other:  # keeps the per-type counts adding up to n even for unexpected type strings
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
SMALL_SORT = 15  # numpy: partitions spanning at most 16 elements are insertion-sorted


def _less(a: float, b: float) -> bool:
    return a < b or (b != b and a == a)  # numpy's float order: NaN after every number


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
                if pi - pl < pr - pi:  # the larger side waits on the stack, with the depth reached so far
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
        return numpy_argsort(-row)  # eval_retrieval.py: np.argsort(-score_matrix[i])
    if order == "x2vlm":
        return numpy_argsort(row)[::-1]  # itm_eval: np.argsort(score)[::-1]
    raise ValueError(f"unknown tie order {order!r}; expected one of {TIE_ORDERS}")


def _gold_ranks(
    scores: np.ndarray, rows: np.ndarray, golds: np.ndarray, unscored: float | None, order: str
) -> np.ndarray:
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


def retrieval_ranks(
    score_i2t: torch.Tensor,
    score_t2i: torch.Tensor,
    txt2img: Sequence[int],
    unscored: float | None = None,
    ties: str = "volta",
) -> tuple[torch.Tensor, torch.Tensor]:
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
        raise ValueError(
            f"score shapes {tuple(score_i2t.shape)} / {tuple(score_t2i.shape)} do not fit {txt2img.size} captions"
        )
    captions = np.arange(n_txt)
    ir_ranks = _gold_ranks(score_t2i.double().numpy(), captions, txt2img, unscored, ties)
    caption_ranks = _gold_ranks(score_i2t.double().numpy(), txt2img, captions, unscored, ties)  # within its image's row
    tr_ranks = np.full(n_img, n_txt, dtype=np.int64)
    np.minimum.at(tr_ranks, txt2img, caption_ranks)
    if (tr_ranks == n_txt).any():
        raise ValueError(f"{int((tr_ranks == n_txt).sum())} images have no caption")
    return torch.from_numpy(tr_ranks), torch.from_numpy(ir_ranks.astype(np.int64))


def recall_metrics(
    score_i2t: torch.Tensor,
    score_t2i: torch.Tensor,
    txt2img: Sequence[int],
    unscored: float | None = None,
    ties: str = "volta",
) -> dict[str, float]:
    """tr_r1/5/10, ir_r1/5/10 (percent), medr/meanr as VOLTA prints them (floor(median)+1, mean+1)."""
    for scores in (score_i2t, score_t2i):
        if torch.isnan(scores).any() or torch.isposinf(scores).any():  # would rank arbitrarily, not fail
            bad = int((~torch.isfinite(scores)).sum())
            raise FloatingPointError(
                f"non-finite retrieval scores (NaN or inf) in {bad} of {scores.numel()} caption-image pairs"
            )
    tr, ir = retrieval_ranks(score_i2t, score_t2i, txt2img, unscored, ties)
    out: dict[str, float] = {}
    for name, ranks in (("tr", tr), ("ir", ir)):
        for k in RECALL_KS:
            out[f"{name}_r{k}"] = 100.0 * (ranks < k).double().mean().item()
        out[f"{name}_medr"] = math.floor(ranks.double().quantile(0.5).item()) + 1.0  # = numpy median
        out[f"{name}_meanr"] = ranks.double().mean().item() + 1.0
    out["n_images"], out["n_captions"] = score_i2t.shape
    out["ties"] = ties
    return out


def ordered_langs(langs: Iterable[str]) -> list[str]:
    """English first, then the target languages alphabetically (IGLUE's results/ column order)."""
    langs = set(langs)
    return (["en"] if "en" in langs else []) + sorted(langs - {"en"})


# ---------------------------------------------------------------------------------------------
# Per-language summaries: results.json's "summary" and the table `eval_zeroshot.py evaluate` prints

MAIN_METRICS = {"xgqa": ("accuracy",), "xvnli": ("accuracy",), "xflickrco": ("tr_r1", "ir_r1"), "marvl": ("accuracy",)}


def zs_average(per_lang: dict[str, dict], metric: str) -> float:
    """The paper's ZS-XLT number: the mean over the non-English languages."""
    vals = [m[metric] for l, m in per_lang.items() if l != "en" and metric in m]
    return sum(vals) / len(vals) if vals else float("nan")


def summarize(task: str, per_lang: dict[str, dict]) -> dict[str, dict]:
    """{main metric: {"en": .., "avg": .., "langs": [non-English languages averaged]}}."""
    targets = [l for l in ordered_langs(per_lang) if l != "en"]
    return {
        m: {"en": per_lang.get("en", {}).get(m, float("nan")), "avg": zs_average(per_lang, m), "langs": targets}
        for m in MAIN_METRICS[task]
    }


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
    lines.append(
        f"{'n':<{width}} "
        + " ".join(f"{int(per_lang[l].get('n', per_lang[l].get('n_captions', 0))):>7d}" for l in langs)
    )
    lines.append("avg = mean over the non-English languages (the paper's ZS-XLT number)")
    return "\n".join(lines)


def require_finite(t: torch.Tensor, what: str) -> torch.Tensor:
    """t, or FloatingPointError when it holds NaN/inf: at evaluation a NaN logit must not become an accuracy
    (argmax of NaN is an arbitrary class). Rows = examples."""
    bad = ~torch.isfinite(t)
    if bad.any():
        rows = bad.reshape(bad.shape[0], -1).any(1) if t.dim() else bad.reshape(1)
        raise FloatingPointError(
            f"non-finite {what} (NaN or inf) for {int(rows.sum())} of {rows.numel()} examples of a batch"
        )
    return t
