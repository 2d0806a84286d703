"""Safe readers of downloaded text and image files: JSON and JSON lines with one-line errors naming file and
line; images with a decompression-bomb guard, opened in photo formats only, from paths that stay inside the
images root whatever an annotation file names.

  read_json(path, annotations=True)   whole-file JSON (annotations: empty is an error); results/args files too
  read_jsonl(path) -> [(line number, object)]   JSON lines, blank lines skipped
  open_photo(path) -> PIL image (header read, not decoded)   IMAGE_FORMATS only, IMAGE_MAX_PIXELS at most: the ONE
                                    way our code opens an image file (the loaders, the pre-check, --verify)
  load_image(path) -> RGB image       open_photo, decoded
  image_path(images, rel, ex=None)  an annotation's image file under the images root, never outside it
  open_image(images, ex)            load_image of an Example's image; failures are one BadInput line naming it
Importing it sets PIL's own guards for every reader: Image.MAX_IMAGE_PIXELS = IMAGE_MAX_PIXELS, and
ImageFile.LOAD_TRUNCATED_IMAGES (a cut-off image body loads, its missing part grey, as in X2-VLM).

Not on the reading path: data.py's annotation loaders and datasets make single calls here (bad input is one
line, never a traceback; the other safe readers are pickles.py, torch_files.py and features.py).
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from formats.bad_input import BadInput

ImageFile.LOAD_TRUNCATED_IMAGES = True  # as the X2-VLM loaders do
# Decompression-bomb guard: a sub-MB PNG can declare 30,000 x 30,000 pixels (GBs once decoded). load_image
# refuses anything above this many pixels before decoding; PIL's own check stays on as a backstop for other
# readers (it warns above the limit and refuses above twice it). Real inputs are far below: COCO images are at
# most 640 px a side, Flickr30k's at most 500 px, GQA's Visual Genome images are web-sized photos.
IMAGE_MAX_PIXELS = 40_000_000
Image.MAX_IMAGE_PIXELS = IMAGE_MAX_PIXELS
# The formats our images come in, and only those are parsed: Flickr30k, COCO and GQA's Visual Genome images (every
# IGLUE task read here, and M-CLIP's XTD10 / Multi30K) are JPEG; PNG for images written by tools (the synthetic
# world, tests). No loader needs another one (WebP, GIF, BMP, TIFF: none of these datasets ships them), and PIL
# would hand an EPS file to Ghostscript (an external program) and parses ~40 other formats with their own code.
IMAGE_FORMATS = ("JPEG", "PNG")  # JPEG includes multi-picture (MPO) files


def _decode_utf8(raw: bytes, path, line: int | None = None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        n = line if line is not None else raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1)
        raise BadInput(
            f"{path}:{n}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {col + 1}); the file must be UTF-8 encoded"
        ) from None


def _unreadable_json(text: str, path, e: Exception, line: int | None = None) -> str:
    """The one-line reason valid JSON could not be read, naming file and line: nesting deeper than Python's
    recursion allows (RecursionError), or an integer of more digits than Python converts (ValueError)."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)  # strings blanked (they hold no newline, bracket or number)
    limit = sys.get_int_max_str_digits()
    if isinstance(e, RecursionError):  # the line where the nesting is deepest
        depth, at = _deepest(bare.encode())
        where = line or bare.encode().count(b"\n", 0, at) + 1
        return f"{path}:{where}: JSON nested too deeply to read ({depth:,} levels)"
    if limit and (found := re.search(rf"\d{{{limit + 1},}}", bare)):
        where = line or bare.count("\n", 0, found.start()) + 1
        return f"{path}:{where}: a number of {len(found.group()):,} digits (more than the {limit:,} Python reads)"
    return f"{path}{f':{line}' if line else ''}: JSON that cannot be read ({type(e).__name__}: {str(e)[:160]})"


