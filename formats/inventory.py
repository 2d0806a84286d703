"""The data inventory and pre-flight checks: what an IGLUE download (and XTD10 / Multi30K) holds, which feature
keys and image files are missing, which records and image headers are bad.

  check_inputs(examples, features=None, images=None, sample=0)   the trainers' fail-fast check before training:
                                    one-line ValueError naming the first missing feature key / image file, its
                                    annotation line and the count; sample: decode that many records / image
                                    headers too (None: all)
  inventory(root, features=(), images=None) / verify(root, features=(), images=None)
  python -m formats.inventory --data-root DIR [--features F ...] [--images ROOT] [--json] [--verify]

Not on the reading path: the trainers make one call (check_inputs). Unlike the other formats/ modules it sits
above data.py (it lists the annotations data.py reads; data.py never imports it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

import data
from comparisons.mclip import xtd_data
from formats.bad_input import BadInput
from formats.features import (
    SerializedGQA,
    as_reader,
    feature_keys,
    is_serialized_lmdb,
    missing_feature_error,
    open_features,
    read_record,
    referenced,
)


def check_inputs(examples: Sequence[data.Example], *, features=None, images=None, sample: int | None = 0) -> None:
    """Fail fast, before any training: ValueError naming the first example whose region features (key not in
    `features`, a reader/path/FeatureSet) or image file (under `images`) is missing, with its annotation
    line and how many distinct images are missing (`python -m formats.inventory ... --features/--images` lists them).
    sample: also decode that many distinct records / image headers (None: all; 0: none), BadInput naming the
    first bad one and the count (`python -m formats.inventory --verify` lists every one)."""
    reader = as_reader(features) if features is not None else None
    if images is not None:  # every example's own path (two may share an image key but name different files)
        for ex in examples:
            data.image_path(images, ex.image_file, ex)
    if reader is not None:
        feature_keys(reader)  # a keys entry that does not decode: one line naming the file
    distinct = data.distinct_images(examples)
    missing = []
    for ex in distinct:
        if reader is not None and ex.image not in reader:
            missing.append(str(missing_feature_error(ex.image, ex, reader.path)))
        elif images is not None and not os.path.isfile(path := data.image_path(images, ex.image_file, ex)):
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
                else _image_problem(data.image_path(images, ex.image_file), ex)
            )
        ]
        if bad:
            raise BadInput(
                f"{bad[0]}; {len(bad)} of {len(chosen)} {'feature records' if reader else 'images'} "
                f"checked are bad (python -m formats.inventory --verify lists them all)"
            )


# Start-up check of the trainers: distinct training images decoded (a spread sample; all for evaluation).
VERIFY_SAMPLE = 1000


def _spread(items: Sequence, sample: int | None) -> Sequence:
    """All items (sample None or >= len), else `sample` of them evenly spread (no random state touched)."""
    if sample is None or sample >= len(items):
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, sample).round().astype(int)]


def _record_problem(reader, key: str, ex: data.Example | None = None) -> str | None:
    """None if the feature record decodes (shape, dtype, sizes) to finite values, else a one-line reason."""
    try:
        feats, boxes, _, _ = read_record(reader, key, ex, "get")
    except BadInput as e:
        return str(e)
    if not (np.isfinite(feats).all() and np.isfinite(boxes).all()):
        return f"{reader.path}: feature record {key!r} holds NaN or inf values{referenced(ex)}"
    return None


def _image_problem(path: str, ex: data.Example | None = None) -> str | None:
    """None if the file's header reads as an image of positive size within PIL's pixel cap, else a reason.
    (The pixels are not decoded: a cut-off body still loads, grey, as in X2-VLM.)"""
    try:
        with Image.open(path) as img:
            fmt, (w, h) = img.format, img.size
    except FileNotFoundError:
        return f"image file {path} not found{referenced(ex)}"
    except Exception as e:  # noqa: BLE001 - PIL raises many types for damaged headers
        reason = str(e).replace(f"'{path}'", "").replace(str(path), "").strip(" :")
        return f"image file {path} is corrupt or not an image ({type(e).__name__}: {reason}){referenced(ex)}"
    cap = Image.MAX_IMAGE_PIXELS
    if fmt is None or w < 1 or h < 1 or (cap and w * h > cap):
        return f"image file {path}: {fmt} image of {w}x{h} pixels is empty or over the {cap} pixel cap{referenced(ex)}"
    return None


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
    retrieval = xtd_data.retrieval_set_roots(data_root)
    try:
        ds = data.dataset_dir(data_root)
    except ValueError:
        if not retrieval:
            raise
        ds = None
    keys, notes = _feature_keys(features) if features else (None, [])
    out: dict = {}
    for task, split, lang, mt in _annotation_files(ds) if ds is not None else ():
        entry = out.setdefault(task, {}).setdefault(f"{split}_translate_test" if mt else split, {})
        try:
            exs = data.load_split(ds, task, split, lang, mt)
        except ValueError as e:
            entry[lang] = {"error": str(e)}
            continue
        distinct = data.distinct_images(exs)
        missing = None if keys is None and images is None else []
        if keys is not None:
            missing += sorted(ex.image for ex in distinct if ex.image not in keys)
        if images is not None:
            missing += sorted(
                ex.image_file for ex in distinct if not os.path.isfile(data.image_path(images, ex.image_file, ex))
            )
        entry[lang] = {"examples": len(exs), "images": len(distinct), "missing": missing}
    out.update({name: xtd_data.retrieval_set_inventory(name, root) for name, root in retrieval.items()})
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
        path = data.image_path(images, ex.image_file)
        if path in seen or not os.path.isfile(path):  # missing files: the inventory's
            continue
        seen.add(path)
        counts["images"] += 1
        if problem := _image_problem(path, ex):
            bad.append(problem)
    return bad, counts


def _annotation_files(ds: Path) -> Iterable[tuple[str, str, str, bool]]:
    """(task, split, lang, translate_test) of every annotation file under the datasets folder ds."""
    for task in data.TASKS:
        for mt in (False, True):
            for split in data.available_splits(ds, task, mt):
                for lang in data.available_langs(ds, task, split, mt):
                    yield task, split, lang, mt


def _referenced_images(data_root) -> Iterable[data.Example]:
    """The first example of each image of every annotation file that loads (the inventory reports the others)."""
    ds = data.dataset_dir(data_root)
    for task, split, lang, mt in _annotation_files(ds):
        try:
            yield from data.distinct_images(data.load_split(ds, task, split, lang, mt))
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
    """main() for a command-line tool whose output may be cut short (`python -m formats.inventory --json | head`): the
    reader closing the pipe ends the program quietly (exit 141 = 128 + SIGPIPE, as a shell reports it)."""
    try:
        return main()
    except BrokenPipeError:
        # stdout points at devnull from here, so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141) from None


if __name__ == "__main__":
    sys.exit(exit_quietly_on_broken_pipe(main))
