"""Figures 2 and 3 (per-epoch curves per language / per xGQA question type, from each run's metrics.jsonl) and
Figure 4 (cosine similarity of the final [CLS] vectors of translation-parallel test examples), with the numbers
behind each figure as .json / .csv.

Not on the reading path: `python -m report plot|similarity|figures` draws what training logged; only Figure 4
runs the model once more (model.cls_features over the test sets, sharded like the evaluation).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from training import devices
import eval_zeroshot
import scoring.evaluate
import scoring.metrics
from report import runs as report_runs
from formats import run_folder


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
        info = report_runs.run_info(run)
        epochs = eval_zeroshot.read_epoch_metrics(run)
        if not epochs:
            raise ValueError(f"{Path(run) / 'metrics.jsonl'}: no per-epoch evaluation lines")
        langs = scoring.metrics.ordered_langs({l for _, ev in epochs for l in ev})
        metrics = sorted({m for _, ev in epochs for lm in ev.values() for m in lm})
        series = {m: {l: [ev.get(l, {}).get(m, float("nan")) for _, ev in epochs] for l in langs} for m in metrics}
        for m in metrics:
            series[m]["avg"] = [scoring.metrics.zs_average(ev, m) for _, ev in epochs]
        out[str(run)] = {
            "label": run_label(run, info),
            "info": info,
            "epochs": [e for e, _ in epochs],
            "langs": langs,
            "series": series,
        }
    return out


def _write_curve_numbers(data: dict, metrics: Sequence[str], stem: Path) -> None:
    run_folder.atomic_write_text(
        stem.with_suffix(".json"),
        json.dumps(
            {
                r: {
                    "label": d["label"],
                    "epochs": d["epochs"],
                    "series": {m: d["series"][m] for m in metrics if m in d["series"]},
                }
                for r, d in data.items()
            },
            indent=1,
        )
        + "\n",
    )
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["run", "epoch", "lang", "metric", "value"])
    for r, d in data.items():
        for m in metrics:
            for lang, vals in d["series"].get(m, {}).items():
                for e, v in zip(d["epochs"], vals):
                    w.writerow([Path(r).name, e, lang, m, v])
    run_folder.atomic_write_text(stem.with_suffix(".csv"), buf.getvalue())


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
    main = list(scoring.metrics.MAIN_METRICS.get(task, ("accuracy",)))
    written = []
    stem = out_dir / f"fig2_per_language{tag}"
    fig, axes = plt.subplots(
        len(main), len(data), figsize=(5 * len(data), 3.6 * len(main)), squeeze=False, sharey="row"
    )
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
        metrics = [f"accuracy_{t}" for t in scoring.metrics.QTYPES]
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
            ax.text(
                j,
                i,
                f"{mat[i][j]:.0f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if mat[i][j] < 60 else "black",
            )
    ax.set_title(f"{title}\n(unpaired similarity: {100 * sim['unpaired']:.0f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@torch.no_grad()
def cls_records(model: torch.nn.Module, batches: Iterable[dict], device, amp: str = "off") -> list[tuple]:
    """(id, final [CLS] vector) per example: model.cls_features, the classifier's input."""
    records = []
    for batch in batches:
        with scoring.evaluate.autocast_for(device, amp):
            feats = model.cls_features(devices.to_device(batch, device)).float().cpu()
        records += [(str(i), f) for i, f in zip(batch["id"], feats)]
    return records


def cls_similarity(features: dict[str, dict[str, torch.Tensor]]) -> dict:
    """Figure 4. features: lang -> {example id -> [CLS] vector}; the same id in two languages is a
    translation pair. Returns {"langs", "matrix" (mean cosine similarity over the ids both languages
    have; the paper prints it x100), "n_pairs", "unpaired"}. The paper's baseline samples non-parallel pairs at
    random; we compute its expectation exactly (our choice): the mean cosine over ALL pairs of examples with
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


@torch.no_grad()
def similarity_for(
    model: torch.nn.Module,
    sets: dict[str, scoring.evaluate.EvalSet],
    dist=None,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    amp: str = "off",
) -> dict:
    """cls_similarity over the [CLS] features of every language's test set (sharded + gathered)."""
    model = scoring.evaluate.unwrap(model).eval()
    device = scoring.evaluate.model_device(model, dist)
    feats = {}
    for lang, s in sets.items():
        loader = scoring.evaluate.eval_loader(
            s.dataset, devices.shard(len(s.dataset), dist), s.collate, batch_size, num_workers
        )
        feats[lang] = dict(devices.gather(cls_records(model, loader, device, amp), dist))
    return cls_similarity(feats)
