"""Several region-feature files read as one: UC2's --features (e.g. Flickr30k train + xFlickr&CO test features).

Not on the reading path: train_uc2.py opens its --features with `FeatureSet(paths)` after `split_features`
sorted out IGLUE's serialized LMDBs (GQA questions, NLVR2 pairs: training / dev sets of their own); the readers
themselves are features.open_features'.
"""

from __future__ import annotations

import os

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
