"""VOLTA's retrieval-negative sampling (UC2's xFlickr&CO training), reproduced draw for draw for parity, including
its quirks; and the sampling VOLTA meant ("corrected").

A UC2 retrieval training item is VOLTA's 4 pairs per caption: (image, caption), (image, a "random" caption),
(another image, caption), (image, a "hard" caption). data.UC2Dataset builds one RetrievalNegatives over its
training captions and draws each item's negatives from it by one of data.RETRIEVAL_NEGATIVES:

* "volta" (default; what IGLUE's UC2 numbers were trained with): VOLTA's RetrievalDataset exactly. It keeps,
  per image, the list 0..n-1 (n = captions on the image's annotation line) and uses an entry of it as an
  index into the *global* caption list, so both negative captions are always among the file's first n
  (Flickr30k: 5) captions, whatever image was drawn; the drawn image (random, or from the hard pool) only
  decides how many of those first captions are candidates. Pair 2 and 4 can therefore be the positive
  itself. The draws are VOLTA's calls in VOLTA's order on a python random.Random and a numpy RandomState
  (RetrievalNegatives.volta); VOLTA uses the global generators of each DataLoader worker, we seed both per
  (seed, epoch, index) (volta_rngs). Without a hard-negative pool, pair 4 is drawn as VOLTA's non-train
  branch does.
* "corrected": captions of the drawn images themselves (a random other image; a hard-pool image, an entry
  equal to the image itself skipped, else a random other image), so no pair is a false negative.

  RetrievalNegatives(examples, hard_negatives=None, negatives="volta")   .volta(py, nprs, img) / .corrected(rng, img)
  volta_rngs(seed, epoch, index)    the two generators VOLTA's sampler draws from, seeded per item
  load_hard_negatives(path)         VOLTA's hard_negative.pkl (read by the restricted unpickler)

Not on the reading path: data.UC2Dataset makes one call per retrieval training item.
"""

from __future__ import annotations

import os
import random
from typing import Sequence

import numpy as np

from formats.pickles import read_pickle


def volta_rngs(seed: int, epoch: int, index: int) -> tuple[random.Random, np.random.RandomState]:
    """The two generators VOLTA's sampler draws from (python's random, numpy's legacy RandomState), seeded per
    (seed, epoch, index) like every other dataset draw, never the global ones (exact resume, any worker count)."""
    py_seed, np_seed = np.random.SeedSequence([seed, epoch, index]).generate_state(2)
    return random.Random(int(py_seed)), np.random.RandomState(int(np_seed))


class RetrievalNegatives:
    """The captions of each image of a retrieval training split (examples: one per caption, in file order),
    VOLTA's per-image caption counts and the hard-negative pool (VOLTA's hard_negative.pkl: a path or its dict;
    None: no pool), and the draws of each item's negatives."""

    def __init__(self, examples: Sequence, hard_negatives: dict | str | os.PathLike | None = None, negatives="volta"):
        index_of: dict[str, int] = {}
        self.image_of: list[int] = []  # our image index of each caption
        self.captions_of: list[list[int]] = []  # caption indices of each image
        last_line: dict[int, str] = {}
        self.volta_count: list[int] = []  # VOLTA's len(imgid2entry[image]): captions on the image's last line
        for i, ex in enumerate(examples):
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
            if negatives == "volta":
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

    def volta(self, py: random.Random, nprs: np.random.RandomState, img: int) -> tuple[int, int, int, int, int]:
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

    def corrected(self, rng: np.random.Generator, img: int) -> tuple[int, int, int]:
        """(caption index of pair 2, image of pair 3, caption index of pair 4), none of them of image img."""
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
