"""Region-feature stores of UC2 (VOLTA's formats): per-image LMDB (h5_to_lmdb.py pickles or X101 base64),
IGLUE's boxes36 H5 file, and the tensorpack / msgpack serialized LMDBs (GQA questions, NLVR2 pairs); VOLTA's box
locations and padding.

Not on the reading path: data.py's UC2 datasets read features through open_features / read_record and get
(features [N, 2048], locations [N, 7]) per image. Readers open their file lazily in each process (read-only,
no lock, no readahead: DataLoader workers never share a parent's handle). Every bad record is a one-line
BadInput naming the file and key.
"""

from __future__ import annotations

import base64
import os
from typing import Any, Sequence

import numpy as np
import torch

from formats.bad_input import BadInput
from formats.pickles import plain_dtype, short_repr, unpickle_data

FEATURE_DIM = 2048


def box_locations(boxes: np.ndarray, img_w: int, img_h: int) -> np.ndarray:
    """VOLTA's 7-value location per box, float32: x1/W, y1/H, x2/W, y2/H, w/W, h/H, relative area."""
    loc = np.empty((boxes.shape[0], 7), dtype=np.float32)
    loc[:, :4] = boxes
    # the float32 operations of VOLTA's ImageFeaturesH5Reader, element by element, so results are bit-identical
    # (x1/W, y1/H, x2/W, y2/H in one division by float32 [W, H, W, H]: W and H are exact in float32)
    loc[:, 6] = (loc[:, 3] - loc[:, 1]) * (loc[:, 2] - loc[:, 0]) / (float(img_w) * float(img_h))
    np.divide(loc[:, :4], np.array([img_w, img_h, img_w, img_h], dtype=np.float32), out=loc[:, :4])
    np.subtract(loc[:, 2:4], loc[:, 0:2], out=loc[:, 4:6])
    return loc


def pad_regions(features: np.ndarray, locations: np.ndarray, max_regions: int) -> dict[str, torch.Tensor]:
    """First min(N, R) regions in file order, zero padding after; image_mask 1 on kept regions."""
    return batch_regions([(features, locations)], max_regions, ())


def batch_regions(regions: Sequence[tuple[np.ndarray, np.ndarray]], max_regions: int, lead: tuple) -> dict:
    """(features [n,2048], locations [n,7]) per image -> padded lead+[R,2048], lead+[R,7], lead+[R] tensors,
    written once into the batch buffers (rows after n are zero, image_mask 1 on the first n)."""
    shape = (len(regions), max_regions)
    feats = torch.empty(shape + (FEATURE_DIM,), dtype=torch.float32)
    spatials = torch.empty(shape + (7,), dtype=torch.float32)
    mask = torch.empty(shape, dtype=torch.long)
    f, sp, m = feats.numpy(), spatials.numpy(), mask.numpy()  # numpy copies: sources may be read-only buffers
    for i, (feat, loc) in enumerate(regions):
        n = min(len(feat), max_regions)
        f[i, :n], f[i, n:] = feat[:n], 0
        sp[i, :n], sp[i, n:] = loc[:n], 0
        m[i, :n], m[i, n:] = 1, 0
    out = lead or (len(regions),)
    return {
        "features": feats.view(*out, max_regions, FEATURE_DIM) if lead else feats[0],
        "spatials": spatials.view(*out, max_regions, 7) if lead else spatials[0],
        "image_mask": mask.view(*out, max_regions) if lead else mask[0],
    }


