"""The restricted unpickler for pickles inside downloaded files (feature LMDB records and `keys`,
hard_negative.pkl, GQA answer vocabularies): plain data and numpy arrays only (README "Trust model").

Not on the reading path: data.py and formats/features.py call unpickle_data / read_pickle.

Unpickling calls whatever function the file names. These files need none beyond numpy's array, dtype and
scalar rebuilders and a few builtin containers, so the unpickler below resolves exactly those (numpy 1.x
and 2.x module names, Python 2 names) to our own checking functions, and refuses every other name. numpy's
dtype.__setstate__ would accept a forged state (object fields on a float type: raw bytes read as pointers),
so dtypes and arrays are rebuilt by us from validated parts, never by numpy's setstate on forged input.

Work is linear in the file's size, whatever the file holds. Through its memo a pickle of a few hundred bytes can
describe a tuple DAG with 2^60 paths: anything that walks it as a tree (a hash, a repr, a comparison) never ends.
So the pickle machine is Python's own (pickle._Unpickler) with the opcodes that hash changed to admit only
scalar dict keys and set members (str, bytes, small int, float, bool, None: hashing them is linear and their
collisions are not chosen by the file); the object read is then walked once, memoised, and refused when it is
nested deeper than MAX_DEPTH or its tree (every path counted) exceeds MAX_TREE_NODES + TREE_NODES_PER_BYTE x the
file's size; what our rebuilders copy (sets, arrays, bytes) is charged against BUILT_BYTES_PER_BYTE x the file's
size + 1 MiB. Error messages show untrusted values through short_repr (at most 200 characters).
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import reprlib
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np

from formats.bad_input import BadInput


class UnsafePickleError(ValueError):
    """A downloaded pickle names a function or class that no data file needs; nothing was called."""


MAX_DEPTH = 64  # nesting of containers; data files nest 2-4 deep
MAX_TREE_NODES, TREE_NODES_PER_BYTE = 1_000_000, 16  # the object read, every shared sub-object counted per path
BUILT_BYTES_PER_BYTE = 4  # sets, arrays, bytes our rebuilders make: each copies a part of the file once
_KEY_TYPES = (str, bytes, float, bool, type(None))
_SMALL_INT = 2**61 - 1  # |int| below it: hash(x) == x (but -1), so no two keys the file chooses collide


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 3, 60, 60, 60
_SHORT.maxtuple = _SHORT.maxlist = _SHORT.maxdict = _SHORT.maxset = _SHORT.maxfrozenset = 6


def short_repr(value, limit: int = 200) -> str:
    """repr(value) for an error message about an untrusted value: bounded work and at most `limit` characters
    (nested containers, long strings and huge ints are elided with '...')."""
    try:
        text = _SHORT.repr(value)
    except Exception:  # a huge int (str() refuses > 4300 digits), a broken object
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


PLAIN_DTYPE_KINDS = "biufcSU"  # bool, ints, floats, complex, bytes and str: no objects, no structs


def plain_dtype(spec: str, where: str = "dtype") -> np.dtype:
    """np.dtype(spec) if it is a plain numeric/bytes/str type (no object, struct, sub-array); else ValueError."""
    if type(spec) is not str:
        raise ValueError(f"{where}: dtype spec must be a string, got {type(spec).__name__}")
    dt = _PLAIN_DTYPES.get(spec)
    if dt is None:
        dt = np.dtype(spec)
        if dt.kind not in PLAIN_DTYPE_KINDS or dt.fields is not None or dt.subdtype is not None or dt.hasobject:
            raise ValueError(f"{where}: dtype {short_repr(spec)} is not a plain numeric or string type")
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
            raise ValueError(
                f"dtype state with item size {short_repr(elsize)} / alignment {short_repr(alignment)} for {self.dtype}"
            )
        if endian not in ("<", ">", "=", "|"):
            raise ValueError(f"dtype state with byte order {short_repr(endian)}")
        if endian in "<>" and endian != _NATIVE_ORDER and self.dtype.byteorder != "|":
            self.dtype = self.dtype.newbyteorder(endian)
        self._built = True


def _shape(shape) -> tuple[int, ...]:
    if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"array shape {short_repr(shape)} is not a tuple of non-negative ints")
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
            raise ValueError(f"array state version {short_repr(state[0])}")
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
        raise ValueError(f"array data of {len(buf)} bytes for shape {short_repr(shape)} of {dtype.dtype}")
    arr = np.frombuffer(buf, dtype.dtype)
    return arr.reshape(shape[::-1]).T if order == "F" else arr.reshape(shape)


def _pickle_latin1(text, encoding):  # how protocols 0-2 store bytes: _codecs.encode(str, "latin1")
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise ValueError(f"_codecs.encode with {short_repr(encoding)}")
    return text.encode("latin1")


def _pickle_empty_bytes(*args):  # protocols 0-2 store b"" as bytes()
    if args:
        raise ValueError("bytes() with arguments")
    return b""


def _pickle_container(kind):
    def build(*args):
        if len(args) > 1 or (args and not isinstance(args[0], (list, tuple, dict, set, frozenset))):
            raise ValueError(f"{kind.__name__}() with arguments {type(args).__name__}")
        if args and not isinstance(args[0], dict):  # dict keys were checked when the dict was built
            if kind is collections.OrderedDict:  # Python 2 pickles an OrderedDict as a list of [key, value]
                if not all(type(p) in (list, tuple) and len(p) == 2 for p in args[0]):
                    raise ValueError("OrderedDict() of items that are not [key, value] pairs")
                _check_keys((p[0] for p in args[0]), "dict key")
            else:
                _check_keys(args[0], "set member")
        return kind(*args)

    return build


def _check_keys(keys, what: str) -> None:
    """Dict keys and set members must be scalars (_KEY_TYPES, small ints): hashing one is linear in its size and
    the file cannot make two collide (a tuple key can be a DAG whose hash never ends)."""
    for k in keys:
        kind = type(k)
        if kind not in _KEY_TYPES and not (kind is int and -_SMALL_INT < k < _SMALL_INT):
            shown = f"an int of {k.bit_length()} bits" if kind is int else f"of type {kind.__name__}"
            raise ValueError(f"a {what} {shown} (data files key by strings, bytes and numbers)")


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


def _load_setitem(self):
    value, key = self.stack.pop(), self.stack.pop()
    _load_setitems_of(self, [key, value])


def _load_setitems(self):
    _load_setitems_of(self, self.pop_mark())


def _load_setitems_of(self, items):
    target = self.stack[-1]
    if type(target) not in (dict, collections.OrderedDict):
        raise ValueError(f"SETITEMS on a {type(target).__name__}")
    _check_keys(items[::2], "dict key")
    for i in range(0, len(items), 2):
        target[items[i]] = items[i + 1]


def _load_dict(self):
    items = self.pop_mark()
    _check_keys(items[::2], "dict key")
    self.append({items[i]: items[i + 1] for i in range(0, len(items), 2)})


def _load_additems(self):
    items = self.pop_mark()
    if type(self.stack[-1]) is not set:
        raise ValueError(f"ADDITEMS on a {type(self.stack[-1]).__name__}")
    _check_keys(items, "set member")
    self.stack[-1].update(items)


def _load_frozenset(self):
    items = self.pop_mark()
    _check_keys(items, "set member")
    self.append(frozenset(items))


def _load_build(self):
    state, inst = self.stack[-1], self.stack[-2]
    if type(inst) is _PickledArray and type(state) is tuple and state:
        self.charge(len(state[-1]) if isinstance(state[-1], (bytes, bytearray, str)) else 0)
    pickle._Unpickler.load_build(self)


class _DataUnpickler(pickle._Unpickler):
    """Python's pickle machine resolving only _PICKLE_GLOBALS (exact module and name) and numpy.ndarray, with
    scalar dict keys and set members only, and a budget for what the rebuilders copy."""

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.SETITEM[0]], dispatch[pickle.SETITEMS[0]] = _load_setitem, _load_setitems
    dispatch[pickle.DICT[0]], dispatch[pickle.ADDITEMS[0]] = _load_dict, _load_additems
    dispatch[pickle.FROZENSET[0]], dispatch[pickle.BUILD[0]] = _load_frozenset, _load_build

    def __init__(self, buf, size: int, **kwargs):
        super().__init__(buf, **kwargs)
        self.budget = BUILT_BYTES_PER_BYTE * size + 2**20

    def charge(self, n: int) -> None:
        self.budget -= n
        if self.budget < 0:
            raise ValueError(
                f"its sets, arrays and bytes would take more than {BUILT_BYTES_PER_BYTE} x the pickle's size "
                "(shared parts copied over and over)"
            )

    def find_class(self, module: str, name: str):
        if (module, name) == ("numpy", "ndarray"):
            return _NDARRAY
        fn = _PICKLE_GLOBALS.get((module, name))
        if fn is None:
            raise UnsafePickleError(f"{module}.{name}"[:200])

        # a fresh function per lookup: a BUILD on it (setattr) cannot alter the shared checking functions
        def call(*args):
            out = fn(*args)
            self.charge(out.nbytes if isinstance(out, np.ndarray) else len(out) if hasattr(out, "__len__") else 1)
            return out

        return call


class _Finish:
    """One memoised walk over what the unpickler built: replaces every _PickledArray / _PickledDtype by its
    ndarray / dtype (lists and dicts in place, tuples rebuilt once), refuses nesting deeper than MAX_DEPTH and a
    tree (shared sub-objects counted once per path) larger than `max_nodes`. Each object is visited once."""

    def __init__(self, max_nodes: int):
        self.max_nodes = max_nodes
        self.done: dict[int, tuple[Any, int]] = {}  # id -> (resolved object, tree size); `keep` holds the ids' objects
        self.keep: list = []

    def __call__(self, obj, depth: int = 0):
        kind = type(obj)
        if kind is _PickledArray:
            if obj.array is None:
                raise ValueError("array without its data")
            return obj.array, 1
        if kind is _PickledDtype:
            return obj.dtype, 1
        if kind not in (list, dict, collections.OrderedDict, tuple, set, frozenset):
            return obj, 1
        hit = self.done.get(id(obj))
        if hit is not None:
            return hit
        if depth >= MAX_DEPTH:
            raise ValueError(f"containers nested more than {MAX_DEPTH} deep")
        self.keep.append(obj)
        orig = obj
        self.done[id(obj)] = (obj, 1)  # a cycle back to obj (a list holding itself) counts once
        size = 1
        if kind is list:
            for i, x in enumerate(obj):
                obj[i], n = self(x, depth + 1)
                size += n
        elif kind is tuple:
            parts = [self(x, depth + 1) for x in obj]
            size += sum(n for _, n in parts)
            if any(new is not old for (new, _), old in zip(parts, obj)):
                obj = tuple(new for new, _ in parts)
        elif kind in (dict, collections.OrderedDict):
            size += len(obj)  # keys: scalars (checked when the dict was built)
            for k, v in obj.items():
                obj[k], n = self(v, depth + 1)
                size += n
        else:
            size += len(obj)  # set members: scalars
        if size > self.max_nodes:
            raise ValueError(
                f"its object tree has more than {self.max_nodes} nodes (shared parts counted per use; "
                f"at most {MAX_TREE_NODES} + {TREE_NODES_PER_BYTE} x the pickle's size are read)"
            )
        self.done[id(orig)] = (obj, size)
        return obj, size


def unpickle_data(buf: bytes | memoryview, where: str) -> Any:
    """Plain data (builtin containers, numbers, strings, bytes, numpy arrays/scalars) from a pickle found in a
    downloaded file; anything else is a one-line ValueError naming `where` (UnsafePickleError when the pickle
    asks for a function or class: nothing named in it is called). Python 2 pickles whose str are not ASCII
    are read as latin-1, as numpy advises for them."""
    try:
        size = len(buf) if isinstance(buf, bytes) else memoryview(buf).nbytes
        try:
            obj = _DataUnpickler(io.BytesIO(buf), size).load()
        except UnicodeDecodeError:
            obj = _DataUnpickler(io.BytesIO(buf), size, encoding="latin1").load()
        return _Finish(MAX_TREE_NODES + TREE_NODES_PER_BYTE * size)(obj)[0]
    except UnsafePickleError as e:
        raise UnsafePickleError(
            f"{where}: refused to unpickle: it asks for {e}, which no data file needs (only "
            f"containers, numbers, strings and numpy arrays are read; nothing was run)"
        ) from None
    except (
        pickle.UnpicklingError,
        struct.error,  # Python's pickle machine on a field cut short
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
