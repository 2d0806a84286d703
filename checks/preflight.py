"""The trainers' pre-flight check: before any compute is spent, every feature key / image file the annotations
name exists, and a spread sample of feature records / image headers decodes.

  check_inputs(examples, features=None, images=None, sample=0)   one-line ValueError naming the first missing
                                    feature key / image file, its annotation line and the count; sample: decode
                                    that many records / image headers too (None: all), BadInput naming the first
                                    bad one and the count
  VERIFY_SAMPLE                     how many distinct training images the trainers decode at start-up
  record_problem(reader, key, ex) / image_problem(path, ex)   None, or the one-line reason a record / image is bad

Not on the reading path: the trainers make one call (check_inputs). `python -m checks.inventory` lists every
missing and bad one.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

import data
from formats import readers
from formats.bad_input import BadInput
from formats.features import as_reader, feature_keys, missing_feature_error, read_record, referenced


def check_inputs(examples: Sequence[data.Example], *, features=None, images=None, sample: int | None = 0) -> None:
    """Fail fast, before any training: ValueError naming the first example whose region features (key not in
    `features`, a reader/path/FeatureSet) or image file (under `images`) is missing, with its annotation
    line and how many distinct images are missing (`python -m checks.inventory ... --features/--images` lists them).
    sample: also decode that many distinct records / image headers (None: all; 0: none), BadInput naming the
    first bad one and the count (`python -m checks.inventory --verify` lists every one)."""
    reader = as_reader(features) if features is not None else None
    if images is not None:  # every example's own path (two may share an image key but name different files)
        for ex in examples:
            readers.image_path(images, ex.image_file, ex)
    if reader is not None:
        feature_keys(reader)  # a keys entry that does not decode: one line naming the file
    distinct = data.distinct_images(examples)
    missing = []
    for ex in distinct:
        if reader is not None and ex.image not in reader:
            missing.append(str(missing_feature_error(ex.image, ex, reader.path)))
        elif images is not None and not os.path.isfile(path := readers.image_path(images, ex.image_file, ex)):
            missing.append(f"image file {path} not found (referenced by {ex.source}, example {ex.id})")
    if missing:
        raise ValueError(f"{missing[0]}; {len(missing)} of {len(distinct)} images missing")
    if sample != 0 and (reader is not None or images is not None):
        chosen = _spread(distinct, sample)
        bad = [
            problem
            for ex in chosen
            if (
                problem := record_problem(reader, ex.image, ex)
                if reader is not None
                else image_problem(readers.image_path(images, ex.image_file), ex)
            )
        ]
        if bad:
            raise BadInput(
                f"{bad[0]}; {len(bad)} of {len(chosen)} {'feature records' if reader else 'images'} "
                f"checked are bad (python -m checks.inventory --verify lists them all)"
            )


# Start-up check of the trainers: distinct training images decoded (a spread sample; all for evaluation).
VERIFY_SAMPLE = 1000


def _spread(items: Sequence, sample: int | None) -> Sequence:
    """All items (sample None or >= len), else `sample` of them evenly spread (no random state touched)."""
    if sample is None or sample >= len(items):
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, sample).round().astype(int)]


def record_problem(reader, key: str, ex: data.Example | None = None) -> str | None:
    """None if the feature record decodes (shape, dtype, sizes) to finite values, else a one-line reason."""
    try:
        feats, boxes, _, _ = read_record(reader, key, ex, "get")
    except BadInput as e:
        return str(e)
    if not (np.isfinite(feats).all() and np.isfinite(boxes).all()):
        return f"{reader.path}: feature record {key!r} holds NaN or inf values{referenced(ex)}"
    return None


def image_problem(path: str, ex: data.Example | None = None) -> str | None:
    """None if the file's header reads as an image of positive size within the pixel cap, in one of the formats the
    loaders read (formats.readers.open_photo, as they open it), else a reason. (The pixels are not decoded: a
    cut-off body still loads, grey, as in X2-VLM.)"""
    try:
        with readers.open_photo(path) as img:
            fmt, (w, h) = img.format, img.size
    except FileNotFoundError:
        return f"image file {path} not found{referenced(ex)}"
    except ValueError as e:  # open_photo's own one-line refusal (a decompression bomb)
        return f"{e}{referenced(ex)}"
    except Exception as e:  # noqa: BLE001 - PIL raises many types for damaged headers
        reason = str(e).replace(f"'{path}'", "").replace(str(path), "").strip(" :")
        return f"image file {path} is corrupt or not an image ({type(e).__name__}: {reason}){referenced(ex)}"
    cap = readers.IMAGE_MAX_PIXELS
    if fmt is None or w < 1 or h < 1 or (cap and w * h > cap):
        return f"image file {path}: {fmt} image of {w}x{h} pixels is empty or over the {cap} pixel cap{referenced(ex)}"
    return None