class _LazyHandle:
    """Opens its file on first use in each process (DataLoader workers never share a parent's handle)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._handle, self._pid = None, None

    def _open(self):
        raise NotImplementedError

    @property
    def handle(self):
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = self._open(), os.getpid()
        return self._handle

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handle"], state["_pid"] = None, None
        return state


_LMDB_ENVS: dict[str, tuple[int, Any]] = {}


def _open_lmdb(path: str):
    """Read-only, lock-free, no-readahead LMDB environment, opened once per (path, process)."""
    import lmdb

    key = os.path.abspath(path)
    pid, env = _LMDB_ENVS.get(key, (None, None))
    if env is not None and pid == os.getpid():
        return env
    if env is not None:  # inherited through fork: never use the parent's handle, release the child's copy
        try:
            env.close()
        except lmdb.Error:
            pass
    if not os.path.exists(path):
        raise ValueError(f"feature file {path} does not exist")
    try:
        env = lmdb.open(
            path,
            subdir=os.path.isdir(path),
            readonly=True,
            lock=False,
            readahead=False,
            meminit=False,
            max_readers=2048,
        )
    except lmdb.Error as e:
        raise ValueError(f"{path}: cannot open as LMDB ({e})") from None
    _check_lmdb_size(env, path)
    _LMDB_ENVS[key] = (os.getpid(), env)
    return env


def _check_lmdb_size(env, path: str) -> None:
    """A truncated data.mdb (interrupted copy/download) is mmapped and would kill the process with SIGBUS
    on the first read past its end: compare the file size with the last page its header says is in use."""
    data_file = os.path.join(path, "data.mdb") if os.path.isdir(path) else path
    need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = os.path.getsize(data_file)
    if size < need:
        env.close()
        raise ValueError(
            f"{data_file}: LMDB file is truncated ({size:,} bytes, its header needs {need:,}); "
            f"copy or download it again"
        )


def _close_lmdb(path: str) -> None:
    pid, env = _LMDB_ENVS.pop(os.path.abspath(path), (None, None))
    if env is not None:
        env.close()


class LMDBRegionFeatures(_LazyHandle):
    """Per-image LMDB as VOLTA reads it: `keys` entry + pickled dict per image id, with numpy arrays
    (h5_to_lmdb.py, boxes36) or base64 float32 bytes (npy_to_lmdb.py, X101):
    docs/reference_facts.md#F-uc2-feature-files."""

    def _open(self):
        return _open_lmdb(self.path)

    def keys(self) -> set[str]:
        if getattr(self, "_keys", None) is None:
            with self.handle.begin() as txn:
                raw = txn.get(b"keys")
            if raw is None:
                raise ValueError(
                    f"{self.path}: no 'keys' entry; not an image-keyed feature LMDB "
                    f"(a serialized LMDB, GQA's or NLVR2's, is a training / dev set of its own)"
                )
            keys = unpickle_data(raw, f"{self.path} entry 'keys'")
            self._keys = {k.decode() if isinstance(k, bytes) else str(k) for k in keys}
        return self._keys

    def __contains__(self, key) -> bool:
        return str(key) in self.keys()

    def get(self, key, max_rows: int | None = None) -> tuple[np.ndarray, np.ndarray, int, int]:
        """(features [N,2048] f32, boxes [N,4] f32 pixels, img_w, img_h), the first max_rows rows only if given;
        KeyError if absent."""
        with self.handle.begin(buffers=True) as txn:
            raw = txn.get(str(key).encode())
            if raw is None:
                raise KeyError(str(key))
            item = unpickle_data(raw, f"{self.path}: feature record {str(key)!r}")
        rows = slice(None, max_rows)
        return _record_arrays(self.path, key, item, rows)

    def regions(self, key, max_regions: int) -> dict[str, torch.Tensor]:
        return pad_regions(*self.kept_regions(key, max_regions), max_regions)

    def kept_regions(self, key, max_regions: int) -> tuple[np.ndarray, np.ndarray]:
        """(features [n,2048], locations [n,7]) of the first n = min(N, max_regions) boxes."""
        feats, boxes, w, h = self.get(key, max_regions)
        return feats, box_locations(boxes, w, h)


_RECORD_FIELDS = ("features", "boxes", "img_w", "img_h")


