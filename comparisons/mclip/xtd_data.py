"""Translation retrieval sets of the M-CLIP comparison (train_mclip.py): XTD10 and Multi30K with PECTVLM's
machine translations, their splits, and their inventory (`python -m comparisons.mclip.xtd_data --data-root DIR`).

Not on the reading path: only the Multilingual-CLIP + PET comparison reads these sets.

  RetrievalSplit(images, texts)     images + {text kind: {lang: one caption per image}}; kinds native, from_en
                                    (English captions MT into lang), to_en (lang's captions MT into English)
  load_xtd(root, langs) / xtd_splits(full, n_shot, seed)   XTD10 and run_XTD.py's 50 / 50 / 900 split
  load_multi30k(root, split, langs, task) / multi30k_splits(root, langs, n_shot, seed, task)   Multi30K task 1
                                    (translations) or task 2 (independent descriptions; the reference's first of 5)
  read_lines(path, expect)          caption file lines; one-line ValueError naming file:line
  inventory(data_root)              XTD10/ and multi30k-dataset/ under data_root: examples and images per split,
                                    text kind and language (the IGLUE inventory's format: checks/inventory.py)
  XTD_LANGS, MULTI30K_LANGS, MULTI30K_SPLITS, MULTI30K_TASK2_LANGS, MULTI30K_TASK2_SPLITS
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from checks.inventory import print_inventory
from console import cli

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
# Multi30K task 2 (independent descriptions, 5 per image, English and German; multi30k/dataset data/task2/) as
# PECTVLM's load_datasets.FILE_PARH_TASK2 reads it: split -> (image list, caption file stem); the captions of
# description d are <stem>.<d>.<lang> in raw/, translated_from_en/, translated_to_en/ (as task 1's folders).
MULTI30K_TASK2_LANGS = ("en", "de")
MULTI30K_TASK2_SPLITS = {
    "train": ("train_images", "train"),
    "val": ("val_images", "val"),
    "test": ("test_2016_images", "test_2016"),
}
# load_file_task2(split, idx=1): every caller leaves idx at 1, so the reference trains and tests on the first of
# the five descriptions of each image (run_choose_pet_task2.py, run_mono_task2.py).
MULTI30K_TASK2_DESCRIPTION = 1


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
        gz = path.with_name(path.name + ".gz")  # multi30k/dataset ships its caption files gzipped
        hint = f" ({gz.name} is: gunzip it, the reference reads plain text)" if gz.is_file() else ""
        raise ValueError(f"{path}: file not found{hint}")
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


def load_multi30k(
    root: str | os.PathLike,
    split: str,
    langs: Sequence[str] = MULTI30K_LANGS,
    task: int = 1,
    description: int = MULTI30K_TASK2_DESCRIPTION,
) -> RetrievalSplit:
    """Multi30K task 1 in PECTVLM's layout under data/task1/: image_splits/<split>.txt, raw/<split>.<lang> and
    translated_from_en/<split>.<lang>, translated_to_en/<split>.<lang>; images are flickr30k-images/<name>.
    task 2: data/task2/image_splits/<split>_images.txt and <folder>/<stem>.<description>.<lang> (see
    MULTI30K_TASK2_SPLITS), one description per image as the reference loads it."""
    if task == 2:
        return _load_multi30k_task2(Path(root) / "data" / "task2", split, langs, description)
    base = Path(root) / "data" / "task1"
    name = MULTI30K_SPLITS[split]
    images = [f"flickr30k-images/{n}" for n in read_lines(base / "image_splits" / f"{name}.txt")]
    texts = {k: {l: read_lines(base / d / f"{name}.{l}", len(images)) for l in langs} for k, d in MULTI30K_DIRS.items()}
    return RetrievalSplit(images, texts)


def _load_multi30k_task2(base: Path, split: str, langs: Sequence[str], description: int) -> RetrievalSplit:
    image_list, stem = MULTI30K_TASK2_SPLITS[split]
    if not 1 <= description <= 5:
        raise ValueError(f"Multi30K task 2 has descriptions 1..5 per image, not {description}")
    images = [f"flickr30k-images/{n}" for n in read_lines(base / "image_splits" / f"{image_list}.txt")]
    texts = {
        k: {l: read_lines(base / d / f"{stem}.{description}.{l}", len(images)) for l in langs}
        for k, d in MULTI30K_DIRS.items()
    }
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


def multi30k_splits(
    root, langs: Sequence[str], n_shot: int | None, seed: int, task: int = 1
) -> dict[str, RetrievalSplit]:
    """train / val / test_2016_flickr (task 2: test_2016); with n_shot, train is subsampled as PECTVLM's
    load_file_from_task (first n of a permutation by torch.Generator(seed)). Our choice: val stays whole (reference
    silent for task 1; run_choose_pet_task2.py keeps val and test whole)."""
    splits = {s: load_multi30k(root, s, langs, task) for s in MULTI30K_SPLITS}
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
    tasks = [("", "task1", {s: (f, f) for s, f in MULTI30K_SPLITS.items()})]
    if (root / "data" / "task2").is_dir():  # task 2's splits as "task2_<split>", its first description
        tasks.append(("task2_", "task2", MULTI30K_TASK2_SPLITS))
    for prefix, task, splits in tasks:
        base = root / "data" / task
        for split, (image_list, stem) in splits.items():
            stem += f".{MULTI30K_TASK2_DESCRIPTION}" if prefix else ""
            try:
                images = [f"flickr30k-images/{n}" for n in read_lines(base / "image_splits" / f"{image_list}.txt")]
            except ValueError as e:
                out[prefix + split] = {"*": {"error": str(e)}}
                continue
            for kind, folder in MULTI30K_DIRS.items():
                for path in sorted((base / folder).glob(f"{stem}.*")):
                    lang = path.name[len(stem) + 1 :]
                    if lang.endswith(".gz"):
                        continue
                    out.setdefault(_suffixed(prefix + split, kind), {})[lang] = _retrieval_entry(path, images)
    return out


def retrieval_set_roots(data_root) -> dict[str, Path]:
    """{"xtd10" / "multi30k": folder} of the translation retrieval sets present under data_root."""
    root = Path(data_root)
    return {name: root / d for name, d in RETRIEVAL_SET_DIRS.items() if (root / d).is_dir()}


def inventory(data_root) -> dict:
    """{"xtd10" / "multi30k": retrieval_set_inventory} of the sets under data_root ("missing" None: their images
    are train_mclip.py features' to check); a ValueError when neither folder is there."""
    found = retrieval_set_roots(data_root)
    if not found:
        dirs = " or ".join(f"{d}/" for d in RETRIEVAL_SET_DIRS.values())
        raise ValueError(f"data root {data_root}: no {dirs} inside (mclip.mk's XTD / MULTI30K folders)")
    return {name: retrieval_set_inventory(name, root) for name, root in found.items()}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Inventory of M-CLIP's translation retrieval sets: examples and images per split, text kind "
        "and language of XTD10/ and multi30k-dataset/ under --data-root (IGLUE's: python -m checks.inventory)."
    )
    p.add_argument("--data-root", required=True, help="folder holding XTD10/ and/or multi30k-dataset/")
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    try:
        inv = inventory(args.data_root)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if args.json:
        print(json.dumps(inv, indent=1, ensure_ascii=False))
    else:
        print_inventory(inv)
    return 0


if __name__ == "__main__":
    sys.exit(cli.exit_quietly_on_broken_pipe(main))
