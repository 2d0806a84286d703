"""IGLUE's NLVR2 training and dev features for UC2 (`nlvr2-train_boxes36.lmdb`, `nlvr2-dev_boxes36.lmdb`; VOLTA
task format 'serialized_lmdb'): a tensorpack LMDBSerializer file of one record per NLVR2 sentence, holding the
sentence, its label and both images' region features, read by VOLTA's NLVR2Loader (volta/datasets/nlvr2_dataset.py).

  SerializedNLVR2(path).pair(i, max_regions) -> dict   record i checked: {"key", "id", "text", "label" (1 true,
                                    0 false), "gold", "image", "image2", "regions" [(features, locations) left, right]}
  SerializedNLVR2(path).check(sample)   a spread sample of records checked (None: all); BadInput naming the first bad
                                    one and how many were bad

Record fields (those VOLTA's BertPreprocessBatch.__call__ reads; others are ignored): `features_0` / `features_1`
([N, 2048] float arrays, or base64 float32 bytes as in the X101 files), `boxes_0` / `boxes_1` ([N, 4] pixels),
`img_w_0`, `img_h_0`, `img_w_1`, `img_h_1`, `img_id_0` / `img_id_1` (the left / right image's id, its feature key),
`sentence`, `labels` ([0] or [1]: VOLTA scatters them into the [2] target), `scores` ([1.0]), `question_id`.
VOLTA takes the sentence and label from the record, never from an annotation file; so does this reader. The
example id is the record's `id` (the NLVR2 identifier, kept by VOLTA's _load_dataset entries) when it has one, else
its `question_id` (the conversion script is not public; our choice, docs/choices.md).

Every bad record is a one-line BadInput naming the file and the record key: a missing field, features of another
width, NaN / inf values, boxes beyond the image, a label that is not boolean-like, both images with one id.
Not on the reading path: data.SerializedNLVR2Dataset reads records through pair().
"""

from __future__ import annotations

import numpy as np

from formats import annotation_fields
from formats.bad_input import BadInput
from formats.features import SerializedRecords, _record_arrays, box_locations
from formats.pickles import short_repr

IMAGE_FIELDS = ("features", "boxes", "img_w", "img_h", "img_id")
FIELDS = tuple(f"{f}_{side}" for side in (0, 1) for f in IMAGE_FIELDS) + ("sentence", "labels", "scores", "question_id")
SIDES = ((0, "left"), (1, "right"))
START_CHECK = 1000  # records checked when a dataset opens the file (a spread sample), as checks.preflight.VERIFY_SAMPLE


def _boolean_like(value) -> bool:
    return isinstance(value, (bool, int, np.integer, np.bool_)) and int(value) in (0, 1)


def _one(value) -> list:
    """A one-element list (msgpack: a list; msgpack_numpy: a 1-element array), else []."""
    if isinstance(value, np.ndarray) and value.shape == (1,):
        return [value[0]]
    return list(value) if isinstance(value, (list, tuple)) and len(value) == 1 else []


class SerializedNLVR2(SerializedRecords):
    """IGLUE's serialized NLVR2 LMDB (see the module docstring); record i = the i-th key in LMDB order."""

    def pair(self, i: int, max_regions: int | None = None) -> dict:
        rec = self.record(i)
        where = f"{self.path}: record {rec['key']!r}"
        missing = [f for f in FIELDS if f not in rec]
        if missing:
            raise BadInput(f"{where}: no field {missing[0]!r} (an NLVR2 pair record has {', '.join(FIELDS)})")
        try:
            ids = [annotation_fields.ident(rec[f"img_id_{side}"], where, f"img_id_{side}") for side in (0, 1)]
            text = annotation_fields.text(rec["sentence"], where, "sentence")
            ex_id = annotation_fields.ident(
                rec.get("id", rec["question_id"]), where, "id" if "id" in rec else "question_id"
            )
        except ValueError as e:
            raise BadInput(str(e)) from None
        label, score = _one(rec["labels"]), _one(rec["scores"])
        if not label or not _boolean_like(label[0]):
            raise BadInput(f"{where}: labels is {short_repr(rec['labels'], 60)}; expected [0] or [1] (false / true)")
        if score != [1.0]:
            raise BadInput(
                f"{where}: scores is {short_repr(rec['scores'], 60)}; expected [1.0] (one gold label a sentence)"
            )
        if ids[0] == ids[1]:
            raise BadInput(f"{where}: img_id_0 and img_id_1 are both {ids[0]!r}; a pair needs two images")
        regions = []
        for side, name in SIDES:
            item = {f: rec[f"{f}_{side}"] for f in IMAGE_FIELDS[:4]}
            at = f"{where} ({name} image, the *_{side} fields)"
            feats, boxes, w, h = _record_arrays(self.path, rec["key"], item, slice(None), where=at)
            if not (np.isfinite(feats).all() and np.isfinite(boxes).all()):
                raise BadInput(f"{at}: holds NaN or inf values")
            n = len(feats) if max_regions is None else min(len(feats), max_regions)
            regions.append((feats[:n], box_locations(boxes[:n], w, h)))
        out = {"key": rec["key"], "id": ex_id, "text": text, "label": int(label[0]), "image": ids[0]}
        return {**out, "gold": "True" if out["label"] else "False", "image2": ids[1], "regions": regions}

    def check(self, sample: int | None = START_CHECK) -> None:
        """Decode and check a spread sample of records (None: every one); the first bad one is a BadInput."""
        n = len(self)
        rows = range(n) if sample is None or sample >= n else np.linspace(0, n - 1, sample).round().astype(int)
        bad = []
        for i in rows:
            try:
                self.pair(int(i))
            except BadInput as e:
                bad.append(str(e))
        if bad:
            raise BadInput(f"{bad[0]}; {len(bad)} of {len(rows)} records checked are bad")
