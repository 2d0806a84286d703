"""Several region-feature files read as one: UC2's --features (e.g. Flickr30k train + xFlickr&CO test features).

Not on the reading path: train_uc2.py opens its --features with `FeatureSet(paths)` after `split_features`
sorted out IGLUE's serialized LMDBs (GQA questions, NLVR2 pairs: training / dev sets of their own) and
`serialized_roles` told the training file from the dev one; the readers themselves are features.open_features'.
"""

from __future__ import annotations

import os
import re

import torch

from formats import features


class FeatureSet:
    """Several image-keyed readers (features.open_features) searched in order, e.g. Flickr30k train +
    xFlickr&CO test features. The per-image reader methods (get, kept_regions, regions) go to the reader
    holding the key."""

    def __init__(self, paths: list[str]):
        self.readers = [features.open_features(p) for p in paths]
        self.path = ", ".join(paths)
        for r in self.readers:  # open each now: an unreadable file is an error here, not in the first batch
            features.feature_keys(r)

    def keys(self) -> set[str]:
        return set().union(*(r.keys() for r in self.readers))

    def __contains__(self, key) -> bool:
        return any(key in r for r in self.readers)

    def _reader_for(self, key):
        for r in self.readers:
            if key in r:
                return r
        raise KeyError(key)

    def get(self, key, max_rows: int | None = None) -> tuple:  # (features, boxes, img_w, img_h)
        return self._reader_for(key).get(key, max_rows)

    def kept_regions(self, key, max_regions: int) -> tuple:  # (features, locations)
        return self._reader_for(key).kept_regions(key, max_regions)

    def regions(self, key, max_regions: int) -> dict[str, torch.Tensor]:
        return self._reader_for(key).regions(key, max_regions)


def split_features(paths: list[str]) -> tuple[list[str], list[str]]:
    """--features: (serialized GQA / NLVR2 LMDBs, image-keyed files); a missing path is a one-line error."""
    for p in paths:
        if not os.path.exists(p):
            raise SystemExit(f"error: --features {p} does not exist")
    serialized = [p for p in paths if features.is_serialized_lmdb(p)]
    return serialized, [p for p in paths if p not in serialized]


DEV_WORD = "dev"  # IGLUE's VOLTA config (iglue_trainval_tasks_*.yml): nlvr2-train_boxes36.lmdb, nlvr2-dev_boxes36.lmdb


def named_dev(path: str) -> bool:
    """True when the file's name holds the word "dev" between -, _, . or its ends, as IGLUE names its serialized NLVR2
    dev file (nlvr2-dev_boxes36.lmdb, nlvr2-dev_X101.lmdb); the records themselves do not say their split."""
    return DEV_WORD in re.split(r"[-_.]", os.path.basename(os.path.normpath(path)))


def serialized_roles(task: str, serialized: list[str]) -> tuple[str | None, str | None]:
    """(training file, dev file) among --features' serialized LMDBs (None: not given). xgqa: one file, the training
    set. marvl (our choice, docs/data.md): the training file and at most one dev file, told apart by name alone
    (named_dev): the file named "dev" is the dev set, the other the training set; anything else is a one-line error."""
    given = " ".join(serialized)
    if not serialized:
        return None, None
    if task != "marvl" or len(serialized) > 2:
        if len(serialized) > 1:
            raise SystemExit(
                f"error: several serialized LMDBs given ({given}); give the training one"
                + (" and at most the dev one (nlvr2-dev_*.lmdb)" if task == "marvl" else "")
            )
        return serialized[0], None
    dev = [p for p in serialized if named_dev(p)]
    train = [p for p in serialized if p not in dev]
    if len(train) != 1 or len(dev) > 1:
        what = {
            0: "two training files (neither is named dev)",
            1: "a dev file and no training file",
            2: "two dev files",
        }
        raise SystemExit(
            f"error: --features {given}: {what[len(dev)]}; serialized NLVR2 files are told apart by name, as IGLUE "
            "names them: the training file (nlvr2-train_boxes36.lmdb) and at most one dev file (nlvr2-dev_boxes36.lmdb)"
        )
    return train[0], (dev[0] if dev else None)