def _record_arrays(path: str, key, item, rows: slice, where: str = "") -> tuple[np.ndarray, np.ndarray, int, int]:
    """(features [N,2048], boxes [N,4] float32, img_w, img_h) of a decoded record, checked: a record of another
    width (4x1024 is not 2x2048), dtype or row count, or without its fields, is a BadInput naming file and key
    (`where`: how the messages name it; default "<path>: feature record '<key>'")."""
    where = where or f"{path}: feature record {str(key)!r}"
    if not isinstance(item, dict) or not all(k in item for k in _RECORD_FIELDS):
        have = (
            [short_repr(k, 40) for k in sorted(map(str, item))[:8]] if isinstance(item, dict) else type(item).__name__
        )
        raise BadInput(f"{where}: expected a dict with {', '.join(_RECORD_FIELDS)}; got {have}")
    feats = _as_rows(item["features"], FEATURE_DIM, where, "features")
    boxes = _as_rows(item["boxes"], 4, where, "boxes")
    if len(feats) != len(boxes):
        raise BadInput(f"{where}: {len(feats)} feature rows of {FEATURE_DIM} but {len(boxes)} boxes")
    width, height = _image_side(item["img_w"], where, "img_w"), _image_side(item["img_h"], where, "img_h")
    _check_boxes(boxes, width, height, where)
    return feats[rows], boxes[rows], width, height


# Largest image side a record may declare (pixels): real ones are a few hundred (COCO <= 640, Flickr30k <= 500).
MAX_IMAGE_SIDE = 100_000
# How far a box may reach outside its image, as a fraction of the image side (at least BOX_SLACK_MIN_PX pixels):
# detectors clip their boxes to the image ([0, side - 1]), so only rounding of rescaled coordinates is allowed.
BOX_SLACK, BOX_SLACK_MIN_PX = 0.01, 2.0


def _check_boxes(boxes: np.ndarray, width: int, height: int, where: str) -> None:
    """A record without boxes (VOLTA would feed the model padding only), or with a box reaching outside its image
    by more than the slack (a 1e6 box is read as a location 1000s of image widths away), is a BadInput naming it.
    NaN / inf boxes are checks.preflight.record_problem's (not finite)."""
    if len(boxes) == 0:
        raise BadInput(f"{where}: holds no boxes (0 regions); expected at least one box per image")
    side = np.array([width, height, width, height], dtype=np.float64)
    slack = np.maximum(side * BOX_SLACK, BOX_SLACK_MIN_PX)
    out = (boxes < -slack) | (boxes > side + slack)
    if out.any():
        row = int(np.argmax(out.any(axis=1)))
        box = ", ".join(f"{v:.6g}" for v in boxes[row].tolist())
        raise BadInput(
            f"{where}: box {row} [{box}] lies outside its {width}x{height} image (x1 y1 x2 y2 in pixels, "
            f"{int(out.any(axis=1).sum())} of {len(boxes)} boxes; allowed: {BOX_SLACK:.0%} of the side beyond it)"
        )


def _as_rows(value, width: int, where: str = "", name: str = "") -> np.ndarray:
    # X101 LMDBs store base64 text of raw float32; h5_to_lmdb stores the arrays themselves (used directly,
    # instead of VOLTA's try-b64decode-then-fall-back: docs/reference_facts.md#F-uc2-feature-b64).
    if isinstance(value, (bytes, str)):
        try:
            raw = base64.b64decode(value, validate=True)
        except ValueError as e:
            raise BadInput(f"{where}: {name} is not valid base64 ({e})") from None
        if len(raw) % (4 * width):
            raise BadInput(f"{where}: {name} holds {len(raw)} bytes, not whole float32 rows of {width}")
        return np.frombuffer(raw, dtype=np.float32).reshape(-1, width)
    if not isinstance(value, np.ndarray) or value.dtype.kind != "f" or value.ndim != 2 or value.shape[1] != width:
        shown = (
            f"{value.dtype} array of shape {list(value.shape)}"
            if isinstance(value, np.ndarray)
            else type(value).__name__
        )
        raise BadInput(f"{where}: {name} is a {shown}; expected a float array of shape [N, {width}]")
    return np.asarray(value, dtype=np.float32)


