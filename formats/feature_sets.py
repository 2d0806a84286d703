"""Several region-feature files read as one: UC2's --features (e.g. Flickr30k train + xFlickr&CO test features).

Not on the reading path: train_uc2.py opens its --features with `FeatureSet(paths)` after `split_features`
sorted out IGLUE's serialized LMDBs (GQA questions, NLVR2 pairs: training / dev sets of their own) and
`serialized_roles` told the training file from the dev one; the readers themselves are features.open_features'.
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

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


class SerializedDev(NamedTuple):
    """How a task's serialized dev file is told from its training file (named_dev) and evaluated."""

    split: str  # the --eval-split it is evaluated for
    words: tuple[str, ...]  # a dev file's name holds one of them
    noun: str  # what the messages call it
    data: str  # whose records
    train_name: str  # IGLUE's training file (UC2, 36 boxes)
    dev_name: str  # IGLUE's dev file


# From IGLUE's VOLTA config (iglue_trainval_tasks_{boxes36,X101}.yml): NLVR2 val_split dev, GQA val_split val (our xgqa
# split "valid": LXMERT's valid.json questions, the file IGLUE names gqa-valid_*.lmdb)
SERIALIZED_DEV = {
    "marvl": SerializedDev("dev", ("dev",), "dev", "NLVR2", "nlvr2-train_boxes36.lmdb", "nlvr2-dev_boxes36.lmdb"),
    "xgqa": SerializedDev(
        "valid", ("valid", "val"), "validation", "GQA", "gqa-train_boxes36.lmdb", "gqa-valid_boxes36.lmdb"
    ),
}


def named_dev(path: str, task: str = "marvl") -> bool:
    """True when the file's name holds one of the task's dev words between -, _, . or its ends, as IGLUE names its
    serialized dev files (nlvr2-dev_boxes36.lmdb, nlvr2-dev_X101.lmdb; gqa-valid_boxes36.lmdb); the records
    themselves do not say their split."""
    return bool(set(SERIALIZED_DEV[task].words) & set(re.split(r"[-_.]", os.path.basename(os.path.normpath(path)))))


def serialized_roles(task: str, serialized: list[str], training: bool = True) -> tuple[str | None, str | None]:
    """(training file, dev file) among --features' serialized LMDBs (None: not given). marvl and xgqa (our choice,
    docs/data.md): the training file and at most one dev file (xgqa: the validation file), told apart by name alone
    (named_dev): the file named "dev" (xgqa: "valid" / "val") is the dev set, the other the training set; anything
    else is a one-line error. training=False (an evaluation): the dev file may come alone."""
    given, dev_of = " ".join(serialized), SERIALIZED_DEV.get(task)
    if not serialized:
        return None, None
    if dev_of is None or len(serialized) > 2:
        if len(serialized) > 1:
            also = f" and at most the {dev_of.noun} one ({dev_of.dev_name.split('_')[0]}_*.lmdb)" if dev_of else ""
            raise SystemExit(f"error: several serialized LMDBs given ({given}); give the training one{also}")
        return serialized[0], None
    dev = [p for p in serialized if named_dev(p, task)]
    train = [p for p in serialized if p not in dev]
    if len(train) > 1 or len(dev) > 1 or (training and not train):
        what = {0: f"two training files (neither is named {' or '.join(dev_of.words)})", 2: f"two {dev_of.noun} files"}
        raise SystemExit(
            f"error: --features {given}: {what.get(len(dev), f'a {dev_of.noun} file and no training file')}; "
            f"serialized {dev_of.data} files are told apart by name, as IGLUE names them: the training file "
            f"({dev_of.train_name}) and at most one {dev_of.noun} file ({dev_of.dev_name})"
        )
    return (train[0] if train else None), (dev[0] if dev else None)
