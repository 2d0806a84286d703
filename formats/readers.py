"""Safe readers of downloaded text and image files: JSON and JSON lines with one-line errors naming file and
line, and images with a decompression-bomb guard, opened in photo formats only.

  read_json(path, annotations=True)   whole-file JSON (annotations: empty is an error); results/args files too
  read_jsonl(path) -> [(line number, object)]   JSON lines, blank lines skipped
  load_image(path) -> RGB image       refuses more than IMAGE_MAX_PIXELS before decoding; IMAGE_FORMATS only
Importing it sets PIL's own guards for every reader: Image.MAX_IMAGE_PIXELS = IMAGE_MAX_PIXELS, and
ImageFile.LOAD_TRUNCATED_IMAGES (a cut-off image body loads, its missing part grey, as in X2-VLM).

Not on the reading path: data.py's annotation loaders and datasets make single calls here (bad input is one
line, never a traceback; the other safe readers are pickles.py, torch_files.py and features.py).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, ImageFile

from formats.bad_input import BadInput

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
            f"{img.width * img.height:,} pixels; limit formats.readers.IMAGE_MAX_PIXELS = {IMAGE_MAX_PIXELS:,})"
        )
    with img:
        if img.mode == "RGB":
            img.load()
            return img
        return img.convert("RGB")
