"""IGLUE data for UC2 (region features) and CCLM (images): annotations, features, images, text, batches.

Sections, in file order: annotation files; translation retrieval sets (XTD10, Multi30K); region features (UC2);
pickles inside downloaded files (what the feature and vocabulary readers unpickle); images (CCLM); text; datasets
(and the fail-fast input checks); collate; model inputs (one interface per model); loader; inventory CLI. The
batch transport the loader uses lives in fastload.py.

Public API (everything else is private):

Annotations
  TASKS, Example                    task names; one uniform record per question / pair / caption
  dataset_dir(data_root)            the IGLUE `datasets/` folder (one-line error naming what is missing)
  available_splits(root, task, translate_test=False) / available_langs(root, task, split, translate_test=False)
  select_langs(requested, available) parse `--langs` ("de,ko" / list / None = all) against what exists
  split_file(root, task, split, lang, translate_test=False) -> Path of the annotation file
  load_split(root, task, split, lang, translate_test=False) -> list[Example]
  load_answer_vocab(root) -> (ans2label, label2ans)   the 1,842 GQA answers
  XVNLI_LABELS_UC2 / XVNLI_LABELS_CCLM  class order of each model (VOLTA / X2-VLM)
Translation retrieval sets (train_mclip.py: XTD10, Multi30K with PECTVLM's machine translations)
  RetrievalSplit(images, texts)     images + {text kind: {lang: one caption per image}}; kinds native, from_en
                                    (English captions MT into lang), to_en (lang's captions MT into English)
  load_xtd(root, langs) / xtd_splits(full, n_shot, seed)   XTD10 and run_XTD.py's 50 / 50 / 900 split
  load_multi30k(root, split, langs) / multi30k_splits(root, langs, n_shot, seed)   Multi30K task 1
  read_lines(path, expect)          caption file lines; one-line ValueError naming file:line
  XTD_LANGS, MULTI30K_LANGS, MULTI30K_SPLITS
Region features (UC2)
  open_features(path) -> reader     per-image LMDB (h5_to_lmdb or X101 base64) or the H5 file; opened lazily in
                                    each process (read-only, no lock, no readahead); reader.keys(), key in reader,
                                    reader.get(key) -> (features, boxes, w, h), reader.regions(key, R) -> padded tensors
  feature_keys(reader)              reader.keys(), an undecodable `keys` entry a one-line BadInput naming the file
  is_serialized_lmdb(path)          True for IGLUE's per-question GQA LMDB (tensorpack format)
  box_locations(boxes, w, h) / pad_regions(features, locations, max_regions)   VOLTA's 7-value boxes + padding
  SerializedGQA(path)               tensorpack/msgpack per-question LMDB (GQA train/val), no tensorpack needed
  decode_serialized(buf)            msgpack + msgpack_numpy value decoder
  write_synthetic_features(path, image_ids, num_boxes=36, seed=0)   h5_to_lmdb-format LMDB for tests/demo
Pickles in downloaded files (README "Trust model")
  unpickle_data(buf, where) / read_pickle(path)   plain data and numpy arrays only; any other name in the pickle
                                    is refused (UnsafePickleError, a ValueError naming `where`), nothing is called
  plain_dtype(spec)                 np.dtype of a plain numeric/bytes/str type, else ValueError
Images (CCLM)
  CLIP_MEAN, CLIP_STD, load_image(path), eval_transform(img, res), train_transform(img, res, rng, flip)
  IMAGE_MAX_PIXELS                  decompression-bomb limit: load_image refuses larger images before decoding
  normalize_images(uint8 batch images) -> float32 model input (CCLM batches carry uint8 pixels)
  write_synthetic_images(folder, relpaths, size=(128, 96), seed=0)
Text
  pre_caption(text, max_words) / pre_question(text, max_words)   X2-VLM text cleaning
  load_tokenizer(path_or_hub_id), make_tiny_tokenizer(texts, out_dir, vocab_size=1000)
  encode_texts(tokenizer, texts, max_len) -> (ids, mask)   pad to longest, truncation keeps </s>
  MAX_TEXT_LEN                      {(model, task, train): max tokens or None}
Datasets and batches (contract keys)
  UC2Dataset, SerializedGQADataset, CCLMDataset       training/eval datasets with set_epoch(epoch); item i is
                                    always example i (stable order and ids, for sharded evaluation)
  RetrievalImages, RetrievalCaptions                   retrieval eval: each image / caption once; image item i
                                    is the image with index i (== Example.label of its captions)
  UC2Collate(task, tokenizer, train) / CCLMCollate(task, tokenizer, train)
                                    dataset items -> contract batches (tokenising here, i.e. in the workers);
                                    retrieval eval batches: images (+ image_index, id = image key) or captions
                                    (input_ids/attention_mask or text_ids/text_atts + image_index = gold image)
  Retrieval negatives: UC2 training items draw them as VOLTA's RetrievalDataset does (negatives="volta",
  the default: captions are always among the file's first few, see UC2Dataset) or as VOLTA meant to
  (negatives="corrected": never the positive's own image); CCLM batches may hold two captions of one image:
  `idx` (image index) lets the loss treat them as positives, as X2-VLM does.
  load_hard_negatives(path)         IGLUE/VOLTA hard_negative.pkl (train_image_list, train_hard_pool)
  check_inputs(examples, features=None, images=None, sample=0)   fail fast before training: one-line ValueError
                                    naming the first missing feature key / image file, its annotation line, and the
                                    count; sample: decode that many records / image headers too (None: all)
Model inputs (what a model reads beside text; no model-name branches anywhere else in this file)
  REGION_FEATURES (UC2) / IMAGES (CCLM), each with .dataset(task, examples, ...), .retrieval_eval(examples, ...),
                                    .collate(task, tokenizer, train); model_inputs("uc2" / "cclm") -> one of them
  make_dataset(model, task, examples, ...), make_retrieval_eval(model, examples, ...),
  make_collate(model, task, tokenizer, train)   the same, for callers that hold the model's name
Loader
  BatchLoader(dataset, collate_fn=..., **DataLoader arguments)   a DataLoader (batches through fastload's reused
                                    shared-memory slabs) whose worker BadInput reaches the caller as one line
CLI
  inventory(root, features=(), images=None) and
      `python data.py --data-root DIR [--features ...] [--images DIR] [--json]`
  verify(root, features=(), images=None) and `... --verify`: decode every feature record and image header
  BadInput                          ValueError of a bad record / image / annotation line (one line, also from workers)

Image folder layout expected by CCLM (`--images ROOT`; symlink your downloads into it):
  ROOT/gqa/<imageId>.jpg                         GQA images (images.zip), used by GQA/xGQA
  ROOT/flickr30k/<flickr id>.jpg                 Flickr30k images, used by XVNLI, Flickr30k, xFlickr&CO
  ROOT/coco/COCO_val2014_<12 digits>.jpg         COCO val2014, used by the COCO half of xFlickr&CO
(or pass images={"gqa": DIR, "flickr30k": DIR, "coco": DIR} to the datasets).
"""

from __future__ import annotations

import argparse
import base64
import collections
import functools
import io
import itertools
import json
import math
import os
import pickle
import random
import re
import sys
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset

import fastload

ImageFile.LOAD_TRUNCATED_IMAGES = True  # as the X2-VLM loaders do
# Decompression-bomb guard: a sub-MB PNG can declare 30,000 x 30,000 pixels (GBs once decoded). load_image
# refuses anything above this many pixels before decoding; PIL's own check stays on as a backstop for other
# readers (it warns above the limit and refuses above twice it). Real inputs are far below: COCO images are at
# most 640 px a side, Flickr30k's at most 500 px, GQA's Visual Genome images are web-sized photos.
IMAGE_MAX_PIXELS = 40_000_000
Image.MAX_IMAGE_PIXELS = IMAGE_MAX_PIXELS
# Photo formats only: PIL would hand an EPS file to Ghostscript (an external program) and parses many exotic
# formats nobody downloads for these datasets (all JPEG), so load_image does not even try those.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")  # JPEG includes multi-picture (MPO) files

TASKS = ("xgqa", "xvnli", "xflickrco")
BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
NUM_ANSWERS = 1842
FEATURE_DIM = 2048
XVNLI_LABELS_UC2 = ("contradiction", "neutral", "entailment")  # VOLTA LABEL_MAP order
XVNLI_LABELS_CCLM = ("contradiction", "entailment", "neutral")  # X2-VLM label_mapper order
XVNLI_NO_GOLD = "-"  # SNLI-style "no consensus" label present in the real files (VOLTA: zero target)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SUBDIRS = {"gqa": "gqa", "flickr30k": "flickr30k", "coco": "coco"}

# Max text lengths in tokens incl. <s>/</s> (None = no truncation), as each reference tokenises.
MAX_TEXT_LEN = {
    ("uc2", "xgqa", True): 40,
    ("uc2", "xgqa", False): 40,
    ("uc2", "xvnli", True): 80,
    ("uc2", "xvnli", False): 80,
    ("uc2", "xflickrco", True): 80,
    ("uc2", "xflickrco", False): 80,
    ("cclm", "xgqa", True): 40,
    ("cclm", "xgqa", False): None,
    ("cclm", "xvnli", True): 80,
    ("cclm", "xvnli", False): None,
    ("cclm", "xflickrco", True): 80,
    ("cclm", "xflickrco", False): 80,
}
# X2-VLM word limits of pre_question / pre_caption.
CCLM_MAX_WORDS = {
    ("xgqa", True): 30,
    ("xgqa", False): 50,
    ("xvnli", True): 80,
    ("xvnli", False): 80,
    ("xflickrco", True): 80,
    ("xflickrco", False): 80,
}


# ----------------------------------------------------------------------------------------------
# Annotation files
# ----------------------------------------------------------------------------------------------


class BadInput(ValueError):
    """An input file is bad (record, image, annotation): the message is one line naming the file and the key
    or annotation line. Raised in a DataLoader worker, it reaches the main process as one line too
    (BatchLoader), so the trainers can stop with that line instead of a worker traceback."""


@dataclass(slots=True)
class Example:
    """One question (xgqa), premise-image/hypothesis pair (xvnli) or caption (xflickrco)."""

    task: str
    lang: str
    id: str  # question_id / pairID / "<image id>#<caption number>"
    image: str  # region-feature key exactly as VOLTA looks it up
    image_file: str  # image path relative to the images root (see module docstring)
    text: str  # raw question / hypothesis (sentence2) / caption
    label: int = -1  # xgqa: answer index (-1 = gold answer outside the 1,842); xvnli: index in
    # XVNLI_LABELS_UC2 (-1 for "-"); xflickrco: index of the image in the split
    gold: str = ""  # xgqa: gold answer string; xvnli: gold_label
    scores: dict = field(default_factory=dict)  # xgqa: {answer index: soft score} (in-vocabulary only)
    answers: dict = field(default_factory=dict)  # xgqa: {answer string: score} as in the file
    qtype: str = ""  # xgqa: types.structural (verify/query/choose/logical/compare) when given
    source: str = ""  # "<file>:<line>" or "<file> question <id>" for error messages


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
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
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
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
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
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
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
    if task not in folders:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
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