def _image_side(value, where: str, name: str) -> int:
    ok = isinstance(value, (int, np.integer)) or (
        isinstance(value, np.ndarray) and value.shape == () and value.dtype.kind in "iu"
    )
    if not ok or isinstance(value, bool) or not 1 <= int(value) <= MAX_IMAGE_SIDE:
        raise BadInput(
            f"{where}: {name} is {_shown(value)}; expected a positive integer of pixels, at most {MAX_IMAGE_SIDE:,}"
        )
    return int(value)


def _shown(value) -> str:
    """A value from a file, shown bounded: an integer of thousands of digits by its size, anything else cut."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and abs(int(value)) >= 10**18:
        return f"an integer of about {int(abs(int(value)).bit_length() * 0.30103) + 1:,} digits"
    return short_repr(value, 80)


class H5RegionFeatures(_LazyHandle):
    """IGLUE's distributed boxes36 H5: one group per image id (features, boxes, img_w, img_h, ...)."""

    def _open(self):
        import h5py

        if not os.path.isfile(self.path):
            raise ValueError(f"feature file {self.path} does not exist")
        try:
            return h5py.File(self.path, "r")
        except OSError as e:  # truncated (interrupted copy) or not HDF5 at all
            raise ValueError(f"{self.path}: cannot open as HDF5 ({e}); copy or download it again") from None

    def keys(self) -> set[str]:
        if getattr(self, "_keys", None) is None:
            self._keys = set(self.handle.keys())
        return self._keys

    def __contains__(self, key) -> bool:
        return str(key) in self.keys()

    def get(self, key, max_rows: int | None = None):
        key = str(key)
        if key not in self.keys():
            raise KeyError(key)
        where = f"{self.path}: feature record {key!r}"
        g = _own_h5_object(self.handle, key, where, "its group")
        if not all(k in g for k in _RECORD_FIELDS):
            raise BadInput(f"{where}: expected datasets {', '.join(_RECORD_FIELDS)}; got {sorted(g)[:8]}")
        for name in _RECORD_FIELDS:
            _own_h5_object(g, name, where, f"dataset {name!r}")
        shapes = (g["features"].shape, g["boxes"].shape)
        if any(len(shape) != 2 for shape in shapes) or shapes[0][0] != shapes[1][0]:
            raise BadInput(
                f"{where}: features of shape {list(shapes[0])} and boxes of shape {list(shapes[1])}; "
                f"expected [N, {FEATURE_DIM}] and [N, 4]"
            )
        rows = slice(None, max_rows)  # h5py reads only these rows
        item = {
            "features": g["features"][rows],
            "boxes": g["boxes"][rows],
            "img_w": g["img_w"][()],
            "img_h": g["img_h"][()],
        }
        return _record_arrays(self.path, key, item, slice(None))

    regions = LMDBRegionFeatures.regions
    kept_regions = LMDBRegionFeatures.kept_regions


def _own_h5_object(parent, name: str, where: str, what: str):
    """parent[name], refused unless its data lies inside this HDF5 file: an external link (to another HDF5 file),
    a dataset with external storage (raw bytes of any file, e.g. /etc/passwd, read as features) or a virtual
    dataset (mapped from other files) is a BadInput naming the file, the record and the dataset."""
    import h5py

    link = parent.get(name, getlink=True)
    if isinstance(link, h5py.ExternalLink):
        outside = f"an external link to {_short(link.filename)}:{_short(link.path)}"
    else:
        obj = parent[name]
        if obj.file.filename != parent.file.filename:  # a soft link through an external one
            outside = f"a link into {_short(obj.file.filename)}"
        elif not isinstance(obj, h5py.Dataset):
            return obj
        elif obj.external:
            outside = f"external storage in {_short(obj.external[0][0])}"
        elif obj.is_virtual:
            outside = f"a virtual dataset mapped from {_short(obj.virtual_sources()[0].file_name)}"
        else:
            return obj
    raise BadInput(
        f"{where}: {what} lies outside this file ({outside}); refused: feature files are read only for their own data"
    )


