"""The data inventory: what an IGLUE checkout holds (examples and distinct images per task, split and language),
which feature keys and image files its annotations name are missing, and (--verify) which feature records and
image headers are bad. Run it on a download before a long run:

  python -m checks.inventory --data-root DIR [--features F ...] [--images ROOT] [--json] [--verify]
  inventory(root, features=(), images=None) / verify(root, features=(), images=None)

Not on the reading path: the trainers' own start-up check is checks/preflight.py. M-CLIP's XTD10 / Multi30K sets
are listed by `python -m comparisons.mclip.xtd_data --data-root DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Iterable, Sequence

import data
from checks.preflight import image_problem, record_problem
from console import cli
from formats import iglue_layout, readers
from formats.bad_input import BadInput
from formats.features import SerializedRecords, feature_keys, is_serialized_lmdb, open_features, serialized_task
from formats.nlvr2_serialized import SerializedNLVR2


SERIALIZED_KINDS = {"xgqa": ("GQA (per-question)", "questions"), "marvl": ("NLVR2 (per-sentence)", "sentences")}


def _feature_keys(paths: Sequence[str]) -> tuple[set[str], list[str]]:
    keys, notes = set(), []
    for p in paths:
        if is_serialized_lmdb(p):
            what = SERIALIZED_KINDS[serialized_task(p)]
            notes.append(
                f"{p}: serialized {what[0]} LMDB ({len(SerializedRecords(p))} records; holds its own "
                f"{what[1]}, so annotation image ids are not checked against it)"
            )
            continue
        keys |= feature_keys(open_features(p))
    return keys, notes


def inventory(data_root, features: Sequence[str] = (), images=None) -> dict:
    """task -> split -> lang -> {"examples", "images", "missing"} (images: both of each marvl pair; translate-test
    splits get the suffix "_translate_test"); "missing" lists absent feature keys / image files (relative paths),
    or is None when neither features nor images were given. A file that fails to load gets {"error": message}."""
    ds = iglue_layout.dataset_dir(data_root)
    keys, notes = _feature_keys(features) if features else (None, [])
    out: dict = {}
    for task, split, lang, mt in _annotation_files(ds):
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
                ex.image_file for ex in distinct if not os.path.isfile(readers.image_path(images, ex.image_file, ex))
            )
        entry[lang] = {"examples": len(exs), "images": len(distinct), "missing": missing}
    if notes:
        out["notes"] = notes
    return out


def print_inventory(inv: dict) -> None:
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
            if serialized_task(path) == "marvl":  # NLVR2 pair records: each checked as the dataset reads it
                db = SerializedNLVR2(path)
                counts["feature records"] += len(db)
                bad += [problem for i in range(len(db)) if (problem := _pair_problem(db, i))]
            continue  # per-question GQA records: read by SerializedGQADataset, not checked here
        reader = open_features(path)
        for key in sorted(feature_keys(reader)):
            counts["feature records"] += 1
            if problem := record_problem(reader, key):
                bad.append(problem)
    seen: set[str] = set()
    for ex in _referenced_images(data_root) if images is not None else ():
        path = readers.image_path(images, ex.image_file)
        if path in seen or not os.path.isfile(path):  # missing files: the inventory's
            continue
        seen.add(path)
        counts["images"] += 1
        if problem := image_problem(path, ex):
            bad.append(problem)
    return bad, counts


def _pair_problem(db: SerializedNLVR2, i: int) -> str | None:
    try:
        db.pair(i)
    except BadInput as e:
        return str(e)
    return None


def _annotation_files(ds: Path) -> Iterable[tuple[str, str, str, bool]]:
    """(task, split, lang, translate_test) of every annotation file under the datasets folder ds."""
    for task in data.TASKS:
        for mt in (False, True):
            for split in iglue_layout.available_splits(ds, task, mt):
                for lang in iglue_layout.available_langs(ds, task, split, mt):
                    yield task, split, lang, mt


def _referenced_images(data_root) -> Iterable[data.Example]:
    """The first example of each image of every annotation file that loads (the inventory reports the others)."""
    ds = iglue_layout.dataset_dir(data_root)
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
        "feature keys / image files per task, split and language (M-CLIP's XTD10/ and multi30k-dataset/: "
        "python -m comparisons.mclip.xtd_data --data-root DIR)."
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
        help="folder holding datasets/ (an IGLUE checkout)",
    )
    p.add_argument(
        "--features", nargs="+", default=[], help="region-feature LMDB(s) / H5 file(s) to check keys against"
    )
    p.add_argument(
        "--images",
        default=None,
        help="images root (gqa/, flickr30k/, coco/, nlvr2/, marvl/, marvl_fewshot/ inside) to check files against",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    try:
        inv = inventory(args.data_root, args.features, args.images)
        if args.json:
            print(json.dumps(inv, indent=1, ensure_ascii=False))
        else:
            print_inventory(inv)
        return _print_verify(*verify(args.data_root, args.features, args.images)) if args.verify else 0
    except ValueError as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    sys.exit(cli.exit_quietly_on_broken_pipe(main))
