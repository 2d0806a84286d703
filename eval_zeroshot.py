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

Metrics are percentages, as IGLUE and the paper report them. The evaluation itself (engine.evaluate_task, each
model answering through its own predict / retrieval_scores) is the one the trainers run after every epoch.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

import data
import engine
from formats import run_folder, torch_files
import train_cclm
import train_uc2

TASKS = data.TASKS
MODEL_SCRIPTS = {"uc2": train_uc2, "cclm": train_cclm}  # meta["model"] -> the script that builds it
MAIN_METRICS = {"xgqa": ("accuracy",), "xvnli": ("accuracy",), "xflickrco": ("tr_r1", "ir_r1")}
# IGLUE's results/ file stems (model,en,<langs>,avg rows); "_ir"/"_tr" for retrieval.
CSV_STEM = {"xgqa": "xGQA", "xvnli": "XVNLI", "xflickrco": "xFlickrCO"}
# IGLUE's target languages (test sets; the paper's ZS-XLT averages run over all of them)
TARGET_LANGS = {
    "xgqa": ("bn", "de", "id", "ko", "pt", "ru", "zh"),
    "xvnli": ("ar", "es", "fr", "ru"),
    "xflickrco": ("de", "es", "id", "ja", "ru", "tr", "zh"),
}

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
        ("uc2", "full"): {
            "en": 57.1,
            "de": 44.4,
            "bn": 20.8,
            "id": 30.7,
            "ko": 25.3,
            "pt": 34.1,
            "ru": 35.4,
            "zh": 32.8,
        },
        ("uc2", "suf"): {
            "en": 57.1,
            "de": 51.6,
            "bn": 26.5,
            "id": 40.5,
            "ko": 38.6,
            "pt": 41.2,
            "ru": 43.8,
            "zh": 47.0,
        },
        ("cclm", "full"): {
            "en": 62.0,
            "de": 57.2,
            "bn": 33.7,
            "id": 49.8,
            "ko": 29.1,
            "pt": 46.4,
            "ru": 39.9,
            "zh": 43.3,
        },
        ("cclm", "suf"): {
            "en": 62.8,
            "de": 59.0,
            "bn": 49.5,
            "id": 52.5,
            "ko": 42.2,
            "pt": 51.7,
            "ru": 48.2,
            "zh": 57.5,
        },
    },
    ("xflickrco", "tr_r1"): {  # Table 6, text retrieval
        ("uc2", "full"): {
            "en": 36.8,
            "de": 25.8,
            "es": 16.0,
            "id": 12.8,
            "ja": 21.6,
            "ru": 16.9,
            "tr": 7.3,
            "zh": 25.8,
        },
        ("uc2", "suf"): {"en": 36.4, "de": 26.0, "es": 17.8, "id": 16.3, "ja": 23.5, "ru": 19.7, "tr": 8.2, "zh": 29.0},
        ("cclm", "full"): {
            "en": 77.7,
            "de": 68.8,
            "es": 66.4,
            "id": 55.3,
            "ja": 69.6,
            "ru": 64.5,
            "tr": 45.6,
            "zh": 73.6,
        },
        ("cclm", "suf"): {
            "en": 78.5,
            "de": 71.0,
            "es": 69.5,
            "id": 58.1,
            "ja": 71.1,
            "ru": 68.9,
            "tr": 50.7,
            "zh": 73.2,
        },
    },
    ("xflickrco", "ir_r1"): {  # Table 6, image retrieval
        ("uc2", "full"): {
            "en": 43.0,
            "de": 39.3,
            "es": 15.9,
            "id": 12.7,
            "ja": 26.3,
            "ru": 19.7,
            "tr": 6.4,
            "zh": 33.4,
        },
        ("uc2", "suf"): {"en": 41.8, "de": 30.2, "es": 18.7, "id": 15.1, "ja": 28.1, "ru": 22.8, "tr": 8.0, "zh": 33.5},
        ("cclm", "full"): {
            "en": 78.0,
            "de": 69.2,
            "es": 68.6,
            "id": 54.8,
            "ja": 72.7,
            "ru": 64.8,
            "tr": 45.7,
            "zh": 73.7,
        },
        ("cclm", "suf"): {
            "en": 78.6,
            "de": 70.5,
            "es": 70.9,
            "id": 60.0,
            "ja": 74.3,
            "ru": 68.7,
            "tr": 50.4,
            "zh": 74.6,
        },
    },
}
# Figure 4 (UC2, last epoch): unpaired-baseline similarity in percentage points.
PAPER_FIG4_UNPAIRED = {("xgqa", "full"): 20, ("xgqa", "suf"): 22, ("xvnli", "full"): 17, ("xvnli", "suf"): 62}


@torch.no_grad()
def cls_records(model: torch.nn.Module, batches: Iterable[dict], device, amp: str = "off") -> list[tuple]:
    """(id, final [CLS] vector) per example: model.cls_features, the classifier's input."""
    records = []
    for batch in batches:
        with engine.autocast_for(device, amp):
            feats = model.cls_features(engine.to_device(batch, device)).float().cpu()
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


def zs_average(per_lang: dict[str, dict], metric: str) -> float:
    """The paper's ZS-XLT number: the mean over the non-English languages."""
    vals = [m[metric] for l, m in per_lang.items() if l != "en" and metric in m]
    return sum(vals) / len(vals) if vals else float("nan")