def _short(value) -> str:
    """An untrusted name from a file, shown bounded (200 characters at most)."""
    text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return repr(text if len(text) <= 200 else text[:200] + "...")


def feature_keys(reader) -> set[str]:
    """reader.keys(); a `keys` entry that does not decode (bit rot) is a one-line BadInput naming the file."""
    try:
        return reader.keys()
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - undecodable bytes: pickle raises many types
        detail = (str(e).strip().splitlines() or [""])[0][:160]
        raise BadInput(
            f"{reader.path}: its 'keys' entry cannot be decoded ({type(e).__name__}: {detail}); "
            "copy or download the features again"
        ) from None


def open_features(path: str | os.PathLike) -> LMDBRegionFeatures | H5RegionFeatures:
    """Image-keyed region-feature reader for an LMDB (folder or file) or an .h5/.hdf5 file; opened lazily."""
    path = str(path)
    if not os.path.exists(path):
        raise ValueError(f"feature path {path} does not exist")
    if path.endswith((".h5", ".hdf5")):
        return H5RegionFeatures(path)
    return LMDBRegionFeatures(path)


def is_serialized_lmdb(path: str | os.PathLike) -> bool:
    """True for a tensorpack per-question LMDB (has `__keys__`, no `keys`)."""
    path = str(path)
    if path.endswith((".h5", ".hdf5")) or not os.path.exists(path):
        return False
    was_open = _LMDB_ENVS.get(os.path.abspath(path), (None,))[0] == os.getpid()
    with _open_lmdb(path).begin() as txn:
        serialized = txn.get(b"__keys__") is not None and txn.get(b"keys") is None
    if not was_open:  # keep the main process free of LMDB handles: workers open their own
        _close_lmdb(path)
    return serialized


def _msgpack_numpy_hook(obj: dict):
    # msgpack_numpy (0.4.x) writes arrays as {b"nd": True, b"type", b"kind", b"shape", b"data"} and numpy
    # scalars as {b"nd": False, b"type", b"data"}; the maps have bytes keys, so plain dicts never match.
    if b"nd" not in obj:
        return obj
    if obj.get(b"kind") not in (None, b""):
        raise ValueError(f"structured numpy dtype (kind {obj[b'kind']!r}) is not supported")
    dtype = plain_dtype(obj[b"type"], "msgpack_numpy array")  # never an object dtype from a file
    if obj[b"nd"]:
        return np.frombuffer(obj[b"data"], dtype=dtype).reshape(obj[b"shape"])
    return np.frombuffer(obj[b"data"], dtype=dtype)[0]


def decode_serialized(buf: bytes) -> Any:
    """tensorpack 0.9.4 `loads`: msgpack with msgpack_numpy maps, decoded with the plain msgpack package."""
    import msgpack

    big = 10**9
    return msgpack.unpackb(
        buf,
        raw=False,
        object_hook=_msgpack_numpy_hook,
        strict_map_key=False,
        max_bin_len=big,
        max_array_len=big,
        max_map_len=big,
        max_str_len=big,
    )


class SerializedRecords(_LazyHandle):
    """A tensorpack LMDBSerializer file (VOLTA's task format 'serialized_lmdb'): records under keys b"%08d" in
    write order, listed by `__keys__`. Record i = the i-th key in LMDB order (VOLTA's shuffle=False cursor order)."""

    def _open(self):
        return _open_lmdb(self.path)

    def keys(self) -> list[bytes]:
        if getattr(self, "_keys", None) is None:
            with self.handle.begin() as txn:
                raw = txn.get(b"__keys__")
            if raw is None:
                raise ValueError(f"{self.path}: no '__keys__' entry; not a tensorpack serialized LMDB")
            self._keys = sorted(decode_serialized(raw))
        return self._keys

    def __len__(self) -> int:
        return len(self.keys())

    def record(self, i: int) -> dict:
        """Record i decoded, with "key" (its LMDB key) added; one that is missing or does not decode to a map is a
        BadInput naming the file and the key."""
        key = self.keys()[i]
        where = f"{self.path}: record {key.decode(errors='replace')!r}"
        with self.handle.begin() as txn:
            raw = txn.get(key)
        if raw is None:
            raise BadInput(f"{where}: listed in __keys__ but missing; copy or download the file again")
        try:
            rec = decode_serialized(raw)
        except Exception as e:  # noqa: BLE001 - undecodable bytes: msgpack raises many types
            detail = (str(e).strip().splitlines() or [""])[0][:160]
            raise BadInput(
                f"{where}: cannot be decoded ({type(e).__name__}{': ' + detail if detail else ''}); "
                "copy or download the file again"
            ) from None
        if not isinstance(rec, dict):
            raise BadInput(f"{where}: a {type(rec).__name__}, not a map of fields")
        rec["key"] = key.decode(errors="replace")
        return rec