def select_langs(requested: str | Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """`--langs` value ("de,ko", ["de", "ko"], "all" or None) -> languages, checked against `available`."""
    if requested is None or requested == "all" or requested == ["all"]:
        return list(available)
    wanted = [l for item in ([requested] if isinstance(requested, str) else requested) for l in item.split(",") if l]
    unknown = [l for l in wanted if l not in available]
    if unknown:
        raise ValueError(f"language(s) {', '.join(unknown)} not available; found: {', '.join(available) or 'none'}")
    return wanted


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


def _decode_utf8(raw: bytes, path, line: int | None = None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        n = line if line is not None else raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1)
        raise BadInput(
            f"{path}:{n}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {col + 1}); the file must be UTF-8 encoded"
        ) from None


def read_json(path: Path, annotations: bool = True) -> Any:
    """Whole-file JSON with one-line errors naming file and line. annotations: an empty file or an empty
    top-level value is an error (an annotation file without examples); False for results/args/meta files."""
    text = _decode_utf8(Path(path).read_bytes(), path)
    if annotations and not text.strip():
        raise ValueError(f"{path}: annotation file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
    if annotations and not data:
        raise ValueError(f"{path}: annotation file holds no examples")
    return data


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """JSON lines as (line number, object); blank lines skipped; one-line errors naming file and line."""
    out = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            line = _decode_utf8(raw, path, n)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: malformed JSON line ({e.msg}, column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object per line, got {type(obj).__name__}")
            out.append((n, obj))
    if not out:
        raise ValueError(f"{path}: annotation file is empty")
    return out


def _field(obj: dict, key: str, where: str):
    if key not in obj:
        raise ValueError(f"{where}: missing field {key!r}")
    return obj[key]


def _text(value, where: str, key: str) -> str:
    """A text field must be a JSON string: null, a number or a list would be trained on as "None", "12345"..."""
    if not isinstance(value, str):
        shown = json.dumps(value)[:60]
        raise ValueError(f"{where}: field {key!r} must be a string, got {type(value).__name__} {shown}")
    return value


def _ident(value, where: str, key: str) -> str:
    """An identifier (question, pair, image id) is a JSON string or integer: null or a list would become "None" or
    "[1]" in prediction files and feature lookups."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        shown = json.dumps(value)[:60]
        raise ValueError(f"{where}: field {key!r} must be a string or an integer, got {type(value).__name__} {shown}")
    return str(value)


def _answer_scores(value, where: str) -> dict[str, float]:
    """GQA's training-format label {answer: score}: anything else (a list would become {'n': 'o'} through dict(),
    a string score a late float() error) is an error naming the item."""
    ok = isinstance(value, dict) and all(
        isinstance(a, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for a, v in value.items()
    )
    if not ok:
        raise ValueError(
            f"{where}: field 'label' must be an object of answer: score (number), got {json.dumps(value)[:60]}"
        )
    return {a: float(v) for a, v in value.items()}


def _require_known_labels(examples: list, path: Path, what: str) -> list:
    """A split none of whose labels is known (every answer outside the vocabulary, every gold label '-') would
    train on all-zero targets / score 0: wrong vocabulary or file."""
    if examples and all(ex.label < 0 for ex in examples):
        raise ValueError(
            f"{path}: none of the {len(examples)} examples has a known label ({what}); wrong file or answer vocabulary?"
        )
    return examples


def load_answer_vocab(data_root) -> tuple[dict[str, int], list[str]]:
    """GQA answer vocabulary (trainval_ans2label/label2ans .json, or VOLTA's .pkl) -> (ans2label, label2ans)."""
    folder = dataset_dir(data_root) / "gqa" / "annotations"
    for ext, load in ((".json", read_json), (".pkl", read_pickle)):
        a2l, l2a = folder / f"trainval_ans2label{ext}", folder / f"trainval_label2ans{ext}"
        if a2l.is_file() and l2a.is_file():
            ans2label, label2ans = load(a2l), load(l2a)
            if not isinstance(ans2label, dict) or not isinstance(label2ans, list):
                raise ValueError(f"{a2l} / {l2a}: expected a dict of answer -> index and a list of answers")
            bad = [
                a
                for a, i in ans2label.items()
                if not (type(i) is int and 0 <= i < len(label2ans) and label2ans[i] == a)
            ]
            if bad or len(ans2label) != len(label2ans):
                raise ValueError(f"{a2l} and {l2a} disagree (e.g. answer {bad[:1]}); re-download them")
            return dict(ans2label), list(label2ans)
    raise ValueError(
        f"answer vocabulary not found: expected {folder / 'trainval_ans2label.json'} and "
        f"{folder / 'trainval_label2ans.json'}"
    )


def _rel(path: Path, ds: Path) -> str:
    try:
        return str(path.relative_to(ds))
    except ValueError:
        return str(path)


def load_split(data_root, task: str, split: str, lang: str, translate_test: bool = False) -> list[Example]:
    """All examples of one annotation file, in file order."""
    ds = dataset_dir(data_root)
    path = split_file(ds, task, split, lang, translate_test)
    rel = _rel(path, ds)
    if task == "xgqa":
        return _require_known_labels(
            _load_gqa(path, rel, lang, ds), path, "every answer is outside the 1,842-answer vocabulary"
        )
    if task == "xvnli":
        return _require_known_labels(_load_xvnli(path, rel, lang), path, "every gold_label is '-'")
    return _load_retrieval(path, rel, lang, xflickrco_keys=path.parent.parent.parent.name == "xFlickrCO")


def _load_gqa(path: Path, rel: str, lang: str, ds: Path) -> list[Example]:
    data = read_json(path)
    ans2label, _ = load_answer_vocab(ds)
    out = []
    if isinstance(data, list):  # LXMERT/IGLUE training format: img_id, label {answer: score}, question_id, sent
        for i, q in enumerate(data):
            where = f"{path} item {i}"
            if not isinstance(q, dict):
                raise ValueError(f"{where}: expected an object, got {type(q).__name__}")
            answers = _answer_scores(_field(q, "label", where), where)
            gold = max(answers, key=answers.get) if answers else ""
            out.append(
                _gqa_example(
                    lang,
                    _ident(_field(q, "question_id", where), where, "question_id"),
                    _ident(_field(q, "img_id", where), where, "img_id"),
                    _text(_field(q, "sent", where), where, "sent"),
                    answers,
                    gold,
                    "",
                    f"{rel} item {i}",
                    ans2label,
                )
            )
    elif isinstance(data, dict):  # GQA native format: question_id -> {question, imageId, answer, types, ...}
        for qid, q in data.items():
            where = f"{path} question {qid}"
            if not isinstance(q, dict):
                raise ValueError(f"{where}: expected an object, got {type(q).__name__}")
            gold = _text(_field(q, "answer", where), where, "answer")
            qtype = (q.get("types") or {}).get("structural", "")
            out.append(
                _gqa_example(
                    lang,
                    str(qid),
                    _ident(_field(q, "imageId", where), where, "imageId"),
                    _text(_field(q, "question", where), where, "question"),
                    {gold: 1.0},
                    gold,
                    qtype,
                    f"{rel} question {qid}",
                    ans2label,
                )
            )
    else:
        raise ValueError(f"{path}: expected a JSON list (GQA training format) or dict (GQA native format)")
    return out


def _gqa_example(lang, qid, image_id, question, answers, gold, qtype, source, ans2label) -> Example:
    scores = {ans2label[a]: float(s) for a, s in answers.items() if a in ans2label}
    return Example(
        task="xgqa",
        lang=lang,
        id=qid,
        image=image_id,
        image_file=f"{IMAGE_SUBDIRS['gqa']}/{image_id}.jpg",
        text=str(question),
        label=ans2label.get(gold, -1),
        gold=gold,
        scores=scores,
        answers=answers,
        qtype=qtype,
        source=source,
    )


def _load_xvnli(path: Path, rel: str, lang: str) -> list[Example]:
    out = []
    for n, obj in read_jsonl(path):
        where = f"{path}:{n}"
        gold = _field(obj, "gold_label", where)
        if gold not in XVNLI_LABELS_UC2 and gold != XVNLI_NO_GOLD:
            raise ValueError(f"{where}: unknown gold_label {gold!r} (expected entailment, neutral, contradiction or -)")
        flickr_id = _ident(_field(obj, "Flikr30kID", where), where, "Flikr30kID")
        try:
            key = str(int(flickr_id.split(".")[0]))  # VOLTA: int(Flikr30kID.split(".")[0])
        except ValueError:
            raise ValueError(f"{where}: Flikr30kID {flickr_id!r} is not a Flickr30k image number") from None
        out.append(
            Example(
                task="xvnli",
                lang=lang,
                id=_ident(_field(obj, "pairID", where), where, "pairID"),
                image=key,
                image_file=f"{IMAGE_SUBDIRS['flickr30k']}/{flickr_id}.jpg",
                text=_text(_field(obj, "sentence2", where), where, "sentence2"),
                label=XVNLI_LABELS_UC2.index(gold) if gold != XVNLI_NO_GOLD else -1,
                gold=gold,
                source=f"{rel}:{n}",
            )
        )
    return out


def _load_retrieval(path: Path, rel: str, lang: str, xflickrco_keys: bool) -> list[Example]:
    """One Example per caption; label = index of its image in the split (first-appearance order)."""
    out, image_index = [], {}
    for n, obj in read_jsonl(path):
        where = f"{path}:{n}"
        img_path = _text(_field(obj, "img_path", where), where, "img_path")
        sentences = _field(obj, "sentences", where)
        if not isinstance(sentences, list):
            raise ValueError(f"{where}: 'sentences' must be a list of captions")
        image_id = _ident(_field(obj, "id", where), where, "id")
        if xflickrco_keys:  # xFlickr&CO features are keyed by img_path verbatim (IGLUE's boxes36 H5)
            key = img_path
            sub = IMAGE_SUBDIRS["coco"] if "COCO" in img_path else IMAGE_SUBDIRS["flickr30k"]
        else:  # Flickr30k: VOLTA uses int(img_path.split(".")[0])
            try:
                key = str(int(img_path.split(".")[0]))
            except ValueError:
                raise ValueError(f"{where}: img_path {img_path!r} is not a Flickr30k image number") from None
            sub = IMAGE_SUBDIRS["flickr30k"]
        if not sentences:  # no caption: nothing to retrieve it by (X2-VLM skips such a line too)
            continue
        idx = image_index.setdefault(key, len(image_index))
        for k, caption in enumerate(sentences):
            out.append(
                Example(
                    task="xflickrco",
                    lang=lang,
                    id=f"{image_id}#{k}",
                    image=key,
                    image_file=f"{sub}/{img_path}",
                    text=_text(caption, where, f"sentences[{k}]"),
                    label=idx,
                    source=f"{rel}:{n}",
                )
            )
    return out


# ----------------------------------------------------------------------------------------------
# Translation retrieval sets: XTD10 and Multi30K with PECTVLM's machine translations (train_mclip.py)
# ----------------------------------------------------------------------------------------------

XTD_LANGS = ("en", "de", "fr", "es", "it", "jp", "ko", "pl", "ru", "tr", "zh")
MULTI30K_LANGS = ("en", "de", "fr", "cs")
MULTI30K_SPLITS = {"train": "train", "val": "val", "test": "test_2016_flickr"}
# Folder names the inventory looks for under --data-root (mclip.mk's defaults XTD=data/XTD10,
# MULTI30K=data/multi30k-dataset).
RETRIEVAL_SET_DIRS = {"xtd10": "XTD10", "multi30k": "multi30k-dataset"}
# text kind -> XTD10 file pattern (PECTVLM layout): captions, English captions machine-translated into the
# language, the language's captions machine-translated into English
XTD_FILES = {
    "native": "all/test_1kcaptions_{}.txt",
    "from_en": "translated_from_en/{}.txt",
    "to_en": "translated_to_en/{}.txt",
}
MULTI30K_DIRS = {"native": "raw", "from_en": "translated_from_en", "to_en": "translated_to_en"}


@dataclass
class RetrievalSplit:
    """Images (paths relative to the image root) and, per text kind and language, one caption per image."""

    images: list[str]
    texts: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    def subset(self, idx: Sequence[int]) -> "RetrievalSplit":
        return RetrievalSplit(
            [self.images[i] for i in idx],
            {k: {l: [t[i] for i in idx] for l, t in d.items()} for k, d in self.texts.items()},
        )

    def captions(self, kind: str, lang: str) -> list[str]:
        """kind "en": the English captions (the alignment partner of method1 / method3)."""
        if kind == "en":
            return self.texts["native"]["en"]
        return self.texts[kind][lang]


def read_lines(path: Path, expect: int | None = None) -> list[str]:
    """Stripped lines of a UTF-8 text file; an empty line, a wrong count or bad bytes is a one-line ValueError
    naming the file (and the line)."""
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    raw = path.read_bytes()
    try:
        lines = [s.strip() for s in raw.decode("utf-8").strip("\n").split("\n")]
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for i, s in enumerate(lines, 1):
        if not s:
            raise ValueError(f"{path}:{i}: empty line")
    if expect is not None and len(lines) != expect:
        raise ValueError(f"{path}: {len(lines)} lines, expected {expect} (one per image)")
    return lines


def xtd_image_path(name: str) -> str:
    """XTD10 image names are COCO 2014 file names: COCO_train2014_x.jpg -> train2014/COCO_train2014_x.jpg."""
    parts = name.split("#")[0].split("_")
    if len(parts) < 3 or not parts[1].startswith(("train", "val")):
        raise ValueError(f"XTD10 image name {name!r} is not a COCO 2014 file name")
    return f"{parts[1]}/{name.split('#')[0]}"


def _xtd_images(root: Path) -> list[str]:
    path = root / "all" / "test_image_names.txt"
    names = read_lines(path)
    images = []
    for i, n in enumerate(names, 1):
        try:
            images.append(xtd_image_path(n))
        except ValueError as e:
            raise ValueError(f"{path}:{i}: {e}") from None
    return images


def load_xtd(root: str | os.PathLike, langs: Sequence[str] = XTD_LANGS) -> RetrievalSplit:
    """XTD10 in PECTVLM's layout: all/test_image_names.txt, all/test_1kcaptions_<lang>.txt and the machine
    translations translated_from_en/<lang>.txt (English captions into lang), translated_to_en/<lang>.txt."""
    root = Path(root)
    images = _xtd_images(root)
    texts = {k: {l: read_lines(root / f.format(l), len(images)) for l in langs} for k, f in XTD_FILES.items()}
    if "en" not in langs:
        texts["native"]["en"] = read_lines(root / XTD_FILES["native"].format("en"), len(images))
    return RetrievalSplit(images, texts)


def load_multi30k(root: str | os.PathLike, split: str, langs: Sequence[str] = MULTI30K_LANGS) -> RetrievalSplit:
    """Multi30K task 1 in PECTVLM's layout under data/task1/: image_splits/<split>.txt, raw/<split>.<lang> and
    translated_from_en/<split>.<lang>, translated_to_en/<split>.<lang>; images are flickr30k-images/<name>."""
    base = Path(root) / "data" / "task1"
    name = MULTI30K_SPLITS[split]
    images = [f"flickr30k-images/{n}" for n in read_lines(base / "image_splits" / f"{name}.txt")]
    texts = {k: {l: read_lines(base / d / f"{name}.{l}", len(images)) for l in langs} for k, d in MULTI30K_DIRS.items()}
    return RetrievalSplit(images, texts)


def xtd_splits(full: RetrievalSplit, n_shot: int, seed: int) -> dict[str, RetrievalSplit]:
    """run_XTD.py's split: a permutation by torch.Generator(seed); train = first n_shot, val = next n_shot,
    test = the rest, in permutation order (50-shot: 50 / 50 / 900). n_shot 0: everything is test."""
    perm = torch.randperm(len(full.images), generator=torch.Generator().manual_seed(seed)).tolist()
    if 2 * n_shot >= len(perm):
        raise ValueError(f"--n-shot {n_shot}: XTD10 has {len(perm)} images, too few for train + val + test")
    return {
        "train": full.subset(perm[:n_shot]),
        "val": full.subset(perm[n_shot : 2 * n_shot]),
        "test": full.subset(perm[2 * n_shot :]),
    }


def multi30k_splits(root, langs: Sequence[str], n_shot: int | None, seed: int) -> dict[str, RetrievalSplit]:
    """train / val / test_2016_flickr; with n_shot, train is subsampled as PECTVLM's load_file_from_task
    (first n of a permutation by torch.Generator(seed)). Our choice: val stays whole (reference silent)."""
    splits = {s: load_multi30k(root, s, langs) for s in MULTI30K_SPLITS}
    if n_shot:
        perm = torch.randperm(len(splits["train"].images), generator=torch.Generator().manual_seed(seed)).tolist()
        splits["train"] = splits["train"].subset(perm[:n_shot])
    return splits


def _retrieval_entry(path: Path, images: list[str]) -> dict:
    try:
        return {"examples": len(read_lines(path, len(images))), "images": len(images), "missing": None}
    except ValueError as e:
        return {"error": str(e)}


def _suffixed(split: str, kind: str) -> str:
    return split if kind == "native" else f"{split}_translated_{kind}"


def retrieval_set_inventory(name: str, root: Path) -> dict:
    """split[_translated_from_en | _translated_to_en] -> lang -> {"examples", "images", "missing": None} of an
    XTD10 ("xtd10", one split "all") or Multi30K folder; a file that fails to load gets {"error": message}."""
    out: dict = {}
    if name == "xtd10":
        try:
            images = _xtd_images(root)
        except ValueError as e:
            return {"all": {"*": {"error": str(e)}}}
        langs = sorted(p.name[len("test_1kcaptions_") : -4] for p in (root / "all").glob("test_1kcaptions_*.txt"))
        for kind, pattern in XTD_FILES.items():
            for lang in langs:
                path = root / pattern.format(lang)
                if kind == "native" or path.exists():
                    out.setdefault(_suffixed("all", kind), {})[lang] = _retrieval_entry(path, images)
        return out
    base = root / "data" / "task1"
    for split, file_name in MULTI30K_SPLITS.items():
        try:
            images = [f"flickr30k-images/{n}" for n in read_lines(base / "image_splits" / f"{file_name}.txt")]
        except ValueError as e:
            out[split] = {"*": {"error": str(e)}}
            continue
        for kind, folder in MULTI30K_DIRS.items():
            for path in sorted((base / folder).glob(f"{file_name}.*")):
                lang = path.name[len(file_name) + 1 :]
                out.setdefault(_suffixed(split, kind), {})[lang] = _retrieval_entry(path, images)
    return out


def retrieval_set_roots(data_root) -> dict[str, Path]:
    """{"xtd10" / "multi30k": folder} of the translation retrieval sets present under data_root."""
    root = Path(data_root)
    return {name: root / d for name, d in RETRIEVAL_SET_DIRS.items() if (root / d).is_dir()}


# ----------------------------------------------------------------------------------------------
# Region features (UC2)
# ----------------------------------------------------------------------------------------------


def box_locations(boxes: np.ndarray, img_w: int, img_h: int) -> np.ndarray:
    """VOLTA's 7-value location per box, float32: x1/W, y1/H, x2/W, y2/H, w/W, h/H, relative area."""
    loc = np.empty((boxes.shape[0], 7), dtype=np.float32)
    loc[:, :4] = boxes
    # the float32 operations of VOLTA's ImageFeaturesH5Reader, element by element, so results are bit-identical
    # (x1/W, y1/H, x2/W, y2/H in one division by float32 [W, H, W, H]: W and H are exact in float32)
    loc[:, 6] = (loc[:, 3] - loc[:, 1]) * (loc[:, 2] - loc[:, 0]) / (float(img_w) * float(img_h))
    np.divide(loc[:, :4], np.array([img_w, img_h, img_w, img_h], dtype=np.float32), out=loc[:, :4])
    np.subtract(loc[:, 2:4], loc[:, 0:2], out=loc[:, 4:6])
    return loc


def pad_regions(features: np.ndarray, locations: np.ndarray, max_regions: int) -> dict[str, torch.Tensor]:
    """First min(N, R) regions in file order, zero padding after; image_mask 1 on kept regions."""
    return _batch_regions([(features, locations)], max_regions, ())


def _batch_regions(regions: Sequence[tuple[np.ndarray, np.ndarray]], max_regions: int, lead: tuple) -> dict:
    """(features [n,2048], locations [n,7]) per image -> padded lead+[R,2048], lead+[R,7], lead+[R] tensors,
    written once into the batch buffers (rows after n are zero, image_mask 1 on the first n)."""
    shape = (len(regions), max_regions)
    feats = fastload.batch_empty(shape + (FEATURE_DIM,), torch.float32)
    spatials = fastload.batch_empty(shape + (7,), torch.float32)
    mask = fastload.batch_empty(shape, torch.long)
    f, sp, m = feats.numpy(), spatials.numpy(), mask.numpy()  # numpy copies: sources may be read-only buffers
    for i, (feat, loc) in enumerate(regions):
        n = min(len(feat), max_regions)
        f[i, :n], f[i, n:] = feat[:n], 0
        sp[i, :n], sp[i, n:] = loc[:n], 0
        m[i, :n], m[i, n:] = 1, 0
    out = lead or (len(regions),)
    return {
        "features": feats.view(*out, max_regions, FEATURE_DIM) if lead else feats[0],
        "spatials": spatials.view(*out, max_regions, 7) if lead else spatials[0],
        "image_mask": mask.view(*out, max_regions) if lead else mask[0],
    }


class _LazyHandle:
    """Opens its file on first use in each process (DataLoader workers never share a parent's handle)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._handle, self._pid = None, None

    def _open(self):
        raise NotImplementedError

    @property
    def handle(self):
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = self._open(), os.getpid()
        return self._handle

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handle"], state["_pid"] = None, None
        return state


_LMDB_ENVS: dict[str, tuple[int, Any]] = {}


def _open_lmdb(path: str):
    """Read-only, lock-free, no-readahead LMDB environment, opened once per (path, process)."""
    import lmdb

    key = os.path.abspath(path)
    pid, env = _LMDB_ENVS.get(key, (None, None))
    if env is not None and pid == os.getpid():
        return env
    if env is not None:  # inherited through fork: never use the parent's handle, release the child's copy
        try:
            env.close()
        except lmdb.Error:
            pass
    if not os.path.exists(path):
        raise ValueError(f"feature file {path} does not exist")
    try:
        env = lmdb.open(
            path,
            subdir=os.path.isdir(path),
            readonly=True,
            lock=False,
            readahead=False,
            meminit=False,
            max_readers=2048,
        )
    except lmdb.Error as e:
        raise ValueError(f"{path}: cannot open as LMDB ({e})") from None
    _check_lmdb_size(env, path)
    _LMDB_ENVS[key] = (os.getpid(), env)
    return env


def _check_lmdb_size(env, path: str) -> None:
    """A truncated data.mdb (interrupted copy/download) is mmapped and would kill the process with SIGBUS
    on the first read past its end: compare the file size with the last page its header says is in use."""
    data_file = os.path.join(path, "data.mdb") if os.path.isdir(path) else path
    need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = os.path.getsize(data_file)
    if size < need:
        env.close()
        raise ValueError(
            f"{data_file}: LMDB file is truncated ({size:,} bytes, its header needs {need:,}); "
            f"copy or download it again"
        )


def _close_lmdb(path: str) -> None:
    pid, env = _LMDB_ENVS.pop(os.path.abspath(path), (None, None))
    if env is not None:
        env.close()


class LMDBRegionFeatures(_LazyHandle):
    """Per-image LMDB as VOLTA reads it: `keys` entry + pickled dict per image id, with numpy arrays
    (h5_to_lmdb.py, boxes36) or base64 float32 bytes (npy_to_lmdb.py, X101):
    docs/reference_facts.md#F-uc2-feature-files."""

    def _open(self):
        return _open_lmdb(self.path)

    def keys(self) -> set[str]:
        if getattr(self, "_keys", None) is None:
            with self.handle.begin() as txn:
                raw = txn.get(b"keys")
            if raw is None:
                raise ValueError(
                    f"{self.path}: no 'keys' entry; not an image-keyed feature LMDB "
                    f"(a per-question GQA serialized LMDB is read with SerializedGQA)"
                )
            keys = unpickle_data(raw, f"{self.path} entry 'keys'")
            self._keys = {k.decode() if isinstance(k, bytes) else str(k) for k in keys}
        return self._keys

    def __contains__(self, key) -> bool:
        return str(key) in self.keys()

    def get(self, key, max_rows: int | None = None) -> tuple[np.ndarray, np.ndarray, int, int]:
        """(features [N,2048] f32, boxes [N,4] f32 pixels, img_w, img_h), the first max_rows rows only if given;
        KeyError if absent."""
        with self.handle.begin(buffers=True) as txn:
            raw = txn.get(str(key).encode())
            if raw is None:
                raise KeyError(str(key))
            item = unpickle_data(raw, f"{self.path}: feature record {str(key)!r}")
        rows = slice(None, max_rows)
        return _record_arrays(self.path, key, item, rows)

    def regions(self, key, max_regions: int) -> dict[str, torch.Tensor]:
        return pad_regions(*self.kept_regions(key, max_regions), max_regions)

    def kept_regions(self, key, max_regions: int) -> tuple[np.ndarray, np.ndarray]:
        """(features [n,2048], locations [n,7]) of the first n = min(N, max_regions) boxes."""
        feats, boxes, w, h = self.get(key, max_regions)
        return feats, box_locations(boxes, w, h)


_RECORD_FIELDS = ("features", "boxes", "img_w", "img_h")


def _record_arrays(path: str, key, item, rows: slice) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(features [N,2048], boxes [N,4] float32, img_w, img_h) of a decoded record, checked: a record of another
    width (4x1024 is not 2x2048), dtype or row count, or without its fields, is a BadInput naming file and key."""
    where = f"{path}: feature record {str(key)!r}"
    if not isinstance(item, dict) or not all(k in item for k in _RECORD_FIELDS):
        have = sorted(map(str, item))[:8] if isinstance(item, dict) else type(item).__name__
        raise BadInput(f"{where}: expected a dict with {', '.join(_RECORD_FIELDS)}; got {have}")
    feats = _as_rows(item["features"], FEATURE_DIM, where, "features")
    boxes = _as_rows(item["boxes"], 4, where, "boxes")
    if len(feats) != len(boxes):
        raise BadInput(f"{where}: {len(feats)} feature rows of {FEATURE_DIM} but {len(boxes)} boxes")
    width, height = _image_side(item["img_w"], where, "img_w"), _image_side(item["img_h"], where, "img_h")
    return feats[rows], boxes[rows], width, height


def _as_rows(value, width: int, where: str = "", name: str = "") -> np.ndarray:
    # X101 LMDBs store base64 text of raw float32; h5_to_lmdb stores the arrays themselves (used directly,
    # instead of VOLTA's try-b64decode-then-fall-back: docs/reference_facts.md#F-uc2-feature-b64).
    if isinstance(value, (bytes, str)):
        try:
            raw = base64.b64decode(value, validate=True)
        except ValueError as e:
            raise BadInput(f"{where}: {name} is not valid base64 ({e})") from None
        if len(raw) % (4 * width):
            raise BadInput(f"{where}: {name} holds {len(raw)} bytes, not whole float32 rows of {width}")
        return np.frombuffer(raw, dtype=np.float32).reshape(-1, width)
    if not isinstance(value, np.ndarray) or value.dtype.kind != "f" or value.ndim != 2 or value.shape[1] != width:
        shown = (
            f"{value.dtype} array of shape {list(value.shape)}"
            if isinstance(value, np.ndarray)
            else type(value).__name__
        )
        raise BadInput(f"{where}: {name} is a {shown}; expected a float array of shape [N, {width}]")
    return np.asarray(value, dtype=np.float32)


def _image_side(value, where: str, name: str) -> int:
    ok = isinstance(value, (int, np.integer)) or (
        isinstance(value, np.ndarray) and value.shape == () and value.dtype.kind in "iu"
    )
    if not ok or isinstance(value, bool) or int(value) < 1:
        raise BadInput(f"{where}: {name} is {value!r}; expected a positive integer (pixels)")
    return int(value)


class H5RegionFeatures(_LazyHandle):
    """IGLUE's distributed boxes36 H5: one group per image id (features, boxes, img_w, img_h, ...)."""

    def _open(self):
        import h5py

        if not os.path.isfile(self.path):
            raise ValueError(f"feature file {self.path} does not exist")
        try:
            return h5py.File(self.path, "r")
        except OSError as e:  # truncated (interrupted copy) or not HDF5 at all
            raise ValueError(f"{self.path}: cannot open as HDF5 ({e}); copy or download it again") from None

    def keys(self) -> set[str]:
        if getattr(self, "_keys", None) is None:
            self._keys = set(self.handle.keys())
        return self._keys

    def __contains__(self, key) -> bool:
        return str(key) in self.keys()

    def get(self, key, max_rows: int | None = None):
        key = str(key)
        if key not in self.keys():
            raise KeyError(key)
        g = self.handle[key]
        where = f"{self.path}: feature record {key!r}"
        if not all(k in g for k in _RECORD_FIELDS):
            raise BadInput(f"{where}: expected datasets {', '.join(_RECORD_FIELDS)}; got {sorted(g)[:8]}")
        shapes = (g["features"].shape, g["boxes"].shape)
        if any(len(shape) != 2 for shape in shapes) or shapes[0][0] != shapes[1][0]:
            raise BadInput(
                f"{where}: features of shape {list(shapes[0])} and boxes of shape {list(shapes[1])}; "
                f"expected [N, {FEATURE_DIM}] and [N, 4]"
            )
        rows = slice(None, max_rows)  # h5py reads only these rows
        item = {
            "features": g["features"][rows],
            "boxes": g["boxes"][rows],
            "img_w": g["img_w"][()],
            "img_h": g["img_h"][()],
        }
        return _record_arrays(self.path, key, item, slice(None))

    regions = LMDBRegionFeatures.regions
    kept_regions = LMDBRegionFeatures.kept_regions


def feature_keys(reader) -> set[str]:
    """reader.keys(); a `keys` entry that does not decode (bit rot) is a one-line BadInput naming the file."""
    try:
        return reader.keys()
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - undecodable bytes: pickle raises many types
        detail = (str(e).strip().splitlines() or [""])[0][:160]
        raise BadInput(
            f"{reader.path}: its 'keys' entry cannot be decoded ({type(e).__name__}: {detail}); "
            "copy or download the features again"
        ) from None


def open_features(path: str | os.PathLike) -> LMDBRegionFeatures | H5RegionFeatures:
    """Image-keyed region-feature reader for an LMDB (folder or file) or an .h5/.hdf5 file; opened lazily."""
    path = str(path)
    if not os.path.exists(path):
        raise ValueError(f"feature path {path} does not exist")
    if path.endswith((".h5", ".hdf5")):
        return H5RegionFeatures(path)
    return LMDBRegionFeatures(path)


def is_serialized_lmdb(path: str | os.PathLike) -> bool:
    """True for a tensorpack per-question LMDB (has `__keys__`, no `keys`)."""
    path = str(path)
    if path.endswith((".h5", ".hdf5")) or not os.path.exists(path):
        return False
    was_open = _LMDB_ENVS.get(os.path.abspath(path), (None,))[0] == os.getpid()
    with _open_lmdb(path).begin() as txn:
        serialized = txn.get(b"__keys__") is not None and txn.get(b"keys") is None
    if not was_open:  # keep the main process free of LMDB handles: workers open their own
        _close_lmdb(path)
    return serialized


def _msgpack_numpy_hook(obj: dict):
    # msgpack_numpy (0.4.x) writes arrays as {b"nd": True, b"type", b"kind", b"shape", b"data"} and numpy
    # scalars as {b"nd": False, b"type", b"data"}; the maps have bytes keys, so plain dicts never match.
    if b"nd" not in obj:
        return obj
    if obj.get(b"kind") not in (None, b""):
        raise ValueError(f"structured numpy dtype (kind {obj[b'kind']!r}) is not supported")
    dtype = plain_dtype(obj[b"type"], "msgpack_numpy array")  # never an object dtype from a file
    if obj[b"nd"]:
        return np.frombuffer(obj[b"data"], dtype=dtype).reshape(obj[b"shape"])
    return np.frombuffer(obj[b"data"], dtype=dtype)[0]


def decode_serialized(buf: bytes) -> Any:
    """tensorpack 0.9.4 `loads`: msgpack with msgpack_numpy maps, decoded with the plain msgpack package."""
    import msgpack

    big = 10**9
    return msgpack.unpackb(
        buf,
        raw=False,
        object_hook=_msgpack_numpy_hook,
        strict_map_key=False,
        max_bin_len=big,
        max_array_len=big,
        max_map_len=big,
        max_str_len=big,
    )


class SerializedGQA(_LazyHandle):
    """IGLUE's GQA train/val LMDB: one record per question (image arrays + `img_id` + `entry`), keys
    b"%08d", plus `__keys__`. Record i = i-th key in LMDB order (VOLTA's shuffle=False cursor order)."""

    def _open(self):
        return _open_lmdb(self.path)

    def keys(self) -> list[bytes]:
        if getattr(self, "_keys", None) is None:
            with self.handle.begin() as txn:
                raw = txn.get(b"__keys__")
            if raw is None:
                raise ValueError(f"{self.path}: no '__keys__' entry; not a tensorpack serialized LMDB")
            self._keys = sorted(decode_serialized(raw))
        return self._keys

    def __len__(self) -> int:
        return len(self.keys())

    def record(self, i: int) -> dict:
        key = self.keys()[i]
        with self.handle.begin() as txn:
            raw = txn.get(key)
        if raw is None:
            raise ValueError(f"{self.path}: record {key!r} listed in __keys__ is missing")
        rec = decode_serialized(raw)
        rec["key"] = key.decode()
        return rec


def write_synthetic_features(
    path: str | os.PathLike, image_ids: Iterable, num_boxes: int = 36, seed: int = 0, feature_dim: int = FEATURE_DIM
) -> Path:
    """Random features in the real h5_to_lmdb.py format (pickled dict per image id + `keys` entry)."""
    import lmdb

    ids = sorted({str(i) for i in image_ids})
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    per_image = num_boxes * (feature_dim * 4 + 64) + 4096
    env = lmdb.open(str(path), map_size=max(1 << 24, 2 * per_image * len(ids) + (1 << 20)))
    rng = np.random.default_rng(seed)
    with env.begin(write=True) as txn:
        for image_id in ids:
            w, h = int(rng.integers(200, 640)), int(rng.integers(200, 640))
            x1 = rng.uniform(0, w * 0.6, num_boxes).astype(np.float32)
            y1 = rng.uniform(0, h * 0.6, num_boxes).astype(np.float32)
            x2 = np.minimum(x1 + rng.uniform(8, w * 0.4, num_boxes), w - 1).astype(np.float32)
            y2 = np.minimum(y1 + rng.uniform(8, h * 0.4, num_boxes), h - 1).astype(np.float32)
            item = {
                "attr_conf": rng.random(num_boxes, dtype=np.float32),
                "attr_id": rng.integers(0, 400, num_boxes).astype(np.int64),
                "boxes": np.stack([x1, y1, x2, y2], 1),
                "features": np.maximum(rng.standard_normal((num_boxes, feature_dim), dtype=np.float32), 0),
                "img_h": np.int64(h),
                "img_w": np.int64(w),
                "obj_conf": rng.random(num_boxes, dtype=np.float32),
                "obj_id": rng.integers(0, 1600, num_boxes).astype(np.int64),
                "img_id": image_id,
            }
            txn.put(image_id.encode(), pickle.dumps(item))
        txn.put(b"keys", pickle.dumps([i.encode() for i in ids]))
    env.close()
    return path


# ----------------------------------------------------------------------------------------------
# Pickles inside downloaded files (feature LMDB records and `keys`, hard_negative.pkl, vocabularies)
# ----------------------------------------------------------------------------------------------
# Unpickling calls whatever function the file names. These files need none beyond numpy's array, dtype and
# scalar rebuilders and a few builtin containers, so the unpickler below resolves exactly those (numpy 1.x
# and 2.x module names, Python 2 names) to our own checking functions, and refuses every other name. numpy's
# dtype.__setstate__ would accept a forged state (object fields on a float type: raw bytes read as pointers),
# so dtypes and arrays are rebuilt by us from validated parts, never by numpy's setstate on forged input.


class UnsafePickleError(ValueError):
    """A downloaded pickle names a function or class that no data file needs; nothing was called."""


PLAIN_DTYPE_KINDS = "biufcSU"  # bool, ints, floats, complex, bytes and str: no objects, no structs


def plain_dtype(spec: str, where: str = "dtype") -> np.dtype:
    """np.dtype(spec) if it is a plain numeric/bytes/str type (no object, struct, sub-array); else ValueError."""
    if type(spec) is not str:
        raise ValueError(f"{where}: dtype spec must be a string, got {type(spec).__name__}")
    dt = _PLAIN_DTYPES.get(spec)
    if dt is None:
        dt = np.dtype(spec)
        if dt.kind not in PLAIN_DTYPE_KINDS or dt.fields is not None or dt.subdtype is not None or dt.hasobject:
            raise ValueError(f"{where}: dtype {spec!r} is not a plain numeric or string type")
        if len(_PLAIN_DTYPES) < 1024:
            _PLAIN_DTYPES[spec] = dt
    return dt


_PLAIN_DTYPES: dict[str, np.dtype] = {}  # spec -> checked dtype (a feature file repeats the same few)
_NATIVE_ORDER = "<" if sys.byteorder == "little" else ">"


class _NdarrayMarker:
    """Stands for numpy.ndarray, the class argument of _reconstruct; not callable, holds no state."""

    __slots__ = ()


_NDARRAY = _NdarrayMarker()


class _PickledDtype:
    """A dtype being unpickled: built from its spec, then its pickled state may only set the byte order."""

    __slots__ = ("dtype", "_built")

    def __init__(self, spec, align=False, copy=True):
        self.dtype, self._built = plain_dtype(spec, "pickled dtype"), False

    def __setstate__(self, state):
        if self._built or not isinstance(state, tuple) or len(state) not in (8, 9) or state[0] not in (3, 4):
            raise ValueError("malformed dtype state")
        endian, subarray, names, fields, elsize, alignment = state[1:7]
        if (subarray, names, fields) != (None, None, None) or (len(state) == 9 and state[8] is not None):
            raise ValueError("dtype state with fields, sub-arrays or metadata")
        if elsize not in (-1, self.dtype.itemsize) or alignment not in (-1, self.dtype.alignment):
            raise ValueError(f"dtype state with item size {elsize} / alignment {alignment} for {self.dtype}")
        if endian not in ("<", ">", "=", "|"):
            raise ValueError(f"dtype state with byte order {endian!r}")
        if endian in "<>" and endian != _NATIVE_ORDER and self.dtype.byteorder != "|":
            self.dtype = self.dtype.newbyteorder(endian)
        self._built = True


def _shape(shape) -> tuple[int, ...]:
    if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"array shape {shape!r} is not a tuple of non-negative ints")
    return shape


def _raw_bytes(raw) -> bytes | bytearray:
    if isinstance(raw, str):  # Python 2 pickles read with encoding="latin1"
        return raw.encode("latin1")
    if not isinstance(raw, (bytes, bytearray)):
        raise ValueError(f"array data must be bytes, got {type(raw).__name__}")
    return raw


class _PickledArray:
    """An ndarray being unpickled (numpy's _reconstruct + BUILD); replaced by `array` once loading ends."""

    __slots__ = ("array",)

    def __init__(self):
        self.array = None

    def __setstate__(self, state):
        # numpy's setstate checks shape and data size itself; what it must not see is a forged dtype
        if self.array is not None or type(state) is not tuple or len(state) not in (4, 5):
            raise ValueError("malformed array state")
        if len(state) == 5 and state[0] != 1:
            raise ValueError(f"array state version {state[0]!r}")
        shape, dtype, fortran, raw = state[-4:]
        if type(dtype) is not _PickledDtype or type(shape) is not tuple or type(raw) not in (bytes, bytearray, str):
            raise ValueError("malformed array state")
        arr = np.empty(0, np.uint8)
        arr.__setstate__((1, shape, dtype.dtype, fortran, raw))
        self.array = arr


def _pickle_reconstruct(cls, shape, typecode):
    if not isinstance(cls, _NdarrayMarker):
        raise ValueError("_reconstruct of a class other than numpy.ndarray")
    return _PickledArray()


def _pickle_scalar(dtype, raw):
    if not isinstance(dtype, _PickledDtype):
        raise ValueError("numpy scalar without a dtype")
    raw = _raw_bytes(raw)
    if len(raw) != dtype.dtype.itemsize:
        raise ValueError(f"numpy scalar of {len(raw)} bytes for {dtype.dtype}")
    return np.frombuffer(raw, dtype.dtype)[0]


def _pickle_frombuffer(buf, dtype, shape, order):  # numpy's pickle protocol 5 path for contiguous arrays
    if not isinstance(dtype, _PickledDtype) or not isinstance(buf, (bytes, bytearray)) or order not in ("C", "F"):
        raise ValueError("malformed protocol-5 array")
    shape = _shape(shape)
    if len(buf) != math.prod(shape) * dtype.dtype.itemsize:
        raise ValueError(f"array data of {len(buf)} bytes for shape {shape} of {dtype.dtype}")
    arr = np.frombuffer(buf, dtype.dtype)
    return arr.reshape(shape[::-1]).T if order == "F" else arr.reshape(shape)


def _pickle_latin1(text, encoding):  # how protocols 0-2 store bytes: _codecs.encode(str, "latin1")
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise ValueError(f"_codecs.encode with {encoding!r}")
    return text.encode("latin1")


def _pickle_empty_bytes(*args):  # protocols 0-2 store b"" as bytes()
    if args:
        raise ValueError("bytes() with arguments")
    return b""


def _pickle_container(kind):
    def build(*args):
        if len(args) > 1 or (args and not isinstance(args[0], (list, tuple, dict, set, frozenset))):
            raise ValueError(f"{kind.__name__}() with arguments {type(args).__name__}")
        return kind(*args)

    return build


_NUMPY_CORE = ("numpy.core", "numpy._core")  # numpy 1.x / 2.x module names in pickles
_PICKLE_GLOBALS = {
    **{(f"{m}.multiarray", "_reconstruct"): _pickle_reconstruct for m in _NUMPY_CORE},
    **{(f"{m}.multiarray", "scalar"): _pickle_scalar for m in _NUMPY_CORE},
    **{(f"{m}.numeric", "_frombuffer"): _pickle_frombuffer for m in _NUMPY_CORE},
    ("numpy", "dtype"): _PickledDtype,
    ("_codecs", "encode"): _pickle_latin1,
    **{(b, "bytes"): _pickle_empty_bytes for b in ("builtins", "__builtin__")},
    **{(b, k.__name__): _pickle_container(k) for b in ("builtins", "__builtin__") for k in (set, frozenset)},
    ("collections", "OrderedDict"): _pickle_container(collections.OrderedDict),
}


class _DataUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only _PICKLE_GLOBALS (exact module and name) and numpy.ndarray."""

    numpy_seen = False  # set once a numpy name is resolved: only then can placeholders need replacing

    def find_class(self, module: str, name: str):
        self.numpy_seen = self.numpy_seen or module.startswith("numpy")
        if (module, name) == ("numpy", "ndarray"):
            return _NDARRAY
        fn = _PICKLE_GLOBALS.get((module, name))
        if fn is None:
            raise UnsafePickleError(f"{module}.{name}")
        # a fresh function per lookup: a BUILD on it (setattr) cannot alter the shared checking functions
        return lambda *args: fn(*args)


def _resolve_pickled(obj, seen: set):
    """obj with every _PickledArray / _PickledDtype replaced by its ndarray / dtype (containers in place)."""
    kind = type(obj)
    if kind is _PickledArray:
        if obj.array is None:
            raise ValueError("array without its data")
        return obj.array
    if kind is _PickledDtype:
        return obj.dtype
    if kind in (list, dict, collections.OrderedDict):
        if id(obj) in seen:
            return obj
        seen.add(id(obj))
        if kind is list:
            obj[:] = [_resolve_pickled(x, seen) for x in obj]
        else:
            if any(type(k) in (_PickledArray, _PickledDtype) for k in obj):
                raise ValueError("numpy object as a dict key")
            for k, v in obj.items():
                obj[k] = _resolve_pickled(v, seen)
        return obj
    if kind is tuple:
        new = tuple(_resolve_pickled(x, seen) for x in obj)
        return obj if all(a is b for a, b in zip(new, obj)) else new
    if kind in (set, frozenset) and any(type(x) in (_PickledArray, _PickledDtype) for x in obj):
        raise ValueError("numpy object in a set")
    return obj


def unpickle_data(buf: bytes | memoryview, where: str) -> Any:
    """Plain data (builtin containers, numbers, strings, bytes, numpy arrays/scalars) from a pickle found in a
    downloaded file; anything else is a one-line ValueError naming `where` (UnsafePickleError when the pickle
    asks for a function or class: nothing named in it is called). Python 2 pickles whose str are not ASCII
    are read as latin-1, as numpy advises for them."""
    try:
        try:
            unpickler = _DataUnpickler(io.BytesIO(buf))
            obj = unpickler.load()
        except UnicodeDecodeError:
            unpickler = _DataUnpickler(io.BytesIO(buf), encoding="latin1")
            obj = unpickler.load()
        return _resolve_pickled(obj, set()) if unpickler.numpy_seen else obj
    except UnsafePickleError as e:
        raise UnsafePickleError(
            f"{where}: refused to unpickle: it asks for {e}, which no data file needs (only "
            f"containers, numbers, strings and numpy arrays are read; nothing was run)"
        ) from None
    except (
        pickle.UnpicklingError,
        ValueError,
        TypeError,
        EOFError,
        AttributeError,
        IndexError,
        KeyError,
        OverflowError,
        MemoryError,
        RecursionError,
    ) as e:
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        raise BadInput(f"{where}: not a readable pickle of plain data ({type(e).__name__}: {detail})") from None


def read_pickle(path: str | os.PathLike) -> Any:
    """unpickle_data of a whole file."""
    return unpickle_data(Path(path).read_bytes(), str(path))


# ----------------------------------------------------------------------------------------------
# Images (CCLM)
# ----------------------------------------------------------------------------------------------


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decoded RGB image (Image.open + convert("RGB"); already-RGB files skip the copy convert makes).
    An image of more than IMAGE_MAX_PIXELS pixels is a ValueError naming the file, raised before decoding."""
    with warnings.catch_warnings():  # PIL warns above its limit (ours) and refuses above twice it
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(path, formats=IMAGE_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ValueError(f"image file {path}: refused as a decompression bomb ({e})") from None
    if img.width * img.height > IMAGE_MAX_PIXELS:
        img.close()
        raise ValueError(
            f"image file {path}: refused as a decompression bomb ({img.width} x {img.height} = "
            f"{img.width * img.height:,} pixels; limit data.IMAGE_MAX_PIXELS = {IMAGE_MAX_PIXELS:,})"
        )
    with img:
        if img.mode == "RGB":
            img.load()
            return img
        return img.convert("RGB")


def _pixels(img: Image.Image) -> torch.Tensor:
    """uint8 [H, W, 3] of an RGB image (PIL's layout; normalize_images makes ToTensor's [3, H, W] floats)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))


_MEAN = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None]
_STD = torch.tensor(CLIP_STD, dtype=torch.float32)[:, None, None]


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [..., H, W, 3], as CCLM batches carry them, -> ToTensor + CLIP Normalize: float32
    [..., 3, H, W] with torchvision's float32 ops in its order (x / 255, - mean, / std), on the pixels' device.
    Float input is already normalised and returned as it is. Batches stay uint8 and in PIL's layout until the
    model (train_cclm.VisionEncoder) normalises them: the loader copies a quarter of the bytes, with plain
    memcpy, and the transpose and float work run on the accelerator."""
    if images.dtype != torch.uint8:
        return images
    x = images.movedim(-1, -3).to(torch.float32, memory_format=torch.contiguous_format)
    return x.div_(255).sub_(_MEAN.to(x.device)).div_(_STD.to(x.device))


def _eval_pixels(img: Image.Image, res: int) -> torch.Tensor:
    return _pixels(img.resize((res, res), Image.Resampling.BICUBIC))


def eval_transform(img: Image.Image, res: int = 384) -> torch.Tensor:
    """X2-VLM test transform: Resize((res, res)) bicubic (PIL, antialiased), ToTensor, CLIP Normalize."""
    return normalize_images(_eval_pixels(img, res))


def _random_resized_crop_box(
    rng: np.random.Generator, width: int, height: int, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params with our generator -> (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# RandomAugment(2, 7) of X2-VLM with its 10 ops. Same op list, level (7/10), probabilities (each of the 2
# sampled ops applied with p=0.5) and parameters; pixel ops written in numpy with the reference's formulas,
# geometric ops with PIL's bilinear affine (the reference uses cv2.warpAffine: sub-pixel results may differ).
# What the reference does: docs/reference_facts.md#F-cclm-randaugment
_AUG_OPS = (
    "Identity",
    "AutoContrast",
    "Equalize",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)
_AUG_LEVEL, _AUG_MAX_LEVEL, _AUG_FILL = 7, 10, (128, 128, 128)


def _autocontrast(arr: np.ndarray) -> np.ndarray:
    # the intended per-channel stretch; the reference negates the channel minimum as a uint8 (-low wraps to
    # 256 - low), which turns any channel whose minimum is above 0 almost white: a bug we do not copy
    # (docs/reference_facts.md#F-cclm-randaugment, README)
    out = arr.copy()
    for c in range(arr.shape[2]):
        ch = arr[:, :, c]
        lo, hi = int(ch.min()), int(ch.max())
        if hi > lo:
            scale = 255.0 / (hi - lo)
            table = np.clip(np.arange(256) * scale - lo * scale, 0, 255).astype(np.uint8)
            out[:, :, c] = table[ch]
    return out


def _equalize(arr: np.ndarray) -> np.ndarray:
    out = arr.copy()
    for c in range(arr.shape[2]):
        ch = arr[:, :, c]
        hist = np.bincount(ch.ravel(), minlength=256).astype(np.float32)
        nonzero = hist[hist != 0]
        step = np.sum(nonzero[:-1]) // 255
        if step == 0:
            continue
        n = np.empty_like(hist)
        n[0] = step // 2
        n[1:] = hist[:-1]
        out[:, :, c] = (np.cumsum(n) // step).clip(0, 255).astype(np.uint8)[ch]
    return out


def _sharpness(arr: np.ndarray, factor: float) -> np.ndarray:
    if arr.shape[0] < 3 or arr.shape[1] < 3:
        return arr
    x = arr.astype(np.float32)
    win = sum(x[i : i + x.shape[0] - 2, j : j + x.shape[1] - 2] for i in range(3) for j in range(3))
    centre = x[1:-1, 1:-1]
    degenerate = np.clip(np.rint((win + 4 * centre) / 13), 0, 255)  # 3x3 kernel of ones, centre 5, /13
    out = arr.copy()
    # the reference casts without clipping (platform-dependent wrap-around); we clip to [0, 255]
    out[1:-1, 1:-1] = np.clip(degenerate + factor * (centre - degenerate), 0, 255).astype(np.uint8)
    return out


def _random_augment(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    mag = _AUG_LEVEL / _AUG_MAX_LEVEL
    for name in rng.choice(_AUG_OPS, 2):
        if rng.random() > 0.5:
            continue
        if name == "Identity":
            continue
        if name in ("AutoContrast", "Equalize", "Brightness", "Sharpness"):
            arr = np.asarray(img)
            if name == "AutoContrast":
                arr = _autocontrast(arr)
            elif name == "Equalize":
                arr = _equalize(arr)
            elif name == "Brightness":
                table = (np.arange(256, dtype=np.float32) * (mag * 1.8 + 0.1)).clip(0, 255).astype(np.uint8)
                arr = table[arr]
            else:
                arr = _sharpness(arr, mag * 1.8 + 0.1)
            img = Image.fromarray(arr)
            continue
        if name in ("ShearX", "ShearY"):
            s = mag * 0.3 * (-1 if rng.random() > 0.5 else 1)
            data = (1, -s, 0, 0, 1, 0) if name == "ShearX" else (1, 0, 0, -s, 1, 0)
        elif name in ("TranslateX", "TranslateY"):
            t = mag * 10.0 * (-1 if rng.random() > 0.5 else 1)  # translate_const 10 pixels
            data = (1, 0, t, 0, 1, 0) if name == "TranslateX" else (1, 0, 0, 0, 1, t)
        else:  # Rotate
            deg = mag * 30 * (-1 if rng.random() < 0.5 else 1)
            img = img.rotate(
                deg, resample=Image.Resampling.BILINEAR, center=(img.width / 2, img.height / 2), fillcolor=_AUG_FILL
            )
            continue
        img = img.transform(
            img.size, Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR, fillcolor=_AUG_FILL
        )
    return img


def _train_pixels(img: Image.Image, res: int, rng: np.random.Generator, flip: bool) -> torch.Tensor:
    top, left, h, w = _random_resized_crop_box(rng, img.width, img.height)
    img = img.crop((left, top, left + w, top + h)).resize((res, res), Image.Resampling.BICUBIC)
    if flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _pixels(_random_augment(img, rng))


def train_transform(img: Image.Image, res: int, rng: np.random.Generator, flip: bool) -> torch.Tensor:
    """X2-VLM train transform: RandomResizedCrop(res, scale (0.5, 1)) bicubic, horizontal flip p=0.5 when
    `flip` (XVNLI, xFlickr&CO; xGQA flips before, in the dataset), RandomAugment(2, 7), ToTensor, Normalize."""
    return normalize_images(_train_pixels(img, res, rng, flip))


def write_synthetic_images(
    folder: str | os.PathLike, relpaths: Iterable[str], size=(128, 96), seed: int = 0
) -> list[Path]:
    """Smooth random RGB images (JPEG or PNG by extension) at folder/relpath; size int or (W, H)."""
    w, h = (size, size) if isinstance(size, int) else size
    out = []
    for i, rel in enumerate(relpaths):
        rng = np.random.default_rng([seed, i])
        small = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
        path = Path(folder) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=90) if path.suffix.lower() in (".jpg", ".jpeg") else img.save(path)
        out.append(path)
    return out


# ----------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------

_PUNCT = re.compile(r"([,.'!?\"()*#:;~])")


def pre_caption(caption: str, max_words: int) -> str:
    """X2-VLM caption/hypothesis cleaning: lower, punctuation -> space, '-' '/' -> space, <person> -> person,
    collapse whitespace, strip, keep the first `max_words` words."""
    text = _PUNCT.sub(" ", caption.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    if not text:
        raise ValueError(f"text is empty after cleaning (raw: {caption!r})")
    return text


def pre_question(question: str, max_words: int) -> str:
    """X2-VLM question cleaning: lower, punctuation -> space, '-' '/' -> space, right-strip spaces, keep the
    first `max_words` space-separated pieces (whitespace runs are not collapsed, as in the reference)."""
    text = _PUNCT.sub(" ", question.lower()).replace("-", " ").replace("/", " ").rstrip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return text


def _check_special_ids(tok, name: str) -> None:
    got = {
        "<s>": tok.convert_tokens_to_ids("<s>"),
        "<pad>": tok.pad_token_id,
        "</s>": tok.convert_tokens_to_ids("</s>"),
        "<unk>": tok.unk_token_id,
    }
    want = {"<s>": BOS_ID, "<pad>": PAD_ID, "</s>": EOS_ID, "<unk>": UNK_ID}
    if got != want:
        raise ValueError(f"tokenizer {name}: special ids {got} differ from XLM-R's {want}")


def load_tokenizer(path_or_hub_id: str | os.PathLike):
    """XLM-R tokenizer from a local folder or the local Hugging Face cache (never downloads)."""
    from transformers import AutoTokenizer

    name = str(path_or_hub_id)
    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=True, trust_remote_code=False)
    except Exception:
        raise ValueError(
            f"tokenizer {name!r} not found locally: give a folder with tokenizer files (e.g. a saved "
            f"xlm-roberta-base tokenizer) or a hub id already in the local HF cache"
        ) from None
    _check_special_ids(tok, name)
    return tok


def make_tiny_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 1000):
    """Small sentencepiece-style (Unigram + Metaspace) tokenizer with XLM-R's special ids, saved as a
    PreTrainedTokenizerFast folder that load_tokenizer(out_dir) loads."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator([t for t in texts if t], trainer)
    fast = save_xlmr_style_tokenizer(tok, out_dir)
    _check_special_ids(fast, "tiny")
    return fast


def save_xlmr_style_tokenizer(tok, out_dir: str | Path):
    """A `tokenizers` Tokenizer whose vocabulary starts with <s> <pad> </s> <unk> <mask>, given XLM-R's template
    (<s> A </s>, <s> A </s> </s> B </s>) and special tokens, saved as a PreTrainedTokenizerFast folder that
    load_tokenizer(out_dir) loads (the tiny test tokenizer and the synthetic world's word-level one)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", BOS_ID), ("</s>", EOS_ID)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        cls_token="<s>",
        sep_token="</s>",
        mask_token="<mask>",
        model_max_length=512,
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


def encode_texts(tokenizer, texts: Sequence[str], max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, L] (L = longest in the batch, right-padded with the pad id) and attention mask [B, L].
    Sequences longer than max_len keep <s>, the first max_len-2 ids and </s> (VOLTA / HF truncation)."""
    # the tokenizer's public call: it also clears truncation/padding state an earlier call left in its backend
    ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"] if len(texts) else []
    if max_len is not None:
        ids = [x if len(x) <= max_len else x[: max_len - 1] + x[-1:] for x in ids]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    length = int(lengths.max()) if len(ids) else 1
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else PAD_ID
    # one vectorised fill instead of a tensor per row (the per-row loop cost as much as the tokenizer)
    mask = np.arange(length) < lengths[:, None]
    out = np.full((len(ids), length), pad, dtype=np.int64)
    out[mask] = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    return torch.from_numpy(out), torch.from_numpy(mask.astype(np.int64))


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------


def _rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """All dataset randomness: a generator seeded by (seed, epoch, index), never the global RNG."""
    return np.random.default_rng([seed, epoch, index])


def _missing_feature_error(key: str, ex: Example, where: str) -> ValueError:
    return BadInput(f"feature key {key!r} not found in {where} (referenced by {ex.source}, example {ex.id})")


def _referenced(ex: Example | None) -> str:
    return f" (referenced by {ex.source}, example {ex.id})" if ex is not None else ""


def _read_record(reader, key: str, ex: Example | None, read: str = "kept_regions", *args):
    """reader.<read>(key, *args) with every failure of the record a one-line BadInput naming file, key and
    (ex) annotation line: a key listed in the `keys` entry without a record, a record of the wrong
    shape, or one that does not decode at all (bit rot: pickle raises many types)."""
    try:
        return getattr(reader, read)(key, *args)
    except KeyError:
        if key in reader:
            raise BadInput(
                f"{reader.path}: feature key {key!r} is listed in its keys but has no record (a damaged "
                f"or incomplete copy); copy or download the features again{_referenced(ex)}"
            ) from None
        raise _missing_feature_error(key, ex, reader.path) from None
    except BadInput as e:
        raise BadInput(f"{e}{_referenced(ex)}") from None
    except Exception as e:  # noqa: BLE001 - undecodable bytes
        detail = (str(e).strip().splitlines() or [""])[0][:160]
        raise BadInput(
            f"{reader.path}: feature record {key!r} cannot be decoded ({type(e).__name__}: {detail}); "
            f"copy or download the features again{_referenced(ex)}"
        ) from None


def _read_regions(reader, ex: Example, max_regions: int, key: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    return _read_record(reader, ex.image if key is None else key, ex, "kept_regions", max_regions)


def _as_reader(features):
    if features is None:
        raise ValueError("region features are required for UC2 (give --features)")
    if isinstance(features, (str, os.PathLike)):
        if is_serialized_lmdb(features):
            raise ValueError(
                f"{features} is a per-question GQA serialized LMDB: use SerializedGQADataset "
                f"(GQA train/val only), not an image-keyed reader"
            )
        return open_features(features)
    return features


def check_inputs(examples: Sequence[Example], *, features=None, images=None, sample: int | None = 0) -> None:
    """Fail fast, before any training: ValueError naming the first example whose region features (key not in
    `features`, a reader/path/FeatureSet) or image file (under `images`) is missing, with its annotation
    line and how many distinct images are missing (`python data.py ... --features/--images` lists them).
    sample: also decode that many distinct records / image headers (None: all; 0: none), BadInput naming the
    first bad one and the count (`python data.py --verify` lists every one)."""
    reader = _as_reader(features) if features is not None else None
    if images is not None:  # every example's own path (two may share an image key but name different files)
        for ex in examples:
            _image_path(images, ex.image_file, ex)
    if reader is not None:
        feature_keys(reader)  # a keys entry that does not decode: one line naming the file
    distinct = _distinct_images(examples)
    missing = []
    for ex in distinct:
        if reader is not None and ex.image not in reader:
            missing.append(str(_missing_feature_error(ex.image, ex, reader.path)))
        elif images is not None and not os.path.isfile(path := _image_path(images, ex.image_file, ex)):
            missing.append(f"image file {path} not found (referenced by {ex.source}, example {ex.id})")
    if missing:
        raise ValueError(f"{missing[0]}; {len(missing)} of {len(distinct)} images missing")
    if sample != 0 and (reader is not None or images is not None):
        chosen = _spread(distinct, sample)
        bad = [
            problem
            for ex in chosen
            if (
                problem := _record_problem(reader, ex.image, ex)
                if reader is not None
                else _image_problem(_image_path(images, ex.image_file), ex)
            )
        ]
        if bad:
            raise BadInput(
                f"{bad[0]}; {len(bad)} of {len(chosen)} {'feature records' if reader else 'images'} "
                f"checked are bad (python data.py --verify lists them all)"
            )


# Start-up check of the trainers: distinct training images decoded (a spread sample; all for evaluation).
VERIFY_SAMPLE = 1000


def _spread(items: Sequence, sample: int | None) -> Sequence:
    """All items (sample None or >= len), else `sample` of them evenly spread (no random state touched)."""
    if sample is None or sample >= len(items):
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, sample).round().astype(int)]


def _record_problem(reader, key: str, ex: Example | None = None) -> str | None:
    """None if the feature record decodes (shape, dtype, sizes) to finite values, else a one-line reason."""
    try:
        feats, boxes, _, _ = _read_record(reader, key, ex, "get")
    except BadInput as e:
        return str(e)
    if not (np.isfinite(feats).all() and np.isfinite(boxes).all()):
        return f"{reader.path}: feature record {key!r} holds NaN or inf values{_referenced(ex)}"
    return None


def _image_problem(path: str, ex: Example | None = None) -> str | None:
    """None if the file's header reads as an image of positive size within PIL's pixel cap, else a reason.
    (The pixels are not decoded: a cut-off body still loads, grey, as in X2-VLM.)"""
    try:
        with Image.open(path) as img:
            fmt, (w, h) = img.format, img.size
    except FileNotFoundError:
        return f"image file {path} not found{_referenced(ex)}"
    except Exception as e:  # noqa: BLE001 - PIL raises many types for damaged headers
        reason = str(e).replace(f"'{path}'", "").replace(str(path), "").strip(" :")
        return f"image file {path} is corrupt or not an image ({type(e).__name__}: {reason}){_referenced(ex)}"
    cap = Image.MAX_IMAGE_PIXELS
    if fmt is None or w < 1 or h < 1 or (cap and w * h > cap):
        return f"image file {path}: {fmt} image of {w}x{h} pixels is empty or over the {cap} pixel cap{_referenced(ex)}"
    return None


def _image_path(images, rel: str, ex: Example | None = None) -> str:
    """<images root>/<subfolder>/<name> for an Example's image_file "<subfolder>/<name>". The name comes from
    the annotation file, so it must stay inside its subfolder: absolute names and ".." that climb out are an
    error naming the annotation line. (Resolved lexically: folders or files the user symlinked in are read
    where they point.)"""
    if images is None:
        raise ValueError("an images root is required for CCLM (give --images)")
    sub, _, name = rel.partition("/")
    folder = images[sub] if isinstance(images, dict) else os.path.join(str(images), sub)
    clean = os.path.normpath(name) if name and "\0" not in name else ""
    if not clean or os.path.isabs(clean) or clean == "." or clean.split(os.sep)[0] == "..":
        where = f" (referenced by {ex.source}, example {ex.id})" if ex is not None else ""
        raise ValueError(f"image path {name!r} is not a file inside the image folder {folder}{where}")
    return os.path.join(folder, clean)


def _open_image(images, ex: Example) -> Image.Image:
    path = _image_path(images, ex.image_file, ex)
    try:
        return load_image(path)
    except FileNotFoundError:
        raise BadInput(f"image file {path} not found (referenced by {ex.source}, example {ex.id})") from None
    except ValueError as e:  # load_image's own one-line refusals
        raise BadInput(f"{e} (referenced by {ex.source}, example {ex.id})") from None
    except OSError as e:  # PIL: not an image / header cut off ("Truncated File Read" names no file)
        raise BadInput(
            f"image file {path} is corrupt or not an image ({e.__class__.__name__}: "
            f"{str(e).replace(str(path), '').strip(' :')}) (referenced by {ex.source}, example {ex.id})"
        ) from None


class _EpochDataset(Dataset):
    seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)


RETRIEVAL_NEGATIVES = ("volta", "corrected")


def _volta_rngs(seed: int, epoch: int, index: int) -> tuple[random.Random, np.random.RandomState]:
    """The two generators VOLTA's sampler draws from (python's random, numpy's legacy RandomState), seeded per
    (seed, epoch, index) like every other dataset draw, never the global ones (exact resume, any worker count)."""
    py_seed, np_seed = np.random.SeedSequence([seed, epoch, index]).generate_state(2)
    return random.Random(int(py_seed)), np.random.RandomState(int(np_seed))


class UC2Dataset(_EpochDataset):
    """Region-feature examples. xgqa/xvnli items: one (text, image) pair. xflickrco training items: VOLTA's
    4 pairs per caption: (image, caption), (image, a "random" caption), (another image, caption),
    (image, a "hard" caption), drawn by one of RETRIEVAL_NEGATIVES:

    * "volta" (default; what IGLUE's UC2 numbers were trained with): VOLTA's RetrievalDataset exactly. It keeps,
      per image, the list 0..n-1 (n = captions on the image's annotation line) and uses an entry of it as an
      index into the *global* caption list, so both negative captions are always among the file's first n
      (Flickr30k: 5) captions, whatever image was drawn; the drawn image (random, or from the hard pool) only
      decides how many of those first captions are candidates. Pair 2 and 4 can therefore be the positive
      itself. The draws are VOLTA's calls in VOLTA's order on a python random.Random and a numpy RandomState
      (_volta_negatives); VOLTA uses the global generators of each DataLoader worker, we seed both per
      (seed, epoch, index). Without a hard-negative pool, pair 4 is drawn as VOLTA's non-train branch does.
    * "corrected": captions of the drawn images themselves (a random other image; a hard-pool image, an entry
      equal to the image itself skipped, else a random other image), so no pair is a false negative."""

    def __init__(
        self,
        examples: Sequence[Example],
        features,
        task: str,
        *,
        train: bool = False,
        max_regions: int = 36,
        seed: int = 0,
        hard_negatives: dict | str | None = None,
        negatives: str = "volta",
    ):
        if not examples:
            raise ValueError(f"{task}: no examples")
        if negatives not in RETRIEVAL_NEGATIVES:
            raise ValueError(f"unknown retrieval negatives {negatives!r}; expected one of {RETRIEVAL_NEGATIVES}")
        self.examples, self.task, self.train = list(examples), task, train
        self.reader, self.max_regions, self.seed = _as_reader(features), max_regions, seed
        self.negatives = negatives
        self.retrieval_train = task == "xflickrco" and train
        if self.retrieval_train:
            self._setup_retrieval(hard_negatives)

    def _setup_retrieval(self, hard_negatives) -> None:
        index_of: dict[str, int] = {}
        self.image_of: list[int] = []  # our image index of each caption
        self.captions_of: list[list[int]] = []  # caption indices of each image
        last_line: dict[int, str] = {}
        self.volta_count: list[int] = []  # VOLTA's len(imgid2entry[image]): captions on the image's last line
        for i, ex in enumerate(self.examples):
            j = index_of.setdefault(ex.image, len(index_of))
            if j == len(self.captions_of):
                self.captions_of.append([])
                self.volta_count.append(0)
            self.captions_of[j].append(i)
            self.image_of.append(j)
            if last_line.get(j) != ex.source:  # a new line of the same image restarts VOLTA's count at 0
                last_line[j], self.volta_count[j] = ex.source, 0
            self.volta_count[j] += 1
        self.image_keys = list(index_of)
        if len(self.image_keys) < 2:
            raise ValueError("retrieval training needs captions of at least 2 images")
        self.hard_pool = None
        if hard_negatives is not None:
            where = hard_negatives if isinstance(hard_negatives, (str, os.PathLike)) else "hard_negatives"
            hn = (
                load_hard_negatives(hard_negatives)
                if isinstance(hard_negatives, (str, os.PathLike))
                else hard_negatives
            )
            ours = {k: i for i, k in enumerate(self.image_keys)}
            pool_ids = [str(x) for x in hn["train_image_list"]]
            # pool row of each of our images, with pool entries translated to our image indices (-1 = unknown)
            to_ours = np.array([ours.get(k, -1) for k in pool_ids])
            self.hard_pool = {
                ours[k]: _pool_row(to_ours, hn["train_hard_pool"], r, where)
                for r, k in enumerate(pool_ids)
                if k in ours
            }
            if self.negatives == "volta":
                self._check_volta_pool(where)

    def _check_volta_pool(self, where) -> None:
        """VOLTA looks up every training image's pool row and every drawn pool image's captions (KeyError
        mid-epoch otherwise) and draws from positions 1.. of a row: refuse such a file before training."""
        for j, key in enumerate(self.image_keys):
            row = self.hard_pool.get(j)
            if row is None:
                raise ValueError(f"{where}: training image {key} has no row in train_hard_pool")
            if len(row) < 2 or (row[1:] < 0).any():
                raise ValueError(
                    f"{where}: the train_hard_pool row of image {key} has fewer than 2 entries or "
                    f"names an image that is not in the training annotations"
                )

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        ex = self.examples[index]
        if not self.retrieval_train:
            return {
                "kind": "example",
                "example": ex,
                "text": ex.text,
                "max_regions": self.max_regions,
                "regions": _read_regions(self.reader, ex, self.max_regions),
            }
        img = self.image_of[index]
        if self.negatives == "volta":
            _, cap_other, rand_img, _, cap_hard = self._volta_negatives(*_volta_rngs(self.seed, self.epoch, index), img)
        else:
            cap_other, rand_img, cap_hard = self._corrected_negatives(_rng(self.seed, self.epoch, index), img)
        pos = _read_regions(self.reader, ex, self.max_regions)
        neg = _read_regions(self.reader, ex, self.max_regions, key=self.image_keys[rand_img])
        other, hard = self.examples[cap_other], self.examples[cap_hard]
        return {
            "kind": "retrieval_train",
            "example": ex,
            "texts": [ex.text, other.text, ex.text, hard.text],
            "image_indices": [img, img, rand_img, img],
            "caption_images": [img, self.image_of[cap_other], img, self.image_of[cap_hard]],
            "caption_indices": [index, cap_other, index, cap_hard],
            "regions": [pos, pos, neg, pos],
            "max_regions": self.max_regions,
        }

    def _volta_negatives(
        self, py: random.Random, nprs: np.random.RandomState, img: int
    ) -> tuple[int, int, int, int, int]:
        """(image drawn for pair 2, caption index of pair 2, image of pair 3, image drawn for pair 4, caption
        index of pair 4) by the calls of VOLTA's RetrievalDataset.__getitem__, in its order (random.choice over
        the image list / over range(n); np.random.randint for the pool position): the same generator states
        give the same indices as VOLTA's code (tests/fixtures/volta_negatives)."""
        img2 = self._volta_other_image(py, img)
        cap2 = py.choice(range(self.volta_count[img2]))  # VOLTA's bug: an index into the global caption list
        img3 = self._volta_other_image(py, img)
        if self.hard_pool is not None:
            row = self.hard_pool[img]
            img4 = int(row[nprs.randint(1, len(row))])  # no check against img, as VOLTA
        else:
            img4 = self._volta_other_image(py, img)
        cap4 = py.choice(range(self.volta_count[img4]))
        return img2, cap2, img3, img4, cap4

    def _volta_other_image(self, py: random.Random, img: int) -> int:
        """VOLTA: random.choice(image_id_list) again until it is not the positive's image."""
        while True:
            j = py.choice(range(len(self.image_keys)))
            if j != img:
                return j

    def _corrected_negatives(self, rng: np.random.Generator, img: int) -> tuple[int, int, int]:
        other = self._other_image(rng, img)
        rand_img = self._other_image(rng, img)
        hard = self._hard_negative(rng, img)
        return int(rng.choice(self.captions_of[other])), rand_img, int(rng.choice(self.captions_of[hard]))

    def _other_image(self, rng, img: int) -> int:
        j = int(rng.integers(0, len(self.image_keys) - 1))
        return j + (j >= img)  # uniform over all images except img

    def _hard_negative(self, rng, img: int) -> int:
        pool = None if self.hard_pool is None else self.hard_pool.get(img)
        if pool is not None and len(pool) > 1:
            # VOLTA draws from positions 1..end of the image's pool (position 0 is the image itself)
            cand = pool[1:][(pool[1:] >= 0) & (pool[1:] != img)]
            if len(cand):
                return int(cand[rng.integers(0, len(cand))])
        return self._other_image(rng, img)


def _pool_row(to_ours: np.ndarray, pool: Sequence, r: int, where) -> np.ndarray:
    """Row r of train_hard_pool as our image indices; a position outside train_image_list is -1 (unknown)."""
    try:
        row = np.asarray(pool[r], dtype=np.int64).reshape(-1)
    except (IndexError, TypeError, ValueError):
        raise ValueError(
            f"{where}: train_hard_pool has no row {r} of integer image positions "
            f"(train_image_list has {len(to_ours)} images)"
        ) from None
    inside = (row >= 0) & (row < len(to_ours))
    return np.where(inside, to_ours[np.where(inside, row, 0)], -1)


def load_hard_negatives(path: str | os.PathLike) -> dict:
    """VOLTA's hard_negative.pkl: {"train_image_list": [image ids], "train_hard_pool": [[pool indices]], ...}."""
    hn = read_pickle(path)
    if not isinstance(hn, dict):
        raise ValueError(f"{path}: expected a dict (VOLTA's hard_negative.pkl), got {type(hn).__name__}")
    for key in ("train_image_list", "train_hard_pool"):
        if key not in hn:
            raise ValueError(f"{path}: missing {key!r} (expected VOLTA's hard_negative.pkl)")
    return hn


class SerializedGQADataset(_EpochDataset):
    """UC2 GQA training/validation straight from IGLUE's per-question serialized LMDB (questions, answers
    and features all come from the records; no annotation file). Items match UC2Dataset's xgqa items.
    Images with more than max_regions boxes are truncated like the image-keyed path (VOLTA's serialized
    loader raises instead; IGLUE's files always have 36 = max_regions boxes)."""

    def __init__(self, path: str | os.PathLike, max_regions: int = 36, lang: str = "en"):
        self.db, self.max_regions, self.lang = SerializedGQA(path), max_regions, lang

    def __len__(self) -> int:
        return len(self.db)

    def __getitem__(self, index: int) -> dict:
        rec = self.db.record(index)
        entry = rec["entry"]
        scores = {int(l): float(s) for l, s in zip(entry["labels"], entry["scores"])}
        ex = Example(
            task="xgqa",
            lang=self.lang,
            id=str(entry["question_id"]),
            image=str(rec["img_id"]),
            image_file=f"{IMAGE_SUBDIRS['gqa']}/{rec['img_id']}.jpg",
            text=str(entry["question"]),
            label=max(scores, key=scores.get) if scores else -1,
            scores=scores,
            source=f"{self.db.path} record {rec['key']}",
        )
        n = min(len(rec["boxes"]), self.max_regions)
        feats = np.asarray(rec["features"], dtype=np.float32).reshape(-1, FEATURE_DIM)[:n]
        boxes = np.asarray(rec["boxes"], dtype=np.float32).reshape(-1, 4)[:n]
        return {
            "kind": "example",
            "example": ex,
            "text": ex.text,
            "max_regions": self.max_regions,
            "regions": (feats, box_locations(boxes, int(rec["img_w"]), int(rec["img_h"]))),
        }


def _left_or_right_in(question: str, answers: Iterable[str]) -> bool:
    # X2-VLM's careful_hflip test: plain case-sensitive substring match on the raw question and answers
    return any("left" in s or "right" in s for s in [question, *answers])


class CCLMDataset(_EpochDataset):
    """Image examples for CCLM. Eval: reference test transform. Training: reference augmentation, seeded by
    (seed, epoch, index). XVNLI examples without a gold label ("-") are dropped, as X2-VLM's loader does."""

    def __init__(
        self,
        examples: Sequence[Example],
        images,
        task: str,
        *,
        train: bool = False,
        image_res: int = 384,
        seed: int = 0,
    ):
        self.examples = [ex for ex in examples if not (task == "xvnli" and ex.gold == XVNLI_NO_GOLD)]
        self.dropped = len(examples) - len(self.examples)
        if not self.examples:
            raise ValueError(f"{task}: no examples")
        self.images, self.task, self.train, self.image_res, self.seed = images, task, train, image_res, seed
        self.max_words = CCLM_MAX_WORDS[(task, train)]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        ex = self.examples[index]
        img = _open_image(self.images, ex)
        item = {"kind": "example", "example": ex}
        try:
            item["text"] = (pre_question if self.task == "xgqa" else pre_caption)(ex.text, self.max_words)
        except ValueError as e:
            raise ValueError(f"{ex.source} (example {ex.id}): {e}") from None
        if not self.train:
            item["pixels"] = _eval_pixels(img, self.image_res)  # uint8; the model normalises (normalize_images)
            return item
        rng = _rng(self.seed, self.epoch, index)
        if self.task == "xgqa":
            # xGQA flips in the dataset (p=0.5) unless 'left'/'right' occurs in question or answers
            if rng.random() < 0.5 and not _left_or_right_in(ex.text, ex.answers):
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            answers = list(ex.answers)
            item["answers"], item["weights"] = answers, [1.0 / len(answers)] * len(answers)
        item["pixels"] = _train_pixels(img, self.image_res, rng, flip=self.task != "xgqa")
        return item


def _distinct_images(examples: Sequence[Example]) -> list[Example]:
    """First example of each image, in first-appearance order (its position == Example.label)."""
    seen, out = set(), []
    for ex in examples:
        if ex.image not in seen:
            seen.add(ex.image)
            out.append(ex)
    return out


class RetrievalImages(Dataset):
    """Retrieval eval: each image of a split once, item i = image index i (Example.label of its captions).
    fields(example) -> the item's visual fields (a ModelInputs' image_fields: regions or pixels)."""

    def __init__(self, examples: Sequence[Example], fields: Callable[[Example], dict], image_res: int = 384):
        self.items, self.fields, self.image_res = _distinct_images(examples), fields, image_res

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        ex = self.items[index]
        return {"kind": "image", "example": ex, "image_index": index, **self.fields(ex)}


class RetrievalCaptions(Dataset):
    """Retrieval eval: each caption once, with the index of its gold image; clean(text): the model's text
    cleaning (None: the raw caption)."""

    def __init__(self, examples: Sequence[Example], clean: Callable[[str], str] | None = None):
        self.examples, self.clean = list(examples), clean

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        ex = self.examples[index]
        text = ex.text
        if self.clean is not None:
            try:
                text = self.clean(text)
            except ValueError as e:
                raise ValueError(f"{ex.source} (example {ex.id}): {e}") from None
        return {"kind": "caption", "example": ex, "text": text, "image_index": ex.label}


def _without_empty_lines(examples: Sequence[Example]) -> list[Example]:
    """Examples of annotation lines with at least one non-empty caption; image indices (Example.label)
    renumbered in first-appearance order when a line was skipped."""
    keep = {ex.source for ex in examples if ex.text}
    kept = [ex for ex in examples if ex.source in keep]
    if len(kept) == len(examples):
        return list(examples)
    index: dict[str, int] = {}
    return [replace(ex, label=index.setdefault(ex.image, len(index))) for ex in kept]


# ----------------------------------------------------------------------------------------------
# Collate (runs in DataLoader workers: tokenising happens here)
# ----------------------------------------------------------------------------------------------


def _batch_lang(examples: Sequence[Example]) -> str:
    return ",".join(sorted({ex.lang for ex in examples}))


def _common(items) -> dict:
    """`id` (example ids; image keys for retrieval image batches) and `lang` ("de"; "de,ko" if mixed)."""
    exs = [it["example"] for it in items]
    ids = [ex.image for ex in exs] if items[0]["kind"] == "image" else [ex.id for ex in exs]
    return {"id": ids, "lang": _batch_lang(exs)}


def _xgqa_labels(exs: Sequence[Example], num_answers: int | None = None) -> dict:
    out = {"label": torch.tensor([ex.label for ex in exs], dtype=torch.long), "qtype": [ex.qtype for ex in exs]}
    if num_answers is not None:  # UC2 soft targets (all zero when no answer is in the vocabulary)
        out["target"] = torch.zeros(len(exs), num_answers, dtype=torch.float32)
        for i, ex in enumerate(exs):
            for a, s in ex.scores.items():
                out["target"][i, a] = s
    return out


def _item_images(items) -> torch.Tensor:
    """uint8 [B, H, W, 3] (normalize_images turns them into the model's input)."""
    pixels = [it["pixels"] for it in items]
    out = fastload.batch_empty((len(pixels), *pixels[0].shape), torch.uint8)
    for row, p in zip(out, pixels):
        row.copy_(p)
    return out


def _item_regions(items) -> dict:
    return _batch_regions([it["regions"] for it in items], items[0]["max_regions"], (len(items),))


class UC2Collate:
    """Items of UC2Dataset / SerializedGQADataset / RetrievalImages / RetrievalCaptions -> contract batch."""

    def __init__(
        self, task: str, tokenizer, train: bool = False, max_len: int | None = -1, num_answers: int = NUM_ANSWERS
    ):
        self.task, self.tokenizer, self.train, self.num_answers = task, tokenizer, train, num_answers
        self.max_len = MAX_TEXT_LEN[("uc2", task, train)] if max_len == -1 else max_len

    def __call__(self, items: list[dict]) -> dict:
        kind = items[0]["kind"]
        batch = _common(items)
        exs = [it["example"] for it in items]
        if kind == "image":
            batch.update(_item_regions(items))
            batch["image_index"] = torch.tensor([it["image_index"] for it in items], dtype=torch.long)
            batch["image_key"] = [ex.image for ex in exs]
            return batch
        if kind == "retrieval_train":
            ids, mask = encode_texts(self.tokenizer, [t for it in items for t in it["texts"]], self.max_len)
            batch["input_ids"], batch["attention_mask"] = ids.view(len(items), 4, -1), mask.view(len(items), 4, -1)
            regions = [r for it in items for r in it["regions"]]
            batch.update(_batch_regions(regions, items[0]["max_regions"], (len(items), 4)))  # [B, 4, ...]
            return batch
        batch["input_ids"], batch["attention_mask"] = encode_texts(
            self.tokenizer, [it["text"] for it in items], self.max_len
        )
        if kind == "caption":
            batch["image_index"] = torch.tensor([it["image_index"] for it in items], dtype=torch.long)
            return batch
        batch.update(_item_regions(items))
        if self.task == "xgqa":
            batch.update(_xgqa_labels(exs, self.num_answers))
        elif self.task == "xvnli":
            label = torch.tensor([ex.label for ex in exs], dtype=torch.long)
            target = torch.zeros(len(exs), 3, dtype=torch.float32)
            has = label >= 0
            target[has, label[has]] = 1.0  # "-" (label -1): all-zero target, as VOLTA
            batch["target"], batch["label"] = target, label
        return batch


class CCLMCollate:
    """Items of CCLMDataset / RetrievalImages / RetrievalCaptions -> contract batch."""

    def __init__(self, task: str, tokenizer, train: bool = False, max_len: int | None = -1):
        self.task, self.tokenizer, self.train = task, tokenizer, train
        self.max_len = MAX_TEXT_LEN[("cclm", task, train)] if max_len == -1 else max_len

    def __call__(self, items: list[dict]) -> dict:
        kind = items[0]["kind"]
        batch = _common(items)
        exs = [it["example"] for it in items]
        if kind == "image":
            batch["images"] = _item_images(items)
            batch["image_index"] = torch.tensor([it["image_index"] for it in items], dtype=torch.long)
            batch["image_key"] = [ex.image for ex in exs]
            return batch
        batch["text_ids"], batch["text_atts"] = encode_texts(self.tokenizer, [it["text"] for it in items], self.max_len)
        if kind == "caption":
            batch["image_index"] = torch.tensor([it["image_index"] for it in items], dtype=torch.long)
            return batch
        batch["images"] = _item_images(items)
        if self.task == "xgqa":
            if self.train:
                answers = [a for it in items for a in it["answers"]]
                batch["answer_ids"], batch["answer_atts"] = encode_texts(self.tokenizer, answers, None)
                batch["weights"] = torch.tensor([w for it in items for w in it["weights"]], dtype=torch.float32)
                batch["k"] = [len(it["answers"]) for it in items]
            else:
                batch.update(_xgqa_labels(exs))
        elif self.task == "xvnli":
            batch["label"] = torch.tensor([XVNLI_LABELS_CCLM.index(ex.gold) for ex in exs], dtype=torch.long)
        elif self.task == "xflickrco":
            batch["idx"] = torch.tensor([ex.label for ex in exs], dtype=torch.long)
        return batch


# ----------------------------------------------------------------------------------------------
# Model inputs: what each model reads beside text, behind one interface
# ----------------------------------------------------------------------------------------------


class RegionFeatureInputs:
    """UC2 (VOLTA): region features (`features`: a path, reader or FeatureSet), VOLTA's text as it is in the file,
    UC2Dataset / SerializedGQADataset items, UC2Collate batches."""

    model = "uc2"

    def dataset(
        self,
        task: str,
        examples: Sequence[Example] | None,
        *,
        features=None,
        images=None,
        train: bool = False,
        max_regions: int = 36,
        image_res: int = 384,
        seed: int = 0,
        hard_negatives=None,
        negatives: str = "volta",
    ) -> Dataset:
        """UC2Dataset; for xgqa with a serialized LMDB as `features`, a SerializedGQADataset (the LMDB holds
        the questions; `examples` is then ignored)."""
        if task == "xgqa" and isinstance(features, (str, os.PathLike)) and is_serialized_lmdb(features):
            return SerializedGQADataset(features, max_regions=max_regions)
        return UC2Dataset(
            examples,
            features,
            task,
            train=train,
            max_regions=max_regions,
            seed=seed,
            hard_negatives=hard_negatives,
            negatives=negatives,
        )

    def retrieval_eval(
        self, examples: Sequence[Example], *, features=None, images=None, max_regions: int = 36, image_res: int = 384
    ) -> tuple[RetrievalImages, RetrievalCaptions]:
        """Every image and caption of the split, an empty caption included (VOLTA scores it as <s></s>)."""
        fields = functools.partial(_region_fields, _as_reader(features), max_regions)
        return RetrievalImages(examples, fields, image_res), RetrievalCaptions(examples)

    def collate(self, task: str, tokenizer, train: bool = False) -> UC2Collate:
        return UC2Collate(task, tokenizer, train)


class ImageInputs:
    """CCLM (X2-VLM): image files (`images`: the images root, see the module docstring), X2-VLM's text cleaning,
    CCLMDataset items, CCLMCollate batches."""

    model = "cclm"

    def dataset(
        self,
        task: str,
        examples: Sequence[Example] | None,
        *,
        features=None,
        images=None,
        train: bool = False,
        max_regions: int = 36,
        image_res: int = 384,
        seed: int = 0,
        hard_negatives=None,
        negatives: str = "volta",
    ) -> Dataset:
        return CCLMDataset(examples, images, task, train=train, image_res=image_res, seed=seed)

    def retrieval_eval(
        self, examples: Sequence[Example], *, features=None, images=None, max_regions: int = 36, image_res: int = 384
    ) -> tuple[RetrievalImages, RetrievalCaptions]:
        """An annotation line whose captions are all empty is skipped, as X2-VLM's xflickrco_eval_dataset does
        (IGLUE's de and id test files have one each: 1,999 images there)."""
        examples = _without_empty_lines(examples)
        clean = functools.partial(pre_caption, max_words=CCLM_MAX_WORDS[("xflickrco", False)])
        fields = functools.partial(_pixel_fields, images, image_res)
        return RetrievalImages(examples, fields, image_res), RetrievalCaptions(examples, clean)

    def collate(self, task: str, tokenizer, train: bool = False) -> CCLMCollate:
        return CCLMCollate(task, tokenizer, train)


def _region_fields(reader, max_regions: int, ex: Example) -> dict:
    return {"regions": _read_regions(reader, ex, max_regions), "max_regions": max_regions}


def _pixel_fields(images, image_res: int, ex: Example) -> dict:
    return {"pixels": _eval_pixels(_open_image(images, ex), image_res)}  # uint8; the model normalises


REGION_FEATURES, IMAGES = RegionFeatureInputs(), ImageInputs()
MODEL_INPUTS = {inputs.model: inputs for inputs in (REGION_FEATURES, IMAGES)}


def model_inputs(model: str) -> RegionFeatureInputs | ImageInputs:
    """The inputs of a model by its name ("uc2" / "cclm"), for callers that hold only the name."""
    if model not in MODEL_INPUTS:
        raise ValueError(f"unknown model {model!r}; expected {' or '.join(MODEL_INPUTS)}")
    return MODEL_INPUTS[model]


def make_dataset(model: str, task: str, examples: Sequence[Example] | None, **kwargs) -> Dataset:
    """model_inputs(model).dataset(task, examples, **kwargs)."""
    return model_inputs(model).dataset(task, examples, **kwargs)


def make_retrieval_eval(model: str, examples: Sequence[Example], **kwargs) -> tuple[RetrievalImages, RetrievalCaptions]:
    """model_inputs(model).retrieval_eval(examples, **kwargs)."""
    return model_inputs(model).retrieval_eval(examples, **kwargs)


def make_collate(model: str, task: str, tokenizer, train: bool = False) -> UC2Collate | CCLMCollate:
    """model_inputs(model).collate(task, tokenizer, train)."""
    return model_inputs(model).collate(task, tokenizer, train)


# ----------------------------------------------------------------------------------------------
# Loader
# ----------------------------------------------------------------------------------------------


def _worker_error_line(message: str) -> str:
    """BadInput's own message out of torch's 'Caught BadInput in DataLoader worker ... Traceback ...' text."""
    if "Traceback" not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    return last.split(f"{BadInput.__name__}: ", 1)[-1]


class BatchLoader(fastload.BatchLoader):
    """The loader of training and evaluation: a torch DataLoader (same arguments, same batches) whose batches
    travel through reused shared-memory slabs (fastload.py says why), and whose BadInput raised in a worker
    reaches the caller as its own one line, not torch's worker traceback."""

    def __iter__(self):
        try:
            yield from super().__iter__()
        except BadInput as e:
            raise BadInput(_worker_error_line(str(e))) from None


# ----------------------------------------------------------------------------------------------
# Inventory CLI
# ----------------------------------------------------------------------------------------------


def _feature_keys(paths: Sequence[str]) -> tuple[set[str], list[str]]:
    keys, notes = set(), []
    for p in paths:
        if is_serialized_lmdb(p):
            notes.append(
                f"{p}: per-question serialized GQA LMDB ({len(SerializedGQA(p))} records; holds its own "
                f"questions, so annotation image ids are not checked against it)"
            )
            continue
        keys |= feature_keys(open_features(p))
    return keys, notes


def inventory(data_root, features: Sequence[str] = (), images=None) -> dict:
    """task -> split -> lang -> {"examples", "images", "missing"} (translate-test splits get the suffix
    "_translate_test"); "missing" lists absent feature keys / image files (relative paths), or is None
    when neither features nor images were given. A file that fails to load gets {"error": message}.
    XTD10/ and multi30k-dataset/ under data_root are listed too ("xtd10", "multi30k": their caption and
    machine-translation files; "missing" None: their images are train_mclip.py features' to check); a data_root
    holding only those needs no IGLUE datasets/ folder."""
    retrieval = retrieval_set_roots(data_root)
    try:
        ds = dataset_dir(data_root)
    except ValueError:
        if not retrieval:
            raise
        ds = None
    keys, notes = _feature_keys(features) if features else (None, [])
    out: dict = {}
    for task, split, lang, mt in _annotation_files(ds) if ds is not None else ():
        entry = out.setdefault(task, {}).setdefault(f"{split}_translate_test" if mt else split, {})
        try:
            exs = load_split(ds, task, split, lang, mt)
        except ValueError as e:
            entry[lang] = {"error": str(e)}
            continue
        distinct = _distinct_images(exs)
        missing = None if keys is None and images is None else []
        if keys is not None:
            missing += sorted(ex.image for ex in distinct if ex.image not in keys)
        if images is not None:
            missing += sorted(
                ex.image_file for ex in distinct if not os.path.isfile(_image_path(images, ex.image_file, ex))
            )
        entry[lang] = {"examples": len(exs), "images": len(distinct), "missing": missing}
    out.update({name: retrieval_set_inventory(name, root) for name, root in retrieval.items()})
    if notes:
        out["notes"] = notes
    return out


def _print_inventory(inv: dict) -> None:
    for task, splits in inv.items():
        if task == "notes":
            continue
        print(task)
        for split, langs in splits.items():
            for lang, info in langs.items():
                if "error" in info:
                    print(f"  {split:<24} {lang:<4} ERROR {info['error']}")
                    continue
                miss = info["missing"]
                more = "" if miss is None else f"  missing {len(miss)}"
                if miss:
                    more += f" ({', '.join(miss[:5])}{', ...' if len(miss) > 5 else ''})"
                print(f"  {split:<24} {lang:<4} examples {info['examples']:>7}  images {info['images']:>6}{more}")
    for note in inv.get("notes", []):
        print(f"note: {note}")


def verify(data_root, features: Sequence[str] = (), images=None) -> tuple[list[str], dict[str, int]]:
    """Decode every record of each image-keyed feature file (shape, dtype, finite values) and the header of every
    image file the annotations under data_root reference (format, size, pixel cap). Returns (one line per bad
    record / image, {"feature records": checked, "images": checked}). Missing files are the inventory's."""
    bad, counts = [], {"feature records": 0, "images": 0}
    for path in features:
        if is_serialized_lmdb(path):
            continue  # per-question GQA records: read by SerializedGQA, not checked here
        reader = open_features(path)
        for key in sorted(feature_keys(reader)):
            counts["feature records"] += 1
            if problem := _record_problem(reader, key):
                bad.append(problem)
    seen: set[str] = set()
    for ex in _referenced_images(data_root) if images is not None else ():
        path = _image_path(images, ex.image_file)
        if path in seen or not os.path.isfile(path):  # missing files: the inventory's
            continue
        seen.add(path)
        counts["images"] += 1
        if problem := _image_problem(path, ex):
            bad.append(problem)
    return bad, counts


def _annotation_files(ds: Path) -> Iterable[tuple[str, str, str, bool]]:
    """(task, split, lang, translate_test) of every annotation file under the datasets folder ds."""
    for task in TASKS:
        for mt in (False, True):
            for split in available_splits(ds, task, mt):
                for lang in available_langs(ds, task, split, mt):
                    yield task, split, lang, mt


def _referenced_images(data_root) -> Iterable[Example]:
    """The first example of each image of every annotation file that loads (the inventory reports the others)."""
    ds = dataset_dir(data_root)
    for task, split, lang, mt in _annotation_files(ds):
        try:
            yield from _distinct_images(load_split(ds, task, split, lang, mt))
        except ValueError:
            continue


def _print_verify(bad: list[str], counts: dict[str, int]) -> int:
    for line in bad:
        print(f"bad: {line}")
    checked = " and ".join(f"{n} {what}" for what, n in counts.items() if n) or "nothing"
    if bad:
        print(f"error: --verify: {len(bad)} bad of {checked} checked (listed above)", file=sys.stderr)
        return 1
    print(f"verify: all {checked} are good")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Inventory of an IGLUE checkout: examples, images and missing "
        "feature keys / image files per task, split and language; XTD10/ "
        "and multi30k-dataset/ under --data-root are listed too."
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="also decode every feature record (shape, dtype, finite values) and every referenced image's "
        "header (format, size); lists every bad one, exit status 1 if any",
    )
    p.add_argument(
        "--data-root",
        required=True,
        help="folder holding datasets/ (an IGLUE checkout) and/or XTD10/, multi30k-dataset/ (train_mclip.py's sets)",
    )
    p.add_argument(
        "--features", nargs="+", default=[], help="region-feature LMDB(s) / H5 file(s) to check keys against"
    )
    p.add_argument("--images", default=None, help="images root (gqa/, flickr30k/, coco/ inside) to check files against")
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    try:
        inv = inventory(args.data_root, args.features, args.images)
        if args.json:
            print(json.dumps(inv, indent=1, ensure_ascii=False))
        else:
            _print_inventory(inv)
        return _print_verify(*verify(args.data_root, args.features, args.images)) if args.verify else 0
    except ValueError as e:
        raise SystemExit(f"error: {e}")


def exit_quietly_on_broken_pipe(main: Callable[[], object]) -> object:
    """main() for a command-line tool whose output may be cut short (`python data.py --json | head`): the
    reader closing the pipe ends the program quietly (exit 141 = 128 + SIGPIPE, as a shell reports it)."""
    try:
        return main()
    except BrokenPipeError:
        # stdout points at devnull from here, so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141) from None


if __name__ == "__main__":
    sys.exit(exit_quietly_on_broken_pipe(main))