def summarize(task: str, per_lang: dict[str, dict]) -> dict[str, dict]:
    """{main metric: {"en": .., "avg": .., "langs": [non-English languages averaged]}}."""
    targets = [l for l in engine.ordered_langs(per_lang) if l != "en"]
    return {
        m: {"en": per_lang.get("en", {}).get(m, float("nan")), "avg": zs_average(per_lang, m), "langs": targets}
        for m in MAIN_METRICS[task]
    }


def table_rows(task: str, per_lang: dict[str, dict]) -> list[str]:
    """Metrics shown by `evaluate` (the same numbers results.json holds, 2 decimals)."""
    if task == "xflickrco":
        return [f"{d}_r{k}" for d in ("tr", "ir") for k in engine.RECALL_KS]
    rows = ["accuracy"]
    if task == "xgqa":
        rows += [f"accuracy_{t}" for t in engine.QTYPES]
    return rows


def format_table(task: str, per_lang: dict[str, dict], title: str = "") -> str:
    langs = engine.ordered_langs(per_lang)
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


MISSING = -1.0  # IGLUE's results/ scripts write -1.0 for a language without a result and keep its column
N_ROW = "n"  # second CSV row: how many examples each number is over


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


def iglue_csv(
    task: str,
    per_lang: dict[str, dict],
    model_name: str,
    metric: str,
    shots: int | str = 0,
    extra_langs: Sequence[str] = (),
) -> str:
    """IGLUE's results/ CSV (docs/reference_facts.md#F-iglue-results-csv): header model,<IGLUE's languages>,avg,
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
    """One language's per-example predictions as VOLTA's eval_task.py writes them
    (docs/reference_facts.md#F-uc2-eval-outputs): xGQA (VL-classifier-GQA)
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
        record = {
            **record,
            "langs": langs,
            "summary": summarize(record["task"], langs),
            "files": {**prev.get("files", {}), **record.get("files", {})},
        }
    results[key] = record
    run_folder.atomic_write_text(path, json.dumps(results, indent=1, sort_keys=True) + "\n")
    for metric in MAIN_METRICS[record["task"]]:
        name = csv_name(record["task"], metric, record.get("shots", 0), record["translate_test"], record["split"])
        extra = [l for l in engine.ordered_langs(record["langs"]) if l not in ("en",) + TARGET_LANGS[record["task"]]]
        run_folder.atomic_write_text(
            out_dir / name,
            iglue_csv(record["task"], record["langs"], model_name, metric, record.get("shots", 0), extra),
        )
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
            info.update(
                {
                    k: rec.get(k)
                    for k in (
                        "model",
                        "task",
                        "policy",
                        "llrd_decay",
                        "top_layers",
                        "shots",
                        "fewshot_lang",
                        "init_policy",
                    )
                    if rec.get(k) is not None
                }
            )
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
        fs = data.read_json(run / "fewshot.json", annotations=False) if (run / "fewshot.json").exists() else {}
        for k in ("shots", "fewshot_lang", "init_policy"):
            if fs.get(k) is not None:
                info.setdefault(k, fs[k])
    info.setdefault("shots", 0)
    return info


def load_meta(path: str | Path) -> dict:
    """The metadata dict of a checkpoint, memory-mapped so the weights are not read."""
    ckpt = torch_files.load_checkpoint(path, mmap=True)
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
            if n == len(lines):  # a run killed mid-write leaves half a last line: the epochs before it stand
                break
            raise ValueError(f"{path}:{n}: not valid JSON") from None
        if rec.get("type") == "eval" and "lang" in rec and "epoch" in rec and split in (None, rec.get("split")):
            metrics = {
                k: v
                for k, v in rec.items()
                if k not in ("type", "epoch", "step", "lang", "split") and isinstance(v, (int, float))
            }
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
        langs = engine.ordered_langs({l for _, ev in epochs for l in ev})
        metrics = sorted({m for _, ev in epochs for lm in ev.values() for m in lm})
        series = {m: {l: [ev.get(l, {}).get(m, float("nan")) for _, ev in epochs] for l in langs} for m in metrics}
        for m in metrics:
            series[m]["avg"] = [zs_average(ev, m) for _, ev in epochs]
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
    main = list(MAIN_METRICS.get(task, ("accuracy",)))
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
        metrics = [f"accuracy_{t}" for t in engine.QTYPES]
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
        unfinished = (
            f"evaluated {ckpt} (epoch {res[split].get('epoch')})" if ckpt.endswith(run_folder.CHECKPOINT) else None
        )
        return {**info, "langs": res[split]["langs"], "source": f"results.json[{split}]", "unfinished": unfinished}
    if (run / "metrics.jsonl").exists():
        epochs = read_epoch_metrics(run, split)
        if epochs:
            e, ev = epochs[-1]
            return {
                **info,
                "langs": ev,
                "source": f"metrics.jsonl epoch {e} ({split})",
                "unfinished": _unfinished(run, e),
            }
    return None


def _unfinished(run: Path, last_epoch: int) -> str | None:
    """Why a run's last evaluated epoch is not its final result (None: finished): no model_final.pt while a
    checkpoint_last.pt shows it stopped (or paused), or fewer epochs evaluated than args.json planned."""
    if (run / run_folder.FINAL).exists():
        return None
    args = data.read_json(run / "args.json", annotations=False) if (run / "args.json").exists() else {}
    planned = args.get("epochs")
    if (run / run_folder.CHECKPOINT).exists() or (planned and last_epoch < planned):
        return f"epoch {last_epoch} of {planned or '?'}, no {run_folder.FINAL}"
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
    extra = {
        "full": "",
        "suf": "+SUF",
        "llrd": f"+LLRD(d={r.get('llrd_decay')})",
        "top": f"+top{r.get('top_layers')}",
    }.get(pol, f"+{pol}")
    return name + extra


def build_tables(runs: Sequence[str | Path], split: str = "test") -> dict:
    """Rows of Tables 1-3 (ours beside the paper's). Several runs of one setup are averaged."""
    recs = [{**r, "run": str(run)} for run in runs if (r := run_results(run, split)) is not None]
    zs = [r for r in recs if not r.get("shots")]
    fs = [r for r in recs if r.get("shots")]
    groups: dict[tuple, list] = {}
    for r in zs:
        key = (
            r.get("model"),
            r.get("policy"),
            r.get("llrd_decay") if r.get("policy") == "llrd" else None,
            r.get("top_layers") if r.get("policy") == "top" else None,
        )
        groups.setdefault(key, []).append(r)

    def en_avg(rs: list[dict], task: str, metric: str) -> tuple[float, float]:
        rs = [r for r in rs if r.get("task") == task]
        return (
            _mean([r["langs"].get("en", {}).get(metric, float("nan")) for r in rs]),
            _mean([zs_average(r["langs"], metric) for r in rs]),
        )

    def unfinished(rs: list[dict], task: str) -> bool:
        """True when a number comes from a run that has not finished (marked ! in the table)."""
        return any(r.get("unfinished") for r in rs if r.get("task") == task)

    def partial(rs: list[dict], task: str) -> bool:
        """True when a run's average misses some of IGLUE's target languages (marked * in the table)."""
        return any(set(TARGET_LANGS[task]) - set(r["langs"]) for r in rs if r.get("task") == task)

    cols = [("xgqa", "accuracy"), ("xvnli", "accuracy"), ("xflickrco", "tr_r1"), ("xflickrco", "ir_r1")]
    table1 = []
    order = sorted(
        groups,
        key=lambda k: (
            str(k[0]),
            ["full", "suf", "top", "llrd"].index(k[1]) if k[1] in ("full", "suf", "top", "llrd") else 9,
            str(k[2]),
            str(k[3]),
        ),
    )
    for key in order:
        rs = groups[key]
        paper = PAPER_TABLE1.get((key[0], key[1])) if key[2] is None and key[3] is None else None
        row = {"setup": _setup_name(rs[0]), "runs": [r.get("source") for r in rs], "cells": {}}
        for task, metric in cols:
            en, avg = en_avg(rs, task, metric)
            p = (paper or {}).get(task if metric == "accuracy" else metric)
            row["cells"][f"{task}:{metric}"] = {
                "en": en,
                "avg": avg,
                "paper_en": p[0] if p else None,
                "paper_avg": p[1] if p else None,
                "partial": partial(rs, task),
                "unfinished": unfinished(rs, task),
            }
        table1.append(row)
    table2 = []
    for key in order:
        if key[0] != "cclm":
            continue
        en, avg = en_avg(groups[key], "xgqa", "accuracy")
        paper = PAPER_TABLE2.get(key[1]) if (key[1] != "top" or key[3] == 6) and key[2] is None else None
        if en == en or avg == avg:
            table2.append(
                {
                    "setup": _setup_name(groups[key][0]),
                    "en": en,
                    "avg": avg,
                    "partial": partial(groups[key], "xgqa"),
                    "unfinished": unfinished(groups[key], "xgqa"),
                    "paper_en": paper[0] if paper else None,
                    "paper_avg": paper[1] if paper else None,
                }
            )
    table3 = []
    for pol in ("full", "suf"):
        zs_avg = en_avg(groups.get(("uc2", pol, None, None), []), "xgqa", "accuracy")[1]
        fs_runs = [r for r in fs if r.get("model") == "uc2" and r.get("task") == "xgqa" and r.get("init_policy") == pol]
        # each few-shot run adapts to one language: the few-shot number is the mean of those languages
        fs_vals = {
            r["fewshot_lang"]: r["langs"].get(r["fewshot_lang"], {}).get("accuracy", float("nan"))
            for r in fs_runs
            if r.get("fewshot_lang")
        }
        table3.append(
            {
                "setup": {"full": "Standard", "suf": "SUF"}[pol],
                "zero_shot": zs_avg,
                "few_shot": _mean(list(fs_vals.values())),
                "few_shot_langs": sorted(fs_vals),
                "shots": sorted({r["shots"] for r in fs_runs}),
                "paper_zero_shot": PAPER_TABLE3[pol][0],
                "paper_few_shot": PAPER_TABLE3[pol][1],
            }
        )
    per_lang = {}
    for (task, metric), paper_rows in PAPER_PER_LANG.items():
        for key in order:
            rs = [r for r in groups[key] if r.get("task") == task]
            if not rs:
                continue
            langs = engine.ordered_langs({l for r in rs for l in r["langs"]})
            paper = paper_rows.get((key[0], key[1])) if key[2] is None and key[3] is None else None
            per_lang.setdefault(f"{task}:{metric}", []).append(
                {
                    "setup": _setup_name(rs[0]),
                    "ours": {l: _mean([r["langs"].get(l, {}).get(metric, float("nan")) for r in rs]) for l in langs},
                    "paper": paper,
                }
            )
    unfinished_runs = [f"{r['source']} of {r['run']}: {r['unfinished']}" for r in recs if r.get("unfinished")]
    return {
        "table1": table1,
        "table2": table2,
        "table3": table3,
        "per_language": per_lang,
        "unfinished": unfinished_runs,
    }


def merged_iglue_csvs(runs: Sequence[str | Path], split: str = "test") -> dict[str, str]:
    """{file name: CSV text}: IGLUE's results/ files over several runs, one row per run (named by its folder, as
    `evaluate` names it) and the row "n" of each (see iglue_csv). A few-shot run adapts to one language, so the
    few-shot runs that start from one English run (one folder per target language) are merged into one row,
    named by that English run: xGQA_48.csv with IGLUE's few-shot columns (target languages, avg over them;
    -1.0 where a language has no run yet)."""
    rows: dict[str, dict[str, dict]] = {}  # file name -> {setup name -> {lang: metrics}}
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
        langs = (
            {r["fewshot_lang"]: r["langs"][r["fewshot_lang"]]}
            if fewshot and r.get("fewshot_lang") in r["langs"]
            else r["langs"]
        )
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
    out = [
        "Table 1: ours (paper). EN and ZS-XLT = mean over non-English languages; accuracy / R@1; "
        "* = not all of IGLUE's target languages were evaluated; ! = from a run that has not finished.",
        f"{'setup':<20}"
        + "".join(
            f"{h:>15}" for h in ("xGQA EN", "xGQA ZS", "XVNLI EN", "XVNLI ZS", "TR EN", "TR ZS", "IR EN", "IR ZS")
        ),
    ]
    for row in t["table1"]:
        cells = []
        for c in ("xgqa:accuracy", "xvnli:accuracy", "xflickrco:tr_r1", "xflickrco:ir_r1"):
            v = row["cells"][c]
            cells += [
                _cell(v["en"], v["paper_en"], unfinished=v["unfinished"]),
                _cell(v["avg"], v["paper_avg"], v["partial"], v["unfinished"]),
            ]
        out.append(f"{row['setup']:<20}" + "".join(f"{c:>15}" for c in cells))
    if t["table2"]:
        out += ["", "Table 2: CCLM on xGQA, ours (paper); top6 = CM only.", f"{'setup':<20}{'en':>15}{'avg':>15}"]
        out += [
            f"{r['setup']:<20}{_cell(r['en'], r['paper_en'], unfinished=r['unfinished']):>15}"
            f"{_cell(r['avg'], r['paper_avg'], r['partial'], r['unfinished']):>15}"
            for r in t["table2"]
        ]
    if any(r["few_shot"] == r["few_shot"] or r["zero_shot"] == r["zero_shot"] for r in t["table3"]):
        out += [
            "",
            "Table 3: UC2 on xGQA, target-language mean, ours (paper); few-shot = standard fine-tuning "
            "on the target language after English training with the row's policy.",
            f"{'setup':<20}{'zero-shot':>15}{'few-shot':>15}  few-shot languages",
        ]
        out += [
            f"{r['setup']:<20}{_cell(r['zero_shot'], r['paper_zero_shot']):>15}"
            f"{_cell(r['few_shot'], r['paper_few_shot']):>15}  {','.join(r['few_shot_langs']) or '-'}"
            for r in t["table3"]
        ]
    if t.get("unfinished"):
        out += ["", "! unfinished runs (their last evaluated epoch is shown):"] + [f"  {u}" for u in t["unfinished"]]
    if per_language:
        for name, rows in t["per_language"].items():
            langs = engine.ordered_langs({l for r in rows for l in r["ours"]})
            out += ["", f"Per language ({name}), ours (paper):", f"{'setup':<20}" + "".join(f"{l:>13}" for l in langs)]
            out += [
                f"{r['setup']:<20}"
                + "".join(f"{_cell(r['ours'].get(l), (r['paper'] or {}).get(l)):>13}" for l in langs)
                for r in rows
            ]
    return "\n".join(out)


def feature_reader(features):
    """--features as the trainers take it (one path or several): the image-keyed files (a per-question
    serialized GQA LMDB holds no test images), several searched in order (train_uc2.FeatureSet)."""
    if features is None or not isinstance(features, (list, tuple)):
        return features
    keyed = [str(p) for p in features if not data.is_serialized_lmdb(p)]
    if len(keyed) <= 1:
        return keyed[0] if keyed else None
    return train_uc2.FeatureSet(keyed)


# ---------------------------------------------------------------------------------------------
# Checkpoints -> models


def load_model(path: str | Path, device="cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the task model from a checkpoint written by train_uc2/train_cclm ({"model", "meta"}):
    meta["model"] picks the script (MODEL_SCRIPTS), build_model(meta["task"], meta["config"])."""
    state = torch_files.load_checkpoint(path)
    meta = state.get("meta") if isinstance(state, dict) else None
    if not isinstance(meta, dict) or meta.get("model") not in ("uc2", "cclm") or "config" not in meta:
        raise ValueError(f"{path}: no meta with model uc2|cclm and config (not a train_uc2/train_cclm checkpoint)")
    model = MODEL_SCRIPTS[meta["model"]].build_model(meta["task"], meta["config"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ValueError(
            f"{path}: weights do not fit a {meta['model']} {meta['task']} model ({str(e).splitlines()[0]})"
        ) from None
    return model.to(device).eval(), meta


def load_released_uc2(path: str | Path, task: str, config: str = "base", device="cpu") -> tuple[torch.nn.Module, dict]:
    """A released fine-tuned UC2 checkpoint (IGLUE's VOLTA-format pytorch_model_best.bin / .tar, no meta of
    ours) as a task model, with the meta evaluate needs (policy "released")."""
    cfg = train_uc2.resolve_config(config)
    model = train_uc2.build_model(task, cfg)
    try:
        plan = train_uc2.load_into(model, str(path))
    except ValueError as e:  # its first line names the file and the first bad key; the plan follows
        raise ValueError(f"{str(e).splitlines()[0]} (is it a fine-tuned UC2 {task} checkpoint?)") from None
    if plan.initialised:
        raise ValueError(
            f"{path}: not a fine-tuned UC2 {task} checkpoint (no weights for "
            f"{', '.join(k for k, _ in plan.initialised[:3])})"
        )
    return model.to(device).eval(), {"model": "uc2", "task": task, "config": cfg, "policy": "released"}


def run_checkpoint(run: Path) -> Path:
    """The model of a run folder: model_final.pt, else the resume checkpoint."""
    for name in (run_folder.FINAL, run_folder.CHECKPOINT):
        if (run / name).is_file():
            return run / name
    raise SystemExit(f"error: {run}: no {run_folder.FINAL} or {run_folder.CHECKPOINT} (not a finished run folder?)")


# ---------------------------------------------------------------------------------------------
# CLI


def _data_args(
    p: argparse.ArgumentParser, *, langs: bool = True, translate_test: bool = True, retrieval: bool = True
) -> None:
    """Data and evaluation options; a command that would ignore one of them does not offer it
    (similarity: no translate-test or retrieval options; fewshot: --eval-langs instead of --langs)."""
    g = p.add_argument_group("data (default: the run's args.json)")
    g.add_argument("--data-root", default=None, help="IGLUE folder holding datasets/")
    g.add_argument(
        "--features", nargs="+", default=None, help="UC2 region-feature LMDB/H5 file(s) holding the test images"
    )
    g.add_argument("--images", default=None, help="CCLM image root (gqa/, flickr30k/, coco/)")
    g.add_argument(
        "--tokenizer", default=None, help="XLM-R tokenizer folder or cached hub id (default: checkpoint meta)"
    )
    g.add_argument("--max-regions", type=int, default=None, help="UC2 regions per image (default: run's, else 36)")
    e = p.add_argument_group("evaluation")
    if langs:
        e.add_argument("--langs", nargs="+", default=None, help="languages (default: all found)")
    e.add_argument("--split", default="test", help="IGLUE split (xGQA's IGLUE test = few_shot/<lang>/test.json)")
    if translate_test:
        e.add_argument(
            "--translate-test", action="store_true", help="IGLUE's machine-translated test files (English: original)"
        )
    e.add_argument("--batch-size", type=int, default=64, help="examples per forward")
    e.add_argument("--num-workers", type=int, default=2, help="data-loader workers")
    e.add_argument(
        "--amp", choices=("off", "bf16", "fp16"), default="off", help="evaluation precision (default float32)"
    )
    if retrieval:
        e.add_argument(
            "--k-test", type=int, default=None, help="CCLM retrieval prefilter size (default: model config, 128)"
        )
        e.add_argument("--pair-batch", type=int, default=1024, help="UC2 retrieval: (caption, image) pairs per forward")
        e.add_argument("--itm-batch", type=int, default=128, help="CCLM retrieval: pairs per ITM forward")


def read_run_args(run: Path | None) -> dict:
    """A run folder's args.json ({} when there is none)."""
    path = run / run_folder.ARGS if run is not None else None
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
        return evaluate(args, dist)
    finally:
        engine.cleanup_distributed()


def evaluate(args: argparse.Namespace, dist: engine.DistInfo) -> int:
    """Zero-shot evaluation of --run's final model (or --checkpoint) in --langs, in the caller's process group:
    the evaluate command's body (xvlmaml's final evaluation calls it); writes results.json and the IGLUE CSVs."""
    if bool(args.run) == bool(args.checkpoint):
        raise SystemExit("error: give exactly one of --run RUN_DIR or --checkpoint FILE")
    run = Path(args.run) if args.run else None
    ckpt = run_checkpoint(run) if run else Path(args.checkpoint)
    out_dir = Path(args.output_dir) if args.output_dir else (run or ckpt.parent)
    try:
        if getattr(args, "released_task", None):
            model, meta = load_released_uc2(ckpt, args.released_task, args.released_config, dist.device)
        else:
            model, meta = load_model(ckpt, dist.device)
        _resolve_data(args, read_run_args(run or ckpt.parent), meta)
        tokenizer = data.load_tokenizer(args.tokenizer)
        model.prepare_task(args.data_root, tokenizer)
        task = meta["task"]
        sets = engine.build_eval_sets(
            meta["model"],
            task,
            args.data_root,
            tokenizer,
            args.langs,
            args.split,
            args.translate_test,
            features=feature_reader(args.features),
            images=args.images,
            max_regions=args.max_regions,
            image_res=meta["config"].get("image_res", 384),
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    start = time.time()
    preds: dict[str, list] = {}
    try:  # bad data found while evaluating (e.g. a missing feature key or image): one line, nothing written
        results = engine.evaluate_task(
            model,
            task,
            sets,
            dist,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            amp=args.amp,
            k_test=args.k_test,
            pair_batch=args.pair_batch,
            itm_batch=args.itm_batch,
            predictions=preds,
        )
    except (ValueError, FloatingPointError) as e:  # FloatingPointError: NaN logits/scores are not an accuracy
        raise SystemExit(f"error: {e}") from None
    if dist.is_main:
        fewshot_file = out_dir / "fewshot.json"
        fewshot = data.read_json(fewshot_file, annotations=False) if fewshot_file.is_file() else {}
        sched = meta.get("schedule") or {}
        record = {
            "model": meta["model"],
            "task": task,
            "policy": meta.get("policy"),
            "llrd_decay": sched.get("llrd_decay"),
            "top_layers": sched.get("top_layers"),
            "suf_k": sched.get("suf_k"),
            "split": args.split,
            "translate_test": args.translate_test,
            "shots": fewshot.get("shots", 0),
            "fewshot_lang": fewshot.get("fewshot_lang"),
            "init_policy": fewshot.get("init_policy"),
            "checkpoint": str(ckpt),
            "epoch": meta.get("epoch"),
            "checkpoint_file": checkpoint_file_id(ckpt),
            "langs": results,
            "summary": summarize(task, results),
            "files": {l: s.source for l, s in sets.items()},
            "processes": dist.world,
            "seconds": round(time.time() - start, 1),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        name = args.model_name or (run.name if run else ckpt.parent.name)
        title = (
            f"{task} {meta['model']} policy={meta.get('policy')} split={args.split}"
            f"{' translate-test' if args.translate_test else ''} ({ckpt}, epoch {meta.get('epoch')})"
        )
        print(format_table(task, results, title), flush=True)
        path = write_results(out_dir, record, name)
        names = label_names(meta["model"], task, args.data_root) if preds else []
        for lang, rows in preds.items():
            run_folder.atomic_write_text(out_dir / predictions_name(record, lang), predictions_json(task, rows, names))
        print(
            f"wrote {path} [{eval_key(args.split, args.translate_test)}] and "
            + ", ".join(
                csv_name(task, m, record['shots'], args.translate_test, args.split) for m in MAIN_METRICS[task]
            ),
            flush=True,
        )
    engine.barrier(dist)
    return 0


def cmd_similarity(args) -> int:
    """Figure 4 for one run: [CLS] features of every test language, pairwise parallel similarity."""
    dist = engine.setup_distributed()
    run = Path(args.run)
    try:
        model, meta = load_model(run_checkpoint(run), dist.device)
        if meta["task"] not in ("xgqa", "xvnli"):
            raise SystemExit(
                f"error: similarity needs an xgqa or xvnli run (translation-parallel examples), {run} is {meta['task']}"
            )
        _resolve_data(args, read_run_args(run), meta)
        tokenizer = data.load_tokenizer(args.tokenizer)
        sets = engine.build_eval_sets(
            meta["model"],
            meta["task"],
            args.data_root,
            tokenizer,
            args.langs,
            args.split,
            features=feature_reader(args.features),
            images=args.images,
            max_regions=args.max_regions,
            image_res=meta["config"].get("image_res", 384),
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    sim = similarity_for(model, sets, dist, batch_size=args.batch_size, num_workers=args.num_workers, amp=args.amp)
    if dist.is_main:
        out = Path(args.out or run)
        out.mkdir(parents=True, exist_ok=True)
        sim.update(
            model=meta["model"],
            task=meta["task"],
            policy=meta.get("policy"),
            split=args.split,
            checkpoint=str(run_checkpoint(run)),
        )
        run_folder.atomic_write_text(out / "fig4_cls_similarity.json", json.dumps(sim, indent=1) + "\n")
        plot_similarity(
            sim,
            out / "fig4_cls_similarity.png",
            f"{meta['task']} {meta['model']} {meta.get('policy')}: [CLS] similarity x100",
        )
        print(
            "\n".join(
                [" " * 4 + "".join(f"{l:>6}" for l in sim["langs"])]
                + [f"{a:>4}" + "".join(f"{100 * v:6.0f}" for v in row) for a, row in zip(sim["langs"], sim["matrix"])]
            )
        )
        print(f"unpaired similarity: {100 * sim['unpaired']:.1f}\nwrote {out / 'fig4_cls_similarity.json'}, .png")
    engine.cleanup_distributed()
    return 0


@torch.no_grad()
def similarity_for(
    model: torch.nn.Module,
    sets: dict[str, engine.EvalSet],
    dist=None,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    amp: str = "off",
) -> dict:
    """cls_similarity over the [CLS] features of every language's test set (sharded + gathered)."""
    model = engine.unwrap(model).eval()
    device = engine.model_device(model, dist)
    feats = {}
    for lang, s in sets.items():
        loader = engine.eval_loader(s.dataset, engine.shard(len(s.dataset), dist), s.collate, batch_size, num_workers)
        feats[lang] = dict(engine.gather(cls_records(model, loader, device, amp), dist))
    return cls_similarity(feats)


def cmd_plot(args) -> int:
    try:
        return _plot(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def _plot(args) -> int:
    runs = [Path(r) for r in args.runs if (Path(r) / run_folder.METRICS).is_file()]
    for r in sorted(set(map(Path, args.runs)) - set(runs)):
        print(f"note: {r} has no {run_folder.METRICS}: no curves", file=sys.stderr)
    if not runs:
        raise SystemExit(f"error: none of the folders given holds a {run_folder.METRICS}")
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
        if not (Path(r) / run_folder.FINAL).is_file() and not (Path(r) / run_folder.CHECKPOINT).is_file():
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
            raise SystemExit(
                f"error: none of the {len(runs)} run folder(s) has {args.split} results (results.json "
                f"or {args.split} evaluations in {run_folder.METRICS}); evaluate them first (make eval RUN=...)"
            )
        for r in missing:
            print(f"note: {r} has no {args.split} results: not in the tables", file=sys.stderr)
        tables = build_tables(runs, args.split)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(format_tables(tables, args.per_language))
    if args.out:
        run_folder.atomic_write_text(args.out, json.dumps(tables, indent=1) + "\n")
        print(f"wrote {args.out}")
    if args.iglue_csv:
        for name, text in merged_iglue_csvs([Path(r) for r in args.runs], args.split).items():
            run_folder.atomic_write_text(Path(args.iglue_csv) / name, text)
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
    p.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        default=None,
        help="English run folder instead of --checkpoint (--run-dir under torchrun)",
    )
    p.add_argument("--lang", required=True, help="target language of the few-shot split")
    p.add_argument("--shots", default="48", help="IGLUE shot count: train_<shots> (xFlickrCo also e.g. 100x5)")
    p.add_argument("--output-dir", required=True, help="few-shot run folder (one sub-folder per learning rate)")
    p.add_argument("--lrs", type=float, nargs="+", default=list(FEWSHOT_DEFAULTS["lrs"]), help="learning-rate grid")
    p.add_argument("--epochs", type=int, default=FEWSHOT_DEFAULTS["epochs"])
    p.add_argument("--fs-batch-size", type=int, default=FEWSHOT_DEFAULTS["batch_size"], help="training batch size")
    p.add_argument(
        "--select-split",
        default=None,
        help="validation split (default: the target language's dev, else English dev/valid, else none: last epoch)",
    )
    p.add_argument(
        "--eval-langs", nargs="+", default=None, help="test languages reported (default: the target language)"
    )
    p.add_argument("--model-name", default=None)
    p.add_argument(
        "--trainer-args",
        nargs=argparse.REMAINDER,
        default=[],
        help="anything after this goes to train_<model>.py unchanged (e.g. --micro-batch-size 16)",
    )
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
    # one process group for every learning rate's training and the evaluation: under torchrun a second group on
    # the same store can read the first group's addresses and fail to connect
    dist = engine.setup_distributed()
    try:
        return _fewshot(args, dist)
    finally:
        engine.cleanup_distributed()


def _fewshot(args, dist: engine.DistInfo) -> int:
    if bool(args.run) == bool(args.checkpoint):
        raise SystemExit("error: give exactly one of --run RUN_DIR or --checkpoint FILE")
    init = run_checkpoint(Path(args.run)) if args.run else Path(args.checkpoint)
    try:
        meta = load_meta(init)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    task, model_name = meta["task"], meta["model"]
    _resolve_data(args, read_run_args(init.parent), meta)
    train_split = f"train_{args.shots}"
    if args.lang not in data.available_langs(args.data_root, task, train_split):
        raise SystemExit(
            f"error: {task}: no few-shot split {train_split!r} for language {args.lang!r} under "
            f"{args.data_root}; languages with it: "
            f"{', '.join(data.available_langs(args.data_root, task, train_split)) or 'none'}"
        )
    sel_split, sel_lang = selection_split(args.data_root, task, args.lang, args.select_split)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    script = MODEL_SCRIPTS[model_name]
    config_file = out / "model_config.json"  # the English run's architecture, whatever its config name
    run_folder.atomic_write_text(config_file, json.dumps(meta["config"], indent=1) + "\n")
    trials = []
    for lr in args.lrs:
        run_dir = out / f"lr{lr:g}"
        argv = [
            "--task",
            task,
            "--checkpoint",
            str(init),
            "--model-config",
            str(config_file),
            "--train-split",
            train_split,
            "--train-lang",
            args.lang,
            "--policy",
            "full",
            "--lr",
            str(lr),
            "--epochs",
            str(args.epochs),
            "--batch-size",
            str(args.fs_batch_size),
            "--data-root",
            str(args.data_root),
            "--tokenizer",
            str(args.tokenizer),
            "--output-dir",
            str(run_dir),
        ]
        if model_name == "uc2":  # the paper follows IGLUE's few-shot setup for UC2: its optimizer recipe too
            argv += [
                "--recipe",
                "iglue",
                "--features",
                *map(str, args.features or []),
                "--max-regions",
                str(args.max_regions),
            ]
        else:
            argv += ["--images", str(args.images)] if args.images else []
        argv += ["--eval-split", sel_split, "--langs", sel_lang, "--eval-every", "1"] if sel_split else ["--no-eval"]
        argv += list(args.trainer_args)
        if (run_dir / run_folder.FINAL).is_file():
            print(f"few-shot lr {lr:g}: {run_dir} already finished, reusing it", flush=True)
        else:
            if (run_dir / run_folder.CHECKPOINT).is_file():
                argv.append("--resume")
            print(f"few-shot lr {lr:g}: train_{model_name}.py " + " ".join(argv), flush=True)
            keep_best = BestCheckpoint(run_dir, task, sel_lang, meta, {"shots": args.shots, "fewshot_lang": args.lang})
            script.main(argv, dist=dist, on_evaluated=keep_best)
        trials.append(_fewshot_trial(run_dir, task, sel_lang, lr))
    best = max(trials, key=lambda t: t["score"] if t["score"] == t["score"] else -math.inf)
    info = {
        "shots": args.shots,
        "fewshot_lang": args.lang,
        "init_checkpoint": str(init),
        "init_policy": meta.get("policy"),
        "model": model_name,
        "task": task,
        "train_split": train_split,
        "selection": {
            "split": sel_split,
            "lang": sel_lang,
            "metric": "mean(tr_r1, ir_r1)" if task == "xflickrco" else "accuracy",
        },
        "trials": trials,
        "best": best,
    }
    run_folder.atomic_write_text(out / "fewshot.json", json.dumps(info, indent=1) + "\n")
    print(f"few-shot: best lr {best['lr']:g}, epoch {best['epoch']} ({best['checkpoint']})", flush=True)
    eargs = argparse.Namespace(
        **{
            **vars(args),
            "run": None,
            "checkpoint": best["checkpoint"],
            "output_dir": str(out),
            "langs": args.eval_langs or [args.lang],
            "translate_test": False,
        }
    )
    return evaluate(eargs, dist)


def _fewshot_trial(run_dir: Path, task: str, sel_lang: str | None, lr: float) -> dict:
    """Best epoch of one learning rate: by the selection split (model_best.pt), else the last epoch."""
    epochs = read_epoch_metrics(run_dir) if (run_dir / run_folder.METRICS).is_file() else []
    scored = [(selection_score(task, ev[sel_lang]), e) for e, ev in epochs if sel_lang and sel_lang in ev]
    if scored and (run_dir / "model_best.pt").is_file():
        score, epoch = max(scored, key=lambda t: (t[0], -t[1]))  # earliest epoch among equal scores
        return {"lr": lr, "epoch": epoch, "score": score, "checkpoint": str(run_dir / "model_best.pt")}
    return {
        "lr": lr,
        "epoch": epochs[-1][0] if epochs else None,
        "score": float("nan"),
        "checkpoint": str(run_dir / run_folder.FINAL),
    }


class BestCheckpoint:
    """The trainer's on_evaluated hook (engine.train) for one few-shot run: saves <run_dir>/model_best.pt whenever
    the per-epoch evaluation on the selection split improves."""

    def __init__(self, run_dir: Path, task: str, lang: str | None, meta: dict, fewshot: dict):
        self.run_dir, self.task, self.lang, self.meta, self.fewshot = run_dir, task, lang, meta, fewshot
        self.best = -math.inf  # a resumed run: the best epoch logged so far
        if lang and (run_dir / run_folder.METRICS).is_file() and (run_dir / "model_best.pt").is_file():
            self.best = max(
                [selection_score(task, ev[lang]) for _, ev in read_epoch_metrics(run_dir) if lang in ev],
                default=-math.inf,
            )

    def __call__(self, model: torch.nn.Module, epoch: int, results: dict, dist: engine.DistInfo) -> None:
        """epoch: 0-based; called on every rank after the epoch's evaluation, rank 0 writes."""
        if not self.lang or self.lang not in results:
            return
        score = selection_score(self.task, results[self.lang])
        if score > self.best:  # strictly better: the earliest best epoch is kept
            self.best = score
            if dist.is_main:
                meta = {
                    **self.meta,
                    "policy": "full",
                    "epoch": epoch + 1,
                    "fewshot": self.fewshot,
                    "selection_score": score,
                }
                run_folder.save_checkpoint(
                    self.run_dir / "model_best.pt", {"model": engine.unwrap(model).state_dict(), "meta": meta}
                )


COMMANDS = ("evaluate", "fewshot", "plot", "similarity", "figures", "table")


def build_parser() -> argparse.ArgumentParser:
    p = engine.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help="zero-shot / translate-test evaluation of a run in every language")
    ev.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        default=None,
        help="run folder (model_final.pt, else checkpoint_last.pt); under torchrun write --run-dir "
        "(torchrun's parser takes --run as an abbreviation of its --run-path)",
    )
    ev.add_argument("--checkpoint", default=None, help="a checkpoint file instead of --run")
    ev.add_argument("--output-dir", default=None, help="where results.json/CSV go (default: the run folder)")
    ev.add_argument("--model-name", default=None, help="model column of the IGLUE CSV (default: run folder name)")
    ev.add_argument(
        "--released-task",
        choices=engine.TASKS,
        default=None,
        help="--checkpoint is a released fine-tuned UC2 checkpoint for this task (IGLUE's VOLTA format)",
    )
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
    tb.add_argument(
        "--iglue-csv",
        default=None,
        metavar="DIR",
        help="also write IGLUE's results/ CSVs here, one row per setup (few-shot: the per-language runs "
        "of a setup merged into one row, e.g. xGQA_48.csv)",
    )
    fs = sub.add_parser("fewshot", help="few-shot fine-tuning of an English-trained checkpoint on one language")
    add_fewshot_args(fs)
    return p


@engine.exits_on_bad_input
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["evaluate"] + argv  # `eval_zeroshot.py --run RUN` = evaluate
    args = build_parser().parse_args(argv)
    return {
        "evaluate": cmd_evaluate,
        "fewshot": cmd_fewshot,
        "plot": cmd_plot,
        "similarity": cmd_similarity,
        "figures": cmd_figures,
        "table": cmd_table,
    }[args.command](args)


if __name__ == "__main__":
    engine.run_main(main)
