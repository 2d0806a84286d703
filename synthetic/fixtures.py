"""Fixture writers of the synthetic world and the tests: region features in the real h5_to_lmdb.py format,
image files, and small XLM-R-style tokenizers, all seeded.

Not on the reading path: nothing in a training run writes data; synthetic/world.py, the tests and the benches do.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

import data
from formats import tokenizer_check
from formats.features import FEATURE_DIM


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
    tokenizer_check.check_special_ids(fast, "tiny")
    return fast


def save_xlmr_style_tokenizer(tok, out_dir: str | Path):
    """A `tokenizers` Tokenizer whose vocabulary starts with <s> <pad> </s> <unk> <mask>, given XLM-R's template
    (<s> A </s>, <s> A </s> </s> B </s>) and special tokens, saved as a PreTrainedTokenizerFast folder that
    load_tokenizer(out_dir) loads (the tiny test tokenizer and the synthetic world's word-level one)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", data.BOS_ID), ("</s>", data.EOS_ID)],
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
