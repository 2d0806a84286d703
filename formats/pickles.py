"""The restricted unpickler for pickles inside downloaded files (feature LMDB records and `keys`,
hard_negative.pkl, GQA answer vocabularies): plain data and numpy arrays only (README "Trust model").

Not on the reading path: data.py and formats/features.py call unpickle_data / read_pickle.

Unpickling calls whatever function the file names. These files need none beyond numpy's array, dtype and
scalar rebuilders and a few builtin containers, so the unpickler below resolves exactly those (numpy 1.x
and 2.x module names, Python 2 names) to our own checking functions, and refuses every other name. numpy's
dtype.__setstate__ would accept a forged state (object fields on a float type: raw bytes read as pointers),
so dtypes and arrays are rebuilt by us from validated parts, never by numpy's setstate on forged input.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np

from formats.bad_input import BadInput


class UnsafePickleError(ValueError):
    """A downloaded pickle names a function or class that no data file needs; nothing was called."""


PLAIN_DTYPE_KINDS = "biufcSU"  # bool, ints, floats, complex, bytes and str: no objects, no structs


def plain_dtype(spec: str, where: str = "dtype") -> np.dtype:
    """np.dtype(spec) if it is a plain numeric/bytes/str type (no object, struct, sub-array); else ValueError."""
    if type(spec) is not str:
        raise ValueError(f"{where}: dtype spec must be a string, got {type(spec).__name__}")
    dt = _PLAIN_DTYPES.get(spec)
    if dt is None:
        dt = np.dtype(spec)
        if dt.kind not in PLAIN_DTYPE_KINDS or dt.fields is not None or dt.subdtype is not None or dt.hasobject:
            raise ValueError(f"{where}: dtype {spec!r} is not a plain numeric or string type")
        if len(_PLAIN_DTYPES) < 1024:
            _PLAIN_DTYPES[spec] = dt
    return dt


_PLAIN_DTYPES: dict[str, np.dtype] = {}  # spec -> checked dtype (a feature file repeats the same few)
_NATIVE_ORDER = "<" if sys.byteorder == "little" else ">"


class _NdarrayMarker:
    """Stands for numpy.ndarray, the class argument of _reconstruct; not callable, holds no state."""

    __slots__ = ()


_NDARRAY = _NdarrayMarker()


class _PickledDtype:
    """A dtype being unpickled: built from its spec, then its pickled state may only set the byte order."""

    __slots__ = ("dtype", "_built")

    def __init__(self, spec, align=False, copy=True):
        self.dtype, self._built = plain_dtype(spec, "pickled dtype"), False

    def __setstate__(self, state):
        if self._built or not isinstance(state, tuple) or len(state) not in (8, 9) or state[0] not in (3, 4):
            raise ValueError("malformed dtype state")
        endian, subarray, names, fields, elsize, alignment = state[1:7]
        if (subarray, names, fields) != (None, None, None) or (len(state) == 9 and state[8] is not None):
            raise ValueError("dtype state with fields, sub-arrays or metadata")
        if elsize not in (-1, self.dtype.itemsize) or alignment not in (-1, self.dtype.alignment):
            raise ValueError(f"dtype state with item size {elsize} / alignment {alignment} for {self.dtype}")
        if endian not in ("<", ">", "=", "|"):
            raise ValueError(f"dtype state with byte order {endian!r}")
        if endian in "<>" and endian != _NATIVE_ORDER and self.dtype.byteorder != "|":
            self.dtype = self.dtype.newbyteorder(endian)
        self._built = True


def _shape(shape) -> tuple[int, ...]:
    if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"array shape {shape!r} is not a tuple of non-negative ints")
    return shape


def _raw_bytes(raw) -> bytes | bytearray:
    if isinstance(raw, str):  # Python 2 pickles read with encoding="latin1"
        return raw.encode("latin1")
    if not isinstance(raw, (bytes, bytearray)):
        raise ValueError(f"array data must be bytes, got {type(raw).__name__}")
    return raw


class _PickledArray:
    """An ndarray being unpickled (numpy's _reconstruct + BUILD); replaced by `array` once loading ends."""

    __slots__ = ("array",)

    def __init__(self):
        self.array = None

    def __setstate__(self, state):
        # numpy's setstate checks shape and data size itself; what it must not see is a forged dtype
        if self.array is not None or type(state) is not tuple or len(state) not in (4, 5):
            raise ValueError("malformed array state")
        if len(state) == 5 and state[0] != 1:
            raise ValueError(f"array state version {state[0]!r}")
        shape, dtype, fortran, raw = state[-4:]
        if type(dtype) is not _PickledDtype or type(shape) is not tuple or type(raw) not in (bytes, bytearray, str):
            raise ValueError("malformed array state")
        arr = np.empty(0, np.uint8)
        arr.__setstate__((1, shape, dtype.dtype, fortran, raw))
        self.array = arr


def _pickle_reconstruct(cls, shape, typecode):
    if not isinstance(cls, _NdarrayMarker):
        raise ValueError("_reconstruct of a class other than numpy.ndarray")
    return _PickledArray()


def _pickle_scalar(dtype, raw):
    if not isinstance(dtype, _PickledDtype):
        raise ValueError("numpy scalar without a dtype")
    raw = _raw_bytes(raw)
    if len(raw) != dtype.dtype.itemsize:
        raise ValueError(f"numpy scalar of {len(raw)} bytes for {dtype.dtype}")
    return np.frombuffer(raw, dtype.dtype)[0]


def _pickle_frombuffer(buf, dtype, shape, order):  # numpy's pickle protocol 5 path for contiguous arrays
    if not isinstance(dtype, _PickledDtype) or not isinstance(buf, (bytes, bytearray)) or order not in ("C", "F"):
        raise ValueError("malformed protocol-5 array")
    shape = _shape(shape)
    if len(buf) != math.prod(shape) * dtype.dtype.itemsize:
        raise ValueError(f"array data of {len(buf)} bytes for shape {shape} of {dtype.dtype}")
    arr = np.frombuffer(buf, dtype.dtype)
    return arr.reshape(shape[::-1]).T if order == "F" else arr.reshape(shape)


def _pickle_latin1(text, encoding):  # how protocols 0-2 store bytes: _codecs.encode(str, "latin1")
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise ValueError(f"_codecs.encode with {encoding!r}")
    return text.encode("latin1")


def _pickle_empty_bytes(*args):  # protocols 0-2 store b"" as bytes()
    if args:
        raise ValueError("bytes() with arguments")
    return b""


def _pickle_container(kind):
    def build(*args):
        if len(args) > 1 or (args and not isinstance(args[0], (list, tuple, dict, set, frozenset))):
            raise ValueError(f"{kind.__name__}() with arguments {type(args).__name__}")
        return kind(*args)

    return build


_NUMPY_CORE = ("numpy.core", "numpy._core")  # numpy 1.x / 2.x module names in pickles
_PICKLE_GLOBALS = {
    **{(f"{m}.multiarray", "_reconstruct"): _pickle_reconstruct for m in _NUMPY_CORE},
    **{(f"{m}.multiarray", "scalar"): _pickle_scalar for m in _NUMPY_CORE},
    **{(f"{m}.numeric", "_frombuffer"): _pickle_frombuffer for m in _NUMPY_CORE},
    ("numpy", "dtype"): _PickledDtype,
    ("_codecs", "encode"): _pickle_latin1,
    **{(b, "bytes"): _pickle_empty_bytes for b in ("builtins", "__builtin__")},
    **{(b, k.__name__): _pickle_container(k) for b in ("builtins", "__builtin__") for k in (set, frozenset)},
    ("collections", "OrderedDict"): _pickle_container(collections.OrderedDict),
}


class _DataUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only _PICKLE_GLOBALS (exact module and name) and numpy.ndarray."""

    numpy_seen = False  # set once a numpy name is resolved: only then can placeholders need replacing

    def find_class(self, module: str, name: str):
        self.numpy_seen = self.numpy_seen or module.startswith("numpy")
        if (module, name) == ("numpy", "ndarray"):
            return _NDARRAY
        fn = _PICKLE_GLOBALS.get((module, name))
        if fn is None:
            raise UnsafePickleError(f"{module}.{name}")
        # a fresh function per lookup: a BUILD on it (setattr) cannot alter the shared checking functions
        return lambda *args: fn(*args)


def _resolve_pickled(obj, seen: set):
    """obj with every _PickledArray / _PickledDtype replaced by its ndarray / dtype (containers in place)."""
    kind = type(obj)
    if kind is _PickledArray:
        if obj.array is None:
            raise ValueError("array without its data")
        return obj.array
    if kind is _PickledDtype:
        return obj.dtype
    if kind in (list, dict, collections.OrderedDict):
        if id(obj) in seen:
            return obj
        seen.add(id(obj))
        if kind is list:
            obj[:] = [_resolve_pickled(x, seen) for x in obj]
        else:
            if any(type(k) in (_PickledArray, _PickledDtype) for k in obj):
                raise ValueError("numpy object as a dict key")
            for k, v in obj.items():
                obj[k] = _resolve_pickled(v, seen)
        return obj
    if kind is tuple:
        new = tuple(_resolve_pickled(x, seen) for x in obj)
        return obj if all(a is b for a, b in zip(new, obj)) else new
    if kind in (set, frozenset) and any(type(x) in (_PickledArray, _PickledDtype) for x in obj):
        raise ValueError("numpy object in a set")
    return obj


def unpickle_data(buf: bytes | memoryview, where: str) -> Any:
    """Plain data (builtin containers, numbers, strings, bytes, numpy arrays/scalars) from a pickle found in a
    downloaded file; anything else is a one-line ValueError naming `where` (UnsafePickleError when the pickle
    asks for a function or class: nothing named in it is called). Python 2 pickles whose str are not ASCII
    are read as latin-1, as numpy advises for them."""
    try:
        try:
            unpickler = _DataUnpickler(io.BytesIO(buf))
            obj = unpickler.load()
        except UnicodeDecodeError:
            unpickler = _DataUnpickler(io.BytesIO(buf), encoding="latin1")
            obj = unpickler.load()
        return _resolve_pickled(obj, set()) if unpickler.numpy_seen else obj
    except UnsafePickleError as e:
        raise UnsafePickleError(
            f"{where}: refused to unpickle: it asks for {e}, which no data file needs (only "
            f"containers, numbers, strings and numpy arrays are read; nothing was run)"
        ) from None
    except (
        pickle.UnpicklingError,
        ValueError,
        TypeError,
        EOFError,
        AttributeError,
        IndexError,
        KeyError,
        OverflowError,
        MemoryError,
        RecursionError,
    ) as e:
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        raise BadInput(f"{where}: not a readable pickle of plain data ({type(e).__name__}: {detail})") from None


def read_pickle(path: str | os.PathLike) -> Any:
    """unpickle_data of a whole file."""
    return unpickle_data(Path(path).read_bytes(), str(path))
