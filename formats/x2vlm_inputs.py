"""X2-VLM's input preprocessing, as its fine-tuning datasets apply it: the image transforms (test: bicubic resize;
training: RandomResizedCrop, flip, RandomAugment) and the text cleaning of captions and questions.

  CLIP_MEAN / CLIP_STD              the Normalize of X2-VLM's transforms
  eval_pixels(img, res) / train_pixels(img, res, rng, flip) -> uint8 [res, res, 3]   what CCLM batches carry
  normalize_images(uint8 pixels [..., H, W, 3]) -> float32 [..., 3, H, W]   ToTensor + Normalize (the model calls it)
  eval_transform / train_transform(img, ...)   the two above composed: X2-VLM's test / train transform
  pre_caption / pre_question(text, max_words)   X2-VLM's text cleaning (dataset/utils.py)

Not on the reading path: data.py's CCLM datasets make single calls here (RandAugment itself:
x2vlm_randaugment.py; where the transforms are stated: docs/reference_facts.md#F-cclm-randaugment).
"""

from __future__ import annotations

import re

import numpy as np
import torch
from PIL import Image

from formats import x2vlm_randaugment

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------


def pixels(img: Image.Image) -> torch.Tensor:
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


def eval_pixels(img: Image.Image, res: int) -> torch.Tensor:
    return pixels(img.resize((res, res), Image.Resampling.BICUBIC))


def eval_transform(img: Image.Image, res: int = 384) -> torch.Tensor:
    """X2-VLM test transform: Resize((res, res)) bicubic (PIL, antialiased), ToTensor, CLIP Normalize."""
    return normalize_images(eval_pixels(img, res))


def train_pixels(img: Image.Image, res: int, rng: np.random.Generator, flip: bool) -> torch.Tensor:
    top, left, h, w = x2vlm_randaugment.random_resized_crop_box(rng, img.width, img.height)
    img = img.crop((left, top, left + w, top + h)).resize((res, res), Image.Resampling.BICUBIC)
    if flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return pixels(x2vlm_randaugment.random_augment(img, rng))


def train_transform(img: Image.Image, res: int, rng: np.random.Generator, flip: bool) -> torch.Tensor:
    """X2-VLM train transform: RandomResizedCrop(res, scale (0.5, 1)) bicubic, horizontal flip p=0.5 when
    `flip` (XVNLI, xFlickr&CO; xGQA flips before, in the dataset), RandomAugment(2, 7), ToTensor, Normalize."""
    return normalize_images(train_pixels(img, res, rng, flip))


# ----------------------------------------------------------------------------------------------
# Text cleaning
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