def _deepest(raw: bytes, chunk: int = 1 << 24) -> tuple[int, int]:
    """(deepest bracket nesting, its byte offset) of JSON text whose strings are blanked, in bounded memory."""
    step = np.zeros(256, dtype=np.int8)
    step[[ord("["), ord("{")]], step[[ord("]"), ord("}")]] = 1, -1
    best, at, base = 0, 0, 0
    for start in range(0, len(raw), chunk):
        depth = base + np.cumsum(
            step[np.frombuffer(raw, np.uint8, min(chunk, len(raw) - start), start)], dtype=np.int64
        )
        i = int(np.argmax(depth))
        if depth[i] > best:
            best, at = int(depth[i]), start + i
        base = int(depth[-1])
    return best, at


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
    except (RecursionError, ValueError) as e:  # nested too deeply; an integer of more digits than Python reads
        raise ValueError(_unreadable_json(text, path, e)) from None
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
            except (RecursionError, ValueError) as e:
                raise ValueError(_unreadable_json(line, path, e, n)) from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object per line, got {type(obj).__name__}")
            out.append((n, obj))
    if not out:
        raise ValueError(f"{path}: annotation file is empty")
    return out


def _other_format(path) -> str:
    """The name of the format whose signature the file's first bytes carry (PIL's byte-prefix tests only: nothing
    is parsed), or "" when none does."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return ""
    Image.init()
    for name, (_, accept) in Image.OPEN.items():
        try:
            if name not in IMAGE_FORMATS and accept is not None and accept(head):
                return name
        except Exception:  # noqa: BLE001, S112 - a prefix test that needs more bytes: not this format
            continue
    return ""


def open_photo(path: str | os.PathLike) -> Image.Image:
    """The file opened as an image (its header read, pixels not decoded) in one of IMAGE_FORMATS only: a file in
    another format (an EPS named .jpg) is an UnidentifiedImageError saying which format its header is, never
    parsed. More than IMAGE_MAX_PIXELS pixels is a ValueError naming the file. The one way our code opens an
    image: load_image (the loaders), checks.preflight.image_problem (the pre-check, checks.inventory --verify)."""
    with warnings.catch_warnings():  # PIL warns above its limit (ours) and refuses above twice it
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(path, formats=IMAGE_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ValueError(f"image file {path}: refused as a decompression bomb ({e})") from None
        except UnidentifiedImageError:
            if not (other := _other_format(path)):
                raise
            raise UnidentifiedImageError(
                f"cannot identify image file as {' or '.join(IMAGE_FORMATS)}: its header is {other}'s, a format "
                "that is never parsed"
            ) from None
    if img.width * img.height > IMAGE_MAX_PIXELS:
        img.close()
        raise ValueError(
            f"image file {path}: refused as a decompression bomb ({img.width} x {img.height} = "
            f"{img.width * img.height:,} pixels; limit formats.readers.IMAGE_MAX_PIXELS = {IMAGE_MAX_PIXELS:,})"
        )
    return img


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decoded RGB image (open_photo + convert("RGB"); already-RGB files skip the copy convert makes).
    An image of more than IMAGE_MAX_PIXELS pixels is a ValueError naming the file, raised before decoding."""
    img = open_photo(path)
    with img:
        if img.mode == "RGB":
            img.load()
            return img
        return img.convert("RGB")


def image_path(images, rel: str, ex=None) -> str:
    """<images root>/<subfolder>/<name> for an Example's image_file "<subfolder>/<name>" (images: the root, or
    {subfolder: folder}; the layout is data.py's). The name comes from the annotation file, so it must stay
    inside its subfolder: absolute names and ".." that climb out are an error naming the annotation line.
    (Resolved lexically: folders or files the user symlinked in are read where they point.)"""
    if images is None:
        raise ValueError("an images root is required for CCLM (give --images)")
    sub, _, name = rel.partition("/")
    folder = images[sub] if isinstance(images, dict) else os.path.join(str(images), sub)
    clean = os.path.normpath(name) if name and "\0" not in name else ""
    if not clean or os.path.isabs(clean) or clean == "." or clean.split(os.sep)[0] == "..":
        where = f" (referenced by {ex.source}, example {ex.id})" if ex is not None else ""
        raise ValueError(f"image path {name!r} is not a file inside the image folder {folder}{where}")
    return os.path.join(folder, clean)


def open_image(images, ex) -> Image.Image:
    """load_image of an Example's image file (image_path); every failure is one BadInput line naming the file
    and the annotation line (ex.source, ex.id) that referenced it."""
    path = image_path(images, ex.image_file, ex)
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
