"""What `eval_zeroshot.py evaluate` writes beside a run after an evaluation: results.json (one record per split,
merged with earlier ones of the same checkpoint file), IGLUE's CSVs and VOLTA's per-example predictions
(their formats: formats/iglue.py). Not on the reading path: the file bookkeeping of an evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import data
import scoring.metrics
from formats import iglue, readers, run_folder


def eval_key(split: str, translate_test: bool) -> str:
    return split + (".mt" if translate_test else "")


def label_names(model_name: str, task: str, data_root) -> list[str]:
    """Name of each label id the model predicts: the GQA answers (label2ans), the model's XVNLI class order, or
    MaRVL's (VOLTA writes the class index: 0 False, 1 True)."""
    if task == "xgqa":
        return data.load_answer_vocab(data_root)[1]
    if task == "marvl":
        return ["0", "1"]
    return list(data.XVNLI_LABELS_UC2 if model_name == "uc2" else data.XVNLI_LABELS_CCLM)


def write_results(out_dir: str | Path, record: dict, model_name: str) -> Path:
    """Merge one evaluation into out_dir/results.json under its key (split[.mt]) and write the
    IGLUE CSV(s). Called only after the evaluation finished, so a failed run never replaces a good
    result; other keys (e.g. translate-test next to test) are kept, and so are the other languages of
    an earlier evaluation of the same checkpoint file (`--langs de` after a full evaluation)."""
    out_dir = Path(out_dir)
    path = out_dir / "results.json"
    results = readers.read_json(path, annotations=False) if path.exists() else {}
    key = eval_key(record["split"], record["translate_test"])
    prev = results.get(key)
    if prev and prev.get("checkpoint_file") == record.get("checkpoint_file") and record.get("checkpoint_file"):
        langs = {**prev["langs"], **record["langs"]}
        record = {
            **record,
            "langs": langs,
            "summary": scoring.metrics.summarize(record["task"], langs),
            "files": {**prev.get("files", {}), **record.get("files", {})},
        }
    results[key] = record
    run_folder.atomic_write_text(path, json.dumps(results, indent=1, sort_keys=True) + "\n")
    task, langs, shots = record["task"], record["langs"], record.get("shots", 0)
    extra = [l for l in scoring.metrics.ordered_langs(langs) if l not in ("en",) + iglue.TARGET_LANGS[task]]
    for metric in scoring.metrics.MAIN_METRICS[task]:
        name = iglue.csv_name(task, metric, shots, record["translate_test"], record["split"])
        run_folder.atomic_write_text(out_dir / name, iglue.iglue_csv(task, langs, model_name, metric, shots, extra))
    return path


def write_predictions(out_dir: Path, record: dict, preds: dict[str, list], examples: dict[str, Sequence], names):
    """One per-example file per language (formats.iglue.predictions_json); examples[lang]: the annotations read
    (MaRVL's file repeats VOLTA's sentence and gold label beside each prediction)."""
    for lang, rows in preds.items():
        text = iglue.predictions_json(record["task"], rows, names, {str(e.id): e for e in examples.get(lang, ())})
        run_folder.atomic_write_text(Path(out_dir) / iglue.predictions_name(record, lang), text)


def checkpoint_file_id(path: str | Path) -> str:
    """Which checkpoint file an evaluation used: path, size and modification time (a re-trained run differs)."""
    st = Path(path).stat()
    return f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}"
