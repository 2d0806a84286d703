"""Writes tensorpack LMDBSerializer files (VOLTA's 'serialized_lmdb' format) byte for byte as tensorpack 0.9.4 with
msgpack_numpy 0.4.x does, for the tests' serialized NLVR2 LMDBs (tests/test_data.py checks the encoder against the
GQA fixture that tensorpack itself wrote, tests/fixtures/features/gqa_serialized_fixture.lmdb)."""

from __future__ import annotations

import base64
from pathlib import Path

import msgpack
import numpy as np

from formats.features import open_features


def _msgpack_numpy(obj):
    # msgpack_numpy.encode: arrays as {b"nd": True, b"type", b"kind", b"shape", b"data"}, numpy scalars as
    # {b"nd": False, b"type", b"data"}
    if isinstance(obj, np.ndarray):
        return {b"nd": True, b"type": obj.dtype.str, b"kind": b"", b"shape": obj.shape, b"data": obj.tobytes()}
    if isinstance(obj, (np.bool_, np.number)):
        return {b"nd": False, b"type": obj.dtype.str, b"data": obj.tobytes()}
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def dumps(obj) -> bytes:
    """tensorpack.utils.serialize.dumps (msgpack, use_bin_type, msgpack_numpy patched in)."""
    return msgpack.packb(obj, use_bin_type=True, default=_msgpack_numpy)


def write_serialized(path: Path, records: list, raw: dict | None = None) -> Path:
    """LMDBSerializer.save: record i under b"%08d", then `__keys__`; raw: {index: bytes} stored as they are."""
    import lmdb

    env = lmdb.open(str(path), subdir=True, map_size=1 << 28, meminit=False)
    keys = [f"{i:08}".encode("ascii") for i in range(len(records))]
    with env.begin(write=True) as txn:
        for i, (key, rec) in enumerate(zip(keys, records)):
            txn.put(key, (raw or {}).get(i) or dumps(rec))
        txn.put(b"__keys__", dumps(keys))
    env.close()
    return path


def nlvr2_records(exs, feats, b64: set = frozenset()) -> list[dict]:
    """VOLTA's serialized NLVR2 records (formats/nlvr2_serialized.py) of `exs`, both images' arrays taken from the
    image-keyed features `feats`; records whose index is in `b64` hold base64 float32 bytes (the X101 files)."""
    reader, out = open_features(feats), []
    for i, ex in enumerate(exs):
        rec = {"id": ex.id, "question_id": i, "sentence": ex.text, "labels": [ex.label], "scores": [1.0]}
        for side, key in ((0, ex.image), (1, ex.image2)):
            f, b, w, h = reader.get(key)
            if i in b64:
                f, b = base64.b64encode(f.tobytes()), base64.b64encode(b.tobytes())
            rec.update({f"features_{side}": f, f"boxes_{side}": b, f"img_w_{side}": np.int64(w)})
            rec.update({f"img_h_{side}": np.int64(h), f"img_id_{side}": key, f"obj_id_{side}": np.arange(3)})
        out.append(rec)
    return out


def gqa_records(exs, feats) -> list[dict]:
    """IGLUE's serialized GQA records (data.SerializedGQADataset; the fields of the fixture tensorpack wrote,
    tests/fixtures/features/gqa_serialized_fixture.lmdb) of the xgqa examples `exs`: question, answer label ids and
    scores from the examples, the image's arrays from the image-keyed features `feats`."""
    reader, out = open_features(feats), []
    for ex in exs:
        f, b, w, h = reader.get(ex.image)
        entry = {"image_id": ex.image, "labels": list(ex.scores), "scores": list(ex.scores.values())}
        entry.update({"question_id": ex.id, "question": ex.text})
        rec = {"features": f, "boxes": b, "img_w": np.int64(w), "img_h": np.int64(h), "obj_id": np.arange(len(b))}
        out.append({**rec, "img_id": ex.image, "entry": entry})
    return out
