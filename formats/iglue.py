"""IGLUE's and VOLTA's result files, as `eval_zeroshot.py evaluate` writes them beside results.json: IGLUE's
results/ CSV (docs/reference_facts.md#F-iglue-results-csv: model,<IGLUE's languages>,avg, plus our row "n") and
VOLTA's per-example predictions JSON (docs/reference_facts.md#F-uc2-eval-outputs).

Not on the reading path: the format of files other tools read. report/ merges these CSVs over runs.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Sequence

# IGLUE's results/ file stems (model,en,<langs>,avg rows); "_ir"/"_tr" for retrieval.
CSV_STEM = {"xgqa": "xGQA", "xvnli": "XVNLI", "xflickrco": "xFlickrCO", "marvl": "MaRVL"}
# IGLUE's target languages (test sets; the paper's ZS-XLT averages run over all of them)
TARGET_LANGS = {
    "xgqa": ("bn", "de", "id", "ko", "pt", "ru", "zh"),
    "xvnli": ("ar", "es", "fr", "ru"),
    "xflickrco": ("de", "es", "id", "ja", "ru", "tr", "zh"),
    "marvl": ("id", "sw", "ta", "tr", "zh"),  # English: NLVR2's test-P (results/get_marvl_zero.py)
}
# IGLUE's few-shot CSV columns where they are fewer (MaRVL's few-shot splits exist in id, tr, zh: get_marvl_few.py)
FEWSHOT_LANGS = {"marvl": ("id", "tr", "zh")}


MISSING = -1.0  # IGLUE's results/ scripts write -1.0 for a language without a result and keep its column
N_ROW = "n"  # second CSV row: how many examples each number is over


def csv_langs(task: str, shots: int | str = 0) -> list[str]:
    """IGLUE's results/ columns: en + the target languages (zero-shot); the target languages only (few-shot)."""
    return (["en"] if not is_fewshot(shots) else []) + list(target_langs(task, shots))


def target_langs(task: str, shots: int | str = 0) -> tuple[str, ...]:
    """The languages IGLUE's avg runs over: every test language, few-shot only those with a few-shot split."""
    return FEWSHOT_LANGS.get(task, TARGET_LANGS[task]) if is_fewshot(shots) else TARGET_LANGS[task]


def is_fewshot(shots: int | str) -> bool:
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
    targets = list(target_langs(task, shots))
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


def predictions_name(record: dict, lang: str) -> str:
    """IGLUE's per-language result file: <split>_<lang>_<shots>_result.json (VOLTA's eval_task.py writes
    <split>_result.json; IGLUE's analysis notebooks read results/xgqa/<zero|few>_shot/<model>/
    test_<lang>_<shots>_result.json). Translate-test: <split>_<lang>_mt_<shots>_result.json."""
    mt = "_mt" if record["translate_test"] and lang != "en" else ""
    return f"{record['split']}_{lang}{mt}_{record.get('shots', 0)}_result.json"


def predictions_json(task: str, preds: Sequence[tuple[str, int]], names: Sequence[str], examples=None) -> str:
    """One language's per-example predictions as VOLTA's eval_task.py writes them
    (docs/reference_facts.md#F-uc2-eval-outputs): xGQA (VL-classifier-GQA)
    [{"questionId", "prediction": answer}], the input of GQA_score.py and of IGLUE's xGQA analysis notebook;
    XVNLI (VL-classifier) [{"question_id": pairID, "answer": entailment|neutral|contradiction}]; MaRVL / NLVR2
    (VL-binary-classifier, volta/task_utils.py) [{"sentence", "prediction": 0|1, "label": 0|1}] plus our "id"
    (examples: {id: Example} for the sentence and gold label). names[label]: the answer / class name of each label
    id of the model (scoring.results.label_names)."""
    if task == "marvl":
        rows = [(examples[i], p) for i, p in preds]
        return json.dumps([{"id": e.id, "sentence": e.text, "prediction": p, "label": e.label} for e, p in rows]) + "\n"
    if task not in ("xgqa", "xvnli"):
        raise ValueError(f"no per-example predictions file for {task}")
    key, value = ("questionId", "prediction") if task == "xgqa" else ("question_id", "answer")
    return json.dumps([{key: str(i), value: names[p] if 0 <= p < len(names) else ""} for i, p in preds]) + "\n"
