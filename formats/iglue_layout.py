"""Where an IGLUE checkout keeps its annotation files: the datasets/ folder, the splits and languages present,
and the file of one (task, split, language), original or machine-translated ("translate-test", _gmt files).

  dataset_dir(data_root)            the IGLUE `datasets/` folder (one-line error naming what is missing)
  available_splits(root, task, translate_test=False) / available_langs(root, task, split, translate_test=False)
  split_file(root, task, split, lang, translate_test=False) -> Path of the annotation file

Not on the reading path: data.load_split reads the file split_file finds; the inventory (checks/inventory.py)
lists every file found here. A missing folder, split or language is a one-line ValueError naming what exists.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

TASKS = ("xgqa", "xvnli", "xflickrco", "marvl")  # IGLUE's tasks we run: the one task table (data.TASKS is this)


def _require_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def dataset_dir(data_root: str | os.PathLike) -> Path:
    """The folder holding gqa/, xGQA/, XVNLI/, flickr30k/, xFlickrCO/ (data_root/datasets or data_root)."""
    root = Path(data_root)
    if not root.is_dir():
        raise ValueError(f"data root {root} does not exist (expected an IGLUE checkout holding datasets/)")
    for cand in (root / "datasets", root):
        if any((cand / d).is_dir() for d in ("gqa", "xGQA", "XVNLI", "flickr30k", "xFlickrCO")):
            return cand
    raise ValueError(
        f"data root {root}: expected folder {root / 'datasets'} (with gqa/, xGQA/, XVNLI/, "
        f"flickr30k/, xFlickrCO/ inside, as in an IGLUE checkout) is missing"
    )


def _task_dirs(ds: Path, task: str, translate_test: bool) -> list[Path]:
    _require_task(task)
    sub = "annotations_machine-translate" if translate_test else "annotations"
    return {
        "xgqa": [ds / "gqa" / "annotations", ds / "xGQA" / sub],
        "xvnli": [ds / "XVNLI" / sub],
        "xflickrco": [ds / "flickr30k" / "annotations", ds / "xFlickrCO" / sub],
    }[task]


def _require_task_dir(ds: Path, task: str, translate_test: bool) -> None:
    dirs = _task_dirs(ds, task, translate_test)
    if translate_test and task != "xvnli":
        dirs = dirs[1:]
    if not any(d.is_dir() for d in dirs):
        raise ValueError(f"{task}: expected folder {dirs[-1]} is missing under data root {ds}")


def _lang_dirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def _candidates(ds: Path, task: str, split: str, lang: str, translate_test: bool) -> list[Path]:
    """Annotation file locations for (task, split, lang), most likely first."""
    _require_task(task)
    mt = "annotations_machine-translate"
    if task == "xgqa":
        if split in ("train", "valid", "testdev"):  # English GQA, LXMERT list format
            return [] if translate_test or lang != "en" else [ds / "gqa" / "annotations" / f"{split}.json"]
        if split == "testdev_zs":  # the original xGQA paper's zero-shot test split
            name = f"testdev_balanced_questions_{lang}"
            if translate_test:
                return [
                    ds / "xGQA" / mt / "zero_shot" / f"{name}.json",
                    ds / "xGQA" / mt / "zero_shot" / f"{name}_gmt.json",
                ]
            return [ds / "xGQA" / "annotations" / "zero_shot" / f"{name}.json"]
        if translate_test:
            return [
                ds / "xGQA" / mt / "few_shot" / lang / f"{split}.json",
                ds / "xGQA" / mt / "few_shot" / lang / f"{split}_gmt.json",
            ]
        return [ds / "xGQA" / "annotations" / "few_shot" / lang / f"{split}.json"]
    if task == "xvnli":
        sub = mt if translate_test else "annotations"
        return [ds / "XVNLI" / sub / lang / f"{split}.jsonl", ds / "XVNLI" / sub / lang / f"{split}_gmt.jsonl"]
    if split in ("train", "valid") and not translate_test:  # English Flickr30k (5 captions per image)
        return [ds / "flickr30k" / "annotations" / f"{split}_ann.jsonl"] if lang == "en" else []
    sub = mt if translate_test else "annotations"
    return [ds / "xFlickrCO" / sub / lang / f"{split}_gmt.jsonl", ds / "xFlickrCO" / sub / lang / f"{split}.jsonl"]


def _split_name(path: Path) -> str:
    stem = path.name.split(".")[0]
    return stem[:-4] if stem.endswith("_gmt") else stem


def available_splits(data_root, task: str, translate_test: bool = False) -> list[str]:
    """Split names that have at least one annotation file (discovered from the files present)."""
    ds = dataset_dir(data_root)
    _require_task(task)
    found: set[str] = set()
    mt = "annotations_machine-translate"
    if task == "xgqa":
        for s in ("train", "valid", "testdev"):
            if not translate_test and (ds / "gqa" / "annotations" / f"{s}.json").is_file():
                found.add(s)
        base = ds / "xGQA" / (mt if translate_test else "annotations")
        found |= {_split_name(p) for p in (base / "few_shot").glob("*/*.json")}
        if any((base / "zero_shot").glob("testdev_balanced_questions_*.json")):
            found.add("testdev_zs")
    elif task == "xvnli":
        found |= {_split_name(p) for p in (ds / "XVNLI" / (mt if translate_test else "annotations")).glob("*/*.jsonl")}
    elif task == "xflickrco":
        for s in ("train", "valid"):
            if not translate_test and (ds / "flickr30k" / "annotations" / f"{s}_ann.jsonl").is_file():
                found.add(s)
        found |= {
            _split_name(p) for p in (ds / "xFlickrCO" / (mt if translate_test else "annotations")).glob("*/*.jsonl")
        }
    return sorted(found, key=_split_sort_key)


def _split_sort_key(s: str):
    order = {"train": 0, "valid": 1, "dev": 2, "testdev": 3, "test": 4, "testdev_zs": 5}
    m = re.fullmatch(r"train_(\d+)(x\d+)?", s)
    return (order.get(s, 6), int(m.group(1)) if m else 0, s)


def available_langs(data_root, task: str, split: str, translate_test: bool = False) -> list[str]:
    """Languages whose annotation file for (task, split) exists."""
    ds = dataset_dir(data_root)
    langs = set()
    folders = {
        "xgqa": [ds / "xGQA" / "annotations" / "few_shot"],
        "xvnli": [ds / "XVNLI" / "annotations", ds / "XVNLI" / "annotations_machine-translate"],
        "xflickrco": [ds / "xFlickrCO" / "annotations", ds / "xFlickrCO" / "annotations_machine-translate"],
    }
    _require_task(task)
    candidates = {"en"} | {l for f in folders[task] for l in _lang_dirs(f)}
    if task == "xgqa":
        for base in (
            ds / "xGQA" / "annotations" / "zero_shot",
            ds / "xGQA" / "annotations_machine-translate" / "zero_shot",
        ):
            candidates |= (
                {p.stem.split("_")[-1] for p in base.glob("testdev_balanced_questions_*.json")}
                if base.is_dir()
                else set()
            )
        candidates |= set(_lang_dirs(ds / "xGQA" / "annotations_machine-translate" / "few_shot"))
    for lang in candidates:
        if any(p.is_file() for p in _candidates(ds, task, split, lang, translate_test)):
            langs.add(lang)
    return sorted(langs)


def split_file(data_root, task: str, split: str, lang: str, translate_test: bool = False) -> Path:
    ds = dataset_dir(data_root)
    _require_task_dir(ds, task, translate_test)
    for path in _candidates(ds, task, split, lang, translate_test):
        if path.is_file():
            return path
    splits = available_splits(ds, task, translate_test)
    if split not in splits:
        raise ValueError(
            f"{task}: no {'translate-test ' if translate_test else ''}split {split!r} under {ds}; "
            f"found: {', '.join(splits) or 'none'}"
        )
    langs = available_langs(ds, task, split, translate_test)
    raise ValueError(
        f"{task} {split}: no {'translate-test ' if translate_test else ''}file for language {lang!r} "
        f"under {ds}; languages found: {', '.join(langs) or 'none'}"
    )
