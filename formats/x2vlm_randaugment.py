"""X2-VLM's training augmentation reproduced for parity: torchvision's RandomResizedCrop box draw and X2-VLM's
RandomAugment(2, 7) with its 10 ops, driven by a numpy Generator (data.py seeds it per (seed, epoch, index)).

Not on the reading path: data.train_pixels calls random_resized_crop_box and random_augment. Where we
differ from the reference (its AutoContrast wrap-around bug, unclipped Sharpness):
docs/reference_facts.md#F-cclm-randaugment.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image


def random_resized_crop_box(
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
# geometric ops with PIL's bilinear affine mapping the pixels cv2.warpAffine maps (the reference's), whose
# interpolation rounds differently (+-2 levels, and the pixels along the fill border: docs/choices.md).
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


def random_augment(img: Image.Image, rng: np.random.Generator) -> Image.Image:
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
            # cv2 maps pixel indices, PIL pixel centres (index + 0.5): the + s/2 term makes PIL's map cv2's
            # (without it every row is shifted by s/2 pixel: tests/test_train_step_parity.py)
            data = (1, -s, s / 2, 0, 1, 0) if name == "ShearX" else (1, 0, 0, -s, 1, s / 2)
        elif name in ("TranslateX", "TranslateY"):
            t = mag * 10.0 * (-1 if rng.random() > 0.5 else 1)  # translate_const 10 pixels
            data = (1, 0, t, 0, 1, 0) if name == "TranslateX" else (1, 0, 0, 0, 1, t)
        else:  # Rotate
            deg = mag * 30 * (-1 if rng.random() < 0.5 else 1)
            centre = (img.width / 2 + 0.5, img.height / 2 + 0.5)  # cv2's centre (W/2, H/2) in pixel indices
            img = img.rotate(deg, resample=Image.Resampling.BILINEAR, center=centre, fillcolor=_AUG_FILL)
            continue
        img = img.transform(
            img.size, Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR, fillcolor=_AUG_FILL
        )
    return img