class SerializedGQA(SerializedRecords):
    """IGLUE's GQA train/val LMDB: one record per question (image arrays + `img_id` + `entry`)."""


def serialized_task(path: str | os.PathLike) -> str:
    """The task a serialized LMDB's records are for, from its first record: "xgqa" (IGLUE's GQA: `entry`) or
    "marvl" (IGLUE's NLVR2: `features_0` / `features_1`, formats/nlvr2_serialized.py); anything else a BadInput."""
    db = SerializedRecords(path)
    if not len(db):
        raise BadInput(f"{path}: a serialized LMDB without records")
    rec = db.record(0)
    for task, field in SERIALIZED_TASKS.items():
        if field in rec:
            return task
    have = ", ".join(short_repr(k, 40) for k in sorted(map(str, rec))[:8])
    raise BadInput(
        f"{path}: record {rec['key']!r} is neither a GQA question record ('entry') nor an NLVR2 pair record "
        f"('features_0'); fields: {have}"
    )


SERIALIZED_TASKS = {"xgqa": "entry", "marvl": "features_0"}  # task: the field its records have


def referenced(ex) -> str:
    """The suffix naming an Example's annotation line and id (ex: anything with .source and .id; None: "")."""
    return f" (referenced by {ex.source}, example {ex.id})" if ex is not None else ""


def missing_feature_error(key: str, ex, where: str) -> ValueError:
    return BadInput(f"feature key {key!r} not found in {where} (referenced by {ex.source}, example {ex.id})")


def read_record(reader, key: str, ex, read: str = "kept_regions", *args):
    """reader.<read>(key, *args) with every failure of the record a one-line BadInput naming file, key and
    (ex) annotation line: a key listed in the `keys` entry without a record, a record of the wrong
    shape, or one that does not decode at all (bit rot: pickle raises many types)."""
    try:
        return getattr(reader, read)(key, *args)
    except KeyError:
        if key in reader:
            raise BadInput(
                f"{reader.path}: feature key {key!r} is listed in its keys but has no record (a damaged "
                f"or incomplete copy); copy or download the features again{referenced(ex)}"
            ) from None
        raise missing_feature_error(key, ex, reader.path) from None
    except BadInput as e:
        raise BadInput(f"{e}{referenced(ex)}") from None
    except Exception as e:  # noqa: BLE001 - undecodable bytes
        detail = (str(e).strip().splitlines() or [""])[0][:160]
        raise BadInput(
            f"{reader.path}: feature record {key!r} cannot be decoded ({type(e).__name__}: {detail}); "
            f"copy or download the features again{referenced(ex)}"
        ) from None


def as_reader(features):
    """An image-keyed reader: `features` itself, or open_features of a path (a per-question GQA LMDB refused)."""
    if features is None:
        raise ValueError("region features are required for UC2 (give --features)")
    if isinstance(features, (str, os.PathLike)):
        if is_serialized_lmdb(features):
            raise ValueError(
                f"{features} is a serialized (per-question / per-sentence) LMDB: it is a training / dev set "
                f"(data.REGION_FEATURES.dataset), not an image-keyed reader"
            )
        return open_features(features)
    return features
