"""Trust model (README "Trust model"): no file a user downloads can run code or read outside its root.

Every loader of a downloaded file is fed live payloads (each one, through plain pickle / torch.load(weights_only=False),
creates a marker file: the tests check that first, so a payload that rotted would fail here rather than pass
vacuously) and must refuse them with a one-line error naming the file, the marker never created. Legitimate files of
every real format keep loading exactly as plain pickle / torch.load read them.
"""

import collections
import io
import os
import pickle
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

from _timeouts import scaled

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _configs import UC2_TINY  # noqa: E402
import data  # noqa: E402
from formats import readers  # noqa: E402
from formats import volta_negatives  # noqa: E402
from formats.bad_input import BadInput  # noqa: E402
from formats.features import _close_lmdb, open_features  # noqa: E402
from formats.pickles import UnsafePickleError, unpickle_data  # noqa: E402
from synthetic import fixtures  # noqa: E402
from checks import inventory, preflight  # noqa: E402
from formats import run_folder, torch_files  # noqa: E402
import eval_zeroshot  # noqa: E402
import train_cclm  # noqa: E402
import train_uc2 as U  # noqa: E402
from formats import volta, x2vlm  # noqa: E402

IGLUE = ROOT / "tests" / "fixtures" / "iglue"
TINY = U.resolve_config(UC2_TINY)


# ---------------------------------------------------------------------------------------------------- payloads


class _Reduce:
    """Pickles as a call of `fn(*args)`, which plain pickle performs when loading."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _touch_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def reduce_payloads(marker: Path) -> dict[str, object]:
    """Objects whose unpickling creates `marker` (os.system, exec, eval, subprocess)."""
    return {
        "os_system": _Reduce(os.system, f"touch {marker}"),
        "exec": _Reduce(exec, _touch_code(marker)),
        "eval": _Reduce(eval, _touch_code(marker)),
        "subprocess": _Reduce(subprocess.call, ["touch", str(marker)]),
    }


def _short_str(text: str) -> bytes:  # SHORT_BINUNICODE
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def dotted_gadgets(marker: Path, module: str = "torch._utils", name: str = "_rebuild_tensor.__builtins__.get") -> dict:
    """The demonstrated gadget: a dotted name under an allowed module reaches builtins' exec. Each fragment leaves
    nothing on the stack (POP), so it can be prepended to a real pickle stream."""
    code = _touch_code(marker)
    call = _short_str("exec") + b"\x85R" + _short_str(code) + b"\x85R0"
    return {
        "stack_global_p4": b"\x80\x04" + _short_str(module) + _short_str(name) + b"\x93" + call,
        "global_p4": b"\x80\x04c" + f"{module}\n{name}\n".encode() + call,
        "global_p2": b"\x80\x02c" + f"{module}\n{name}\n".encode() + call,
    }


def all_pickle_payloads(marker: Path) -> dict[str, bytes]:
    out = {
        f"{kind}_p{proto}": pickle.dumps({"features": obj}, protocol=proto)
        for kind, obj in reduce_payloads(marker).items()
        for proto in range(6)
    }
    for module, name in (
        ("torch._utils", "_rebuild_tensor.__builtins__.get"),
        ("numpy.core.multiarray", "_reconstruct.__self__.__builtins__.get"),
        ("collections", "OrderedDict.__init__.__globals__.get"),
    ):
        for form, blob in dotted_gadgets(marker, module, name).items():
            out[f"dotted_{module}_{form}"] = blob + b"N."
    return out


LIVE_IN_PLAIN_PICKLE = {"dotted_torch._utils_stack_global_p4", "dotted_torch._utils_global_p4"}


def assert_live(payload: bytes, marker: Path, name: str) -> None:
    """The payload really runs code under plain pickle (else the refusal tests below would prove nothing)."""
    try:
        pickle.loads(payload)
    except Exception:  # noqa: BLE001 - some gadgets fail after running, or do not resolve in plain pickle
        pass
    if name.startswith(("os_system", "exec", "eval", "subprocess")) or name in LIVE_IN_PLAIN_PICKLE:
        assert marker.exists(), f"payload {name} did not run under plain pickle"
    marker.unlink(missing_ok=True)


def refused(call, where: str, marker: Path, unsafe: bool = True) -> str:
    """call() raises a one-line ValueError naming `where`; the marker was never created."""
    with pytest.raises(ValueError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg and where in msg, msg
    assert not marker.exists(), f"payload ran: {msg}"
    if unsafe:
        assert isinstance(e.value, (UnsafePickleError, torch_files.UnsafeCheckpointError)) or "refused" in msg, msg
    return msg


# ------------------------------------------------------------------------------------------ pickles in data files


def test_unpickle_data_refuses_every_payload_and_names_the_file(tmp_path):
    marker = tmp_path / "marker"
    for name, payload in all_pickle_payloads(marker).items():
        assert_live(payload, marker, name)
        msg = refused(lambda: unpickle_data(payload, "some.lmdb record '42'"), "some.lmdb record '42'", marker)
        assert msg.startswith("some.lmdb record '42': refused to unpickle: it asks for "), (name, msg)


def _forged_numpy_payloads() -> dict[str, bytes]:
    """numpy pickles whose dtype would make numpy read raw bytes as object pointers, or hold objects."""
    forged_state = (3, "<", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 8, 63)
    return {
        "object_array": pickle.dumps(np.array([1, "a"], dtype=object)),
        "forged_dtype": pickle.dumps(_BuildDtype("f4", forged_state), protocol=2),
        "forged_unicode_flags": pickle.dumps(_BuildDtype("U5", (3, "<", None, None, None, 400, 4, 63)), protocol=4),
        "structured": pickle.dumps(np.zeros(2, dtype=[("a", "f4"), ("b", "i8")])),
    }


class _BuildDtype:
    """Pickles as numpy.dtype(spec) followed by a BUILD with a chosen (forged) state."""

    def __init__(self, spec, state):
        self.spec, self.state = spec, state

    def __reduce__(self):
        return np.dtype, (self.spec, False, True), self.state


def test_forged_numpy_dtypes_and_object_arrays_are_refused(tmp_path):
    forged = _forged_numpy_payloads()
    # live check: plain pickle really builds a float32 dtype that claims to hold objects
    evil = pickle.loads(forged["forged_dtype"])
    assert evil.hasobject and evil.kind == "f"
    for name, payload in forged.items():
        refused(lambda: unpickle_data(payload, f"x.pkl ({name})"), f"x.pkl ({name})", tmp_path / "none", unsafe=False)


def _plain_objects() -> dict:
    f32 = np.arange(12, dtype=np.float32).reshape(3, 4)
    return {
        "features": f32,
        "boxes": np.asfortranarray(f32),
        "every_other": f32[::2],
        "big_endian": f32.astype(">f4"),
        "i8": np.arange(5),
        "bool": np.array([True, False]),
        "u": np.array(["ab", "ü"]),
        "s": np.array([b"x", b"yz"]),
        "empty": np.zeros((0, 2048), np.float32),
        "f16": np.ones(3, np.float16),
        "c": np.array([1 + 2j]),
        "img_w": np.int64(500),
        "img_h": np.int32(375),
        "conf": np.float32(0.5),
        "flag": np.bool_(True),
        "img_id": "1000092795",
        "key": b"1000092795",
        "empty_bytes": b"",
        "none": None,
        "float": 1.5,
        "big_int": 2**70,
        "nested": [(1, 2.5), {"a": [b"k"]}],
        "od": collections.OrderedDict(b=1, a=2),
        "set": {1, 2},
        "frozen": frozenset({"a"}),
        "text": "é日本",
    }


def _same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return (
            a.dtype == b.dtype
            and a.shape == b.shape
            and a.strides == b.strides
            and np.array_equal(a, b)
            and a.flags.writeable == b.flags.writeable
        )
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and a == b
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("proto", range(6))
def test_plain_data_pickles_load_exactly_as_pickle_does(proto):
    blob = pickle.dumps(_plain_objects(), protocol=proto)
    ours, theirs = unpickle_data(blob, "x"), pickle.loads(blob)
    assert _same(ours, theirs)
    shared = [np.ones(2)] * 2  # one array referenced twice (pickle memo) stays one array
    got = unpickle_data(pickle.dumps(shared, protocol=proto), "x")
    assert got[0] is got[1]


def test_numpy_1x_module_names_load(tmp_path):
    """Files written under numpy 1.x name numpy.core.multiarray (IGLUE's LMDBs; the fixture LMDBs are such files)."""
    blob = pickle.dumps({"a": np.arange(3.0), "s": np.int64(7)}, protocol=2)
    assert b"numpy._core" in blob
    got = unpickle_data(blob.replace(b"numpy._core", b"numpy.core"), "x")
    assert np.array_equal(got["a"], np.arange(3.0)) and got["s"] == 7
    # a copy: py-lmdb refuses a second handle on an environment another test of this process still holds
    copy = shutil.copytree(ROOT / "tests/fixtures/features/features_fixture.lmdb", tmp_path / "copy.lmdb")
    env = lmdb.open(str(copy), readonly=True, lock=False)
    with env.begin() as txn:
        raw = txn.get(b"1000092795")
    env.close()
    assert b"numpy.core.multiarray" in raw
    assert _same(unpickle_data(raw, "x"), pickle.loads(raw))


def _python2_hard_negatives(pool: np.ndarray, image_ids: list[int]) -> bytes:
    """A protocol-2 pickle as Python 2 + numpy 1.x wrote VOLTA's hard_negative.pkl: py2 `str` (SHORT_BINSTRING)
    raw array bytes and dtype codes, which Python 3 reads only with encoding="latin1"."""

    def bstr(b: bytes) -> bytes:
        return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + len(b).to_bytes(4, "little")) + b

    assert pool.dtype == np.float64 and pool.ndim == 2
    shape = b"K" + bytes([pool.shape[0]]) + b"K" + bytes([pool.shape[1]]) + b"\x86"
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85"
        + bstr(b"b")
        + b"\x87R"
        + b"(K\x01"
        + shape
        + b"cnumpy\ndtype\n"
        + bstr(b"f8")
        + b"K\x00K\x01\x87R"
        + b"(K\x03"
        + bstr(b"<")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        + b"\x89"
        + bstr(pool.tobytes())
        + b"tb"
    )
    ids = b"]" + b"(" + b"".join(b"J" + int(i).to_bytes(4, "little") for i in image_ids) + b"e"
    return b"\x80\x02}(" + bstr(b"train_hard_pool") + array + bstr(b"train_image_list") + ids + b"u."


def test_python2_hard_negative_pickle_loads(tmp_path):
    pool = np.array([[0, 1, 2], [1, 0, 2], [2, 255, 0]], dtype=np.float64)  # 255.0: non-ASCII raw bytes
    blob = _python2_hard_negatives(pool, [11, 22, 33])
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(blob)
    plain = pickle.loads(blob, encoding="latin1")  # what VOLTA's reader got
    path = tmp_path / "hard_negative.pkl"
    path.write_bytes(blob)
    hn = volta_negatives.load_hard_negatives(path)
    assert _same(hn, plain) and np.array_equal(hn["train_hard_pool"], pool) and hn["train_image_list"] == [11, 22, 33]


def _features_with(tmp_path: Path, key: bytes, payload: bytes) -> Path:
    path = fixtures.write_synthetic_features(tmp_path / "feats", ["1", "2"], num_boxes=2)
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(key, payload)
    env.close()
    _close_lmdb(str(path))
    return path


@pytest.mark.parametrize("entry", ["record", "keys"])
def test_feature_lmdb_payloads_never_run(tmp_path, entry):
    marker = tmp_path / "marker"
    for name, payload in all_pickle_payloads(marker).items():
        assert_live(payload, marker, name)
        case = tmp_path / name
        path = _features_with(case, b"1" if entry == "record" else b"keys", payload)
        reader = open_features(path)
        if entry == "record":
            assert "1" in reader
            refused(lambda: reader.get("1"), f"{path}: feature record '1': refused to unpickle", marker)
        else:
            refused(lambda: "1" in reader, f"{path} entry 'keys': refused to unpickle", marker)
        _close_lmdb(str(path))


def _dag_body(levels: int = 60) -> bytes:
    """Pickle opcodes (no PROTO, no STOP) pushing t = (t', t') nested `levels` deep: ~5 bytes a level through the
    memo, 2^levels paths for anything that walks it as a tree."""
    dag = ()
    for _ in range(levels):
        dag = (dag, dag)
    return pickle.dumps(dag, protocol=2)[2:-1]


def _pickle_bombs() -> dict[str, tuple[bytes, str]]:
    """name -> (a small pickle that hangs or exhausts memory when read as a tree, what the refusal says)."""
    dag = _dag_body()
    numbers = pickle.dumps(list(range(30_000)), protocol=2)[2:-1]
    array = pickle.dumps(np.zeros(1), protocol=2)[2:-1]  # its memo entries are overwritten by the DAG's, once used
    return {
        "dag_with_an_array": (b"\x80\x02]" + array + b"a" + dag + b"a.", "object tree has more than"),
        "dag_as_dict_key": (b"\x80\x02}" + dag + b"K\x01s.", "a dict key of type tuple"),
        "dag_in_a_set": (b"\x80\x02c__builtin__\nset\n]" + dag + b"a\x85R.", "a set member of type tuple"),
        "dag_in_an_error_message": (
            b"\x80\x02cnumpy.core.numeric\n_frombuffer\n(C\x00cnumpy\ndtype\nU\x02f4\x85R" + dag + b"U\x01CtR.",
            "array shape ((((...)",
        ),
        "nested_100k_deep": (b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b".", "nested more than 64 deep"),
        "one_list_copied_30k_times": (
            b"\x80\x02" + numbers + b"r\x00\x00\x00\x00" + b"c__builtin__\nset\nh\x00\x85R0" * 30_000 + b"N.",
            "would take more than 4 x the pickle's size",
        ),
    }


@pytest.mark.parametrize("name", list(_pickle_bombs()))
def test_pickle_bombs_are_refused_in_linear_time(tmp_path, name):
    """A few hundred bytes that, walked as a tree, never end (2^60 paths through the memo), recurse 100k deep or
    copy one list 30,000 times: refused in well under a second, one line naming the file, whatever reads it. The
    read runs in a subprocess with a deadline: without the bounds it hangs."""
    blob, expected = _pickle_bombs()[name]
    path = tmp_path / "hard_negative.pkl"
    path.write_bytes(blob)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from formats.pickles import read_pickle\n"
        "try: read_pickle(sys.argv[2]); print('read')\nexcept ValueError as e: print(e)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(ROOT), str(path)], capture_output=True, text=True, timeout=scaled(20)
    )
    msg = proc.stdout.strip()
    assert proc.returncode == 0 and msg.startswith(f"{path}: not a readable pickle of plain data"), (proc.stderr, msg)
    assert expected in msg and "\n" not in msg and len(msg) < 500, msg


def test_feature_record_errors_show_untrusted_values_shortened(tmp_path):
    """A record whose img_w is a list of 100,000 numbers: the error shows 200 characters of it, not 600 KB."""
    record = {"features": np.zeros((2, 2048), np.float32), "boxes": np.zeros((2, 4), np.float32)}
    path = _features_with(tmp_path, b"1", pickle.dumps({**record, "img_w": list(range(100_000)), "img_h": 5}))
    with pytest.raises(ValueError) as e:
        open_features(path).get("1")
    msg = str(e.value)
    assert msg.startswith(f"{path}: feature record '1': img_w is [0, 1, 2, 3, 4, 5, ...]") and len(msg) < 400, msg
    _close_lmdb(str(path))


def test_torch_zip_that_unpacks_far_beyond_its_size_is_refused(tmp_path):
    """A torch file recompressed with deflate: ~100 KB on disk, 100 MB unpacked (torch allocates what the zip's
    entries declare). Refused before unpacking, by read_torch_file and so by every reader of checkpoints."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(25_000_000)}, buf)
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    del buf
    size = path.stat().st_size
    assert size < 1_000_000
    expected = f"{path}: its zip entries declare 100000"  # 100,000,000 bytes of weights + torch's small records
    for read in (
        torch_files.read_torch_file,
        torch_files.load_checkpoint,
        volta.read_checkpoint,
        x2vlm.read_checkpoint,
    ):
        with pytest.raises(torch_files.OversizedFileError) as e:
            read(str(path))
        msg = str(e.value)
        assert msg.startswith(expected) and f"its {size} bytes" in msg and "\n" not in msg, msg


@pytest.mark.parametrize("case", ["length_2_62", "length_past_the_end"])
def test_safetensors_header_length_beyond_the_file_is_refused(tmp_path, case):
    """The 8-byte header length of a .safetensors file is checked against the file before anything is read; the
    refusal is one ValueError line naming the file (the library's own error is not a ValueError: a traceback)."""
    path = tmp_path / "model.safetensors"
    length = 2**62 if case == "length_2_62" else 1000
    path.write_bytes(length.to_bytes(8, "little") + b"{}")
    for read in (volta.read_checkpoint, torch_files.read_safetensors):
        with pytest.raises(torch_files.OversizedFileError) as e:
            read(str(path))
        msg = str(e.value)
        assert msg.startswith(
            f"{path}: safetensors header length {length} bytes is past the end of the file (10 bytes)"
        )
        assert "\n" not in msg, msg


@pytest.mark.system
def test_feature_inventory_cli_refuses_a_payload(tmp_path):
    """`python -m checks.inventory --features ...`, the README's first command on a download."""
    marker = tmp_path / "marker"
    payload = dotted_gadgets(marker)["stack_global_p4"] + b"N."
    assert_live(payload, marker, "dotted_torch._utils_stack_global_p4")
    path = _features_with(tmp_path, b"keys", payload)
    proc = subprocess.run(
        [sys.executable, "-m", "checks.inventory", "--data-root", str(IGLUE), "--features", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=scaled(240),
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and last.startswith("error: ") and f"{path} entry 'keys': refused" in last, proc.stderr
    assert "Traceback" not in proc.stderr and not marker.exists()


def test_hard_negative_and_vocabulary_pickles_never_run(tmp_path):
    marker = tmp_path / "marker"
    ann = tmp_path / "root" / "datasets" / "gqa" / "annotations"
    ann.mkdir(parents=True)
    label2ans = ["yes", "no"]
    for name, payload in all_pickle_payloads(marker).items():
        assert_live(payload, marker, name)
        hn = tmp_path / "hard_negative.pkl"
        hn.write_bytes(payload)
        refused(lambda: volta_negatives.load_hard_negatives(hn), f"{hn}: refused to unpickle", marker)
        (ann / "trainval_ans2label.pkl").write_bytes(pickle.dumps({"yes": 0, "no": 1}))
        (ann / "trainval_label2ans.pkl").write_bytes(payload)
        refused(lambda: data.load_answer_vocab(tmp_path / "root"), f"{ann / 'trainval_label2ans.pkl'}: refused", marker)
    (ann / "trainval_label2ans.pkl").write_bytes(pickle.dumps(label2ans, protocol=0))
    assert data.load_answer_vocab(tmp_path / "root") == ({"yes": 0, "no": 1}, label2ans)


# ------------------------------------------------------------------------------------------ torch files


def _write_zip_with_prefix(src: Path, dst: Path, prefix: bytes) -> None:
    """`src`, a torch zip checkpoint, with `prefix` prepended to its data.pkl (every other record unchanged)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            blob = zin.read(info.filename)
            zout.writestr(info.filename, prefix + blob if info.filename.endswith("/data.pkl") else blob)


def _live_torch(path: Path, marker: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.load(path, weights_only=False)
        except Exception:  # noqa: BLE001 - some payloads fail after running
            pass
    assert marker.exists(), f"{path.name} did not run under torch.load(weights_only=False)"
    marker.unlink()


def _readers(path: Path) -> dict:
    return {
        "formats.volta.read_checkpoint": lambda: volta.read_checkpoint(str(path)),
        "formats.volta.load_into": lambda: volta.load_into(U.build_model("xgqa", TINY), str(path)),
        "formats.x2vlm.read_checkpoint": lambda: x2vlm.read_checkpoint(str(path)),
        "formats.torch_files.load_checkpoint": lambda: torch_files.load_checkpoint(path),
        "eval_zeroshot.load_meta": lambda: eval_zeroshot.load_meta(path),
    }


def _volta_state_dict() -> dict:
    return {k: torch.zeros(s) for k, s in (("bert.embeddings.word_embeddings.weight", (4, 2)), ("x.bias", (2,)))}


def test_checkpoint_payloads_never_run(tmp_path):
    marker = tmp_path / "marker"
    files = {}
    for kind, obj in reduce_payloads(marker).items():
        for proto in (2, 4, 5):
            path = tmp_path / f"{kind}_p{proto}.pt"
            torch.save({"model_state_dict": _volta_state_dict(), "tb_logger": obj}, path, pickle_protocol=proto)
            files[path] = True
    real = tmp_path / "real.bin"
    torch.save(_volta_state_dict(), real)
    for form, gadget in dotted_gadgets(marker).items():
        path = tmp_path / f"gadget_{form}.bin"
        _write_zip_with_prefix(real, path, gadget)
        files[path] = form != "global_p2"  # protocol 2 does not follow dotted names: not live, still refused
    for path, live in files.items():
        if live:
            _live_torch(path, marker)
        for reader, call in _readers(path).items():
            msg = refused(call, str(path), marker)
            assert "refused to load" in msg, (reader, msg)


def test_gadget_in_an_xlm_roberta_folder_never_runs(tmp_path):
    marker = tmp_path / "marker"
    folder = tmp_path / "xlm-roberta-base"
    folder.mkdir()
    torch.save(_volta_state_dict(), tmp_path / "real.bin")
    _write_zip_with_prefix(tmp_path / "real.bin", folder / "pytorch_model.bin", dotted_gadgets(marker)["global_p4"])
    _live_torch(folder / "pytorch_model.bin", marker)
    refused(lambda: volta.read_checkpoint(str(folder)), str(folder / "pytorch_model.bin"), marker)


def test_checkpoint_cli_refuses_a_payload_before_writing(tmp_path):
    marker = tmp_path / "marker"
    ckpt = tmp_path / "pytorch_model_best.bin"
    torch.save(_volta_state_dict(), tmp_path / "real.bin")
    _write_zip_with_prefix(tmp_path / "real.bin", ckpt, dotted_gadgets(marker)["stack_global_p4"])
    train = data.load_split(IGLUE, "xvnli", "train_48", "en")
    fixtures.make_tiny_tokenizer([e.text for e in train], tmp_path / "tok", vocab_size=300)
    feats = fixtures.write_synthetic_features(tmp_path / "feats", {e.image for e in train}, num_boxes=2)
    (tmp_path / "images").mkdir()
    common = [
        "--task",
        "xvnli",
        "--data-root",
        str(IGLUE),
        "--tokenizer",
        str(tmp_path / "tok"),
        "--train-split",
        "train_48",
        "--langs",
        "en",
        "--checkpoint",
        str(ckpt),
    ]
    for name, main, extra in (
        ("uc2", U.main, ["--model-config", UC2_TINY, "--features", str(feats)]),
        ("cclm", train_cclm.main, ["--images", str(tmp_path / "images")]),
    ):
        out = tmp_path / f"run_{name}"
        with pytest.raises(SystemExit) as e:
            main(common + extra + ["--output-dir", str(out)])
        msg = str(e.value)
        assert msg.startswith(f"error: --checkpoint: {ckpt}: refused to load: ") and "\n" not in msg, msg
        assert not marker.exists()
        assert not any((out / f).exists() for f in run_folder.RUN_FILES)


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_iglue_training_checkpoint_loads_with_volta_state(tmp_path, layout):
    """pytorch_ckpt_latest.tar as VOLTA's train_utils.save writes it (tbLogger's __getstate__ dict, AdamW state
    after a step, the warm-up scheduler's state), read without VOLTA installed; the logger stays inert data.
    "legacy": the pre-1.6 torch file layout, in case a released file predates the zip format."""
    sd = _volta_state_dict()
    params = [torch.nn.Parameter(torch.ones(2))]
    opt = torch.optim.AdamW(params, lr=2e-5, eps=1e-6, betas=(0.9, 0.999))
    params[0].grad = torch.ones(2)
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    tb_state = {
        "save_logger": True,
        "log_dir": "logs/x",
        "txt_dir": "save/x",
        "task_id2name": {"TASK15": "GQA"},
        "task_ids": ["TASK15"],
        "task_loss": {"TASK15": 1.25},
        "task_num_iters": {"TASK15": 100},
        "epochId": 3,
        "gradient_accumulation_steps": 4,
        "task_score_val": {"TASK15": 0.5},
    }
    fake_volta = _volta_tblogger_module()
    try:
        logger = fake_volta.tbLogger()
        logger.__dict__.update(tb_state, logger="SummaryWriter", txt_f="file")
        torch.save(
            {
                "model_state_dict": sd,
                "optimizer_state_dict": opt.state_dict(),
                "scheduler_state_dict": sched.state_dict(),
                "global_step": 10,
                "epoch_id": 3,
                "tb_logger": logger,
                "score": 0.5,
            },
            tmp_path / "pytorch_ckpt_latest.tar",
            _use_new_zipfile_serialization=layout == "zip",
        )
    finally:
        del sys.modules["volta"], sys.modules["volta.train_utils"]
    with pytest.raises(pickle.UnpicklingError):  # what plain weights-only torch.load says about it
        torch.load(tmp_path / "pytorch_ckpt_latest.tar", weights_only=True)
    state, extra = volta.read_checkpoint(str(tmp_path / "pytorch_ckpt_latest.tar"))
    assert all(torch.equal(state[k], sd[k]) for k in sd) and extra["epoch_id"] == 3 and extra["score"] == 0.5
    assert type(extra["tb_logger"]) is torch_files.VoltaTbLogger and extra["tb_logger"].state == tb_state
    assert extra["optimizer_state_dict"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(extra["optimizer_state_dict"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def _volta_tblogger_module():
    """A module named volta.train_utils with a tbLogger whose __getstate__ drops its writer and file, as VOLTA's."""
    import types

    mod = types.ModuleType("volta.train_utils")

    class tbLogger:  # noqa: N801  (VOLTA's name)
        def __getstate__(self):
            d = dict(self.__dict__)
            del d["logger"], d["txt_f"]
            return d

    tbLogger.__module__, tbLogger.__qualname__ = "volta.train_utils", "tbLogger"
    mod.tbLogger = tbLogger
    sys.modules["volta"], sys.modules["volta.train_utils"] = types.ModuleType("volta"), mod
    return mod


# ------------------------------------------------------------------------------------------ images


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A 1x1 PNG whose header claims width x height (PIL reads only the header on open)."""
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    blob = bytearray(buf.getvalue())
    ihdr = blob.index(b"IHDR")
    blob[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    blob[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(blob[ihdr : ihdr + 17])))
    path.write_bytes(bytes(blob))
    return path


def test_decompression_bombs_are_refused_before_decoding(tmp_path):
    over = tmp_path / "over.png"  # a real image just over the cap: decodes (to 144 MB RGB) if the cap is gone
    Image.new("1", (8000, 6000)).save(over)
    assert os.path.getsize(over) < 200_000 and 8000 * 6000 > readers.IMAGE_MAX_PIXELS
    huge = _png_declaring(tmp_path / "huge.png", 30_000, 30_000)  # the probe's size: PIL's own backstop fires
    for path in (over, huge):
        with pytest.raises(ValueError) as e:
            readers.load_image(path)
        msg = str(e.value)
        assert msg.startswith(f"image file {path}: refused as a decompression bomb (") and "\n" not in msg, msg
    (tmp_path / "images" / "flickr30k").mkdir(parents=True)
    ex = data.load_split(IGLUE, "xvnli", "test", "en")[0]
    os.replace(over, tmp_path / "images" / ex.image_file)
    with pytest.raises(ValueError, match=rf"decompression bomb .*\(referenced by XVNLI/annotations/en/test.jsonl:1, "):
        data.CCLMDataset([ex], tmp_path / "images", "xvnli", image_res=32)[0]
    assert Image.MAX_IMAGE_PIXELS == readers.IMAGE_MAX_PIXELS  # PIL's own guard stays on for every other reader


def _annotation_root(tmp_path: Path, xflickrco_path: str, xvnli_id: str, gqa_image: str) -> Path:
    ds = tmp_path / "root" / "datasets"
    (ds / "xFlickrCO" / "annotations" / "en").mkdir(parents=True)
    (ds / "xFlickrCO" / "annotations" / "en" / "test.jsonl").write_text(
        '{"sentences": ["a dog"], "id": "1", "img_path": "1.jpg"}\n'
        f'{{"sentences": ["a cat"], "id": "2", "img_path": "{xflickrco_path}"}}\n'
    )
    (ds / "XVNLI" / "annotations" / "en").mkdir(parents=True)
    (ds / "XVNLI" / "annotations" / "en" / "test.jsonl").write_text(
        '{"gold_label": "neutral", "sentence2": "x", "pairID": "p1", "Flikr30kID": "1"}\n'
        f'{{"gold_label": "neutral", "sentence2": "y", "pairID": "p2", "Flikr30kID": "{xvnli_id}"}}\n'
    )
    (ds / "gqa" / "annotations").mkdir(parents=True)
    for f in ("trainval_ans2label.json", "trainval_label2ans.json"):
        (ds / "gqa" / "annotations" / f).write_bytes((IGLUE / "datasets" / "gqa" / "annotations" / f).read_bytes())
    (ds / "gqa" / "annotations" / "testdev.json").write_text(
        f'[{{"img_id": "1", "label": {{"no": 1.0}}, "question_id": "q1", "sent": "a?"}}, '
        f'{{"img_id": "{gqa_image}", "label": {{"no": 1.0}}, "question_id": "q2", "sent": "b?"}}]'
    )
    return tmp_path / "root"


@pytest.mark.parametrize("how", ["dotdot", "absolute"])
def test_image_paths_from_annotations_stay_inside_the_image_root(tmp_path, how):
    images = tmp_path / "images"
    fixtures.write_synthetic_images(images, ["flickr30k/1.jpg", "gqa/1.jpg"], size=(16, 12))
    outside = fixtures.write_synthetic_images(tmp_path, ["outside.jpg"], size=(16, 12))[0]  # a real image out there
    (images / "flickr30k" / "1.x").mkdir()  # XVNLI ids must start "<int>.": climbing out needs a folder there
    if how == "dotdot":
        root = _annotation_root(tmp_path, "../../outside.jpg", "1.x/../../../outside", "../../outside")
    else:  # (an XVNLI id cannot be absolute: int(id.split(".")[0]) must parse)
        root = _annotation_root(tmp_path, str(outside), "1.x/../../../outside", str(outside.with_suffix("")))
    for task, split, rel in (
        ("xflickrco", "test", "xFlickrCO/annotations/en/test.jsonl:2"),
        ("xvnli", "test", "XVNLI/annotations/en/test.jsonl:2"),
        ("xgqa", "testdev", "gqa/annotations/testdev.json item 1"),
    ):
        exs = data.load_split(root, task, split, "en")
        bad = next(e for e in exs if e.source == rel)
        assert os.path.samefile(os.path.join(images, *bad.image_file.split("/", 1)), outside), (
            "the unconfined path would reach the image"
        )
        for call in (
            lambda: preflight.check_inputs(exs, images=images),
            lambda: data.CCLMDataset(exs, images, task, image_res=32)[exs.index(bad)],
        ):
            with pytest.raises(ValueError) as e:
                call()
            msg = str(e.value)
            assert (
                msg.startswith(
                    f"image path {bad.image_file.partition('/')[2]!r} is not a file inside the image folder "
                )
                and f"(referenced by {rel}, example {bad.id})" in msg
            ), msg
        assert data.CCLMDataset(exs, images, task, image_res=32)[0]["pixels"].shape == (32, 32, 3)


@pytest.mark.parametrize("fmt", ["EPS", "GIF"])
def test_images_in_other_formats_are_refused_by_verify_the_pre_check_and_the_loader(tmp_path, capsys, fmt):
    """An EPS (PIL would run Ghostscript on it) or GIF file named .jpg: JPEG and PNG are the formats IGLUE's images
    come in, and the one rule (formats.readers.open_photo) refuses anything else, unparsed, in all three places."""
    exs = data.load_split(IGLUE, "xvnli", "test", "en")
    images = tmp_path / "images"
    files = sorted({e.image_file for e in exs})
    paths = fixtures.write_synthetic_images(images, files, size=(16, 12))
    Image.new("RGB", (8, 8)).save(paths[0], fmt)
    bad = next(e for e in exs if e.image_file == files[0])
    expected = (
        f"image file {paths[0]} is corrupt or not an image (UnidentifiedImageError: cannot identify image file as "
        f"JPEG or PNG: its header is {fmt}'s, a format that is never parsed) (referenced by {bad.source}, example "
    )
    with pytest.raises(BadInput) as e:
        preflight.check_inputs(exs, images=images, sample=None)
    assert str(e.value).startswith(expected) and str(e.value).endswith(
        f"; 1 of {len(files)} images checked are bad (python -m checks.inventory --verify lists them all)"
    ), e.value
    with pytest.raises(BadInput) as e:
        data.CCLMDataset([bad], images, "xvnli", image_res=32)[0]
    assert str(e.value).startswith(expected), e.value
    assert inventory.main(["--data-root", str(IGLUE), "--images", str(images), "--verify"]) == 1
    out = capsys.readouterr().out
    bad_lines = [line for line in out.splitlines() if line.startswith("bad: ")]
    assert len(bad_lines) == 1 and bad_lines[0].startswith(f"bad: {expected[: expected.index('(referenced by')]}"), out


@pytest.mark.parametrize("how", ["external_storage", "virtual_dataset", "external_link", "soft_link_outside"])
def test_h5_features_that_point_outside_their_file_are_refused(tmp_path, capsys, how):
    """An HDF5 feature file whose dataset keeps its bytes in another file (external storage: any file, read as
    features), maps them from one (a virtual dataset) or links to one: refused by the reader, so by the
    pre-check and --verify too, naming the file, the record and the dataset."""
    import h5py

    exs = data.load_split(IGLUE, "xvnli", "test", "en")
    keys = sorted({e.image for e in exs})
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.bin"
    secret.write_bytes(np.arange(4 * 2048, dtype=np.float32).tobytes())
    with h5py.File(outside / "other.h5", "w") as f:
        f["x"] = np.ones((4, 2048), np.float32)
    h5 = tmp_path / "feats.h5"
    with h5py.File(h5, "w") as f:
        for key in keys:
            g = f.create_group(key)
            if key != keys[0]:
                g["features"] = np.ones((4, 2048), np.float32)
            elif how == "external_storage":
                g.create_dataset("features", (4, 2048), np.float32, external=[(str(secret), 0, 4 * 2048 * 4)])
            elif how == "virtual_dataset":
                layout = h5py.VirtualLayout((4, 2048), np.float32)
                layout[:] = h5py.VirtualSource(str(outside / "other.h5"), "x", (4, 2048))
                g.create_virtual_dataset("features", layout)
            elif how == "external_link":
                g["features"] = h5py.ExternalLink(str(outside / "other.h5"), "/x")
            else:  # a link inside the file that resolves through an external one
                f["elsewhere"] = h5py.ExternalLink(str(outside / "other.h5"), "/")
                g["features"] = h5py.SoftLink("/elsewhere/x")
            g["boxes"] = np.array([[0, 0, 5, 5]] * 4, np.float32)
            g["img_w"], g["img_h"] = 10, 10
    tail = {
        "external_storage": f"external storage in {str(secret)!r}",
        "virtual_dataset": f"a virtual dataset mapped from {str(outside / 'other.h5')!r}",
        "external_link": f"an external link to {str(outside / 'other.h5')!r}:'/x'",
        "soft_link_outside": f"a link into {str(outside / 'other.h5')!r}",
    }[how]
    expected = (
        f"{h5}: feature record {keys[0]!r}: dataset 'features' lies outside this file ({tail}); refused: feature "
        "files are read only for their own data"
    )
    with pytest.raises(BadInput) as e:
        open_features(h5).get(keys[0])
    assert str(e.value) == expected
    assert open_features(h5).get(keys[1])[0].shape == (4, 2048)
    with pytest.raises(BadInput) as e:
        preflight.check_inputs(exs, features=str(h5), sample=None)
    assert str(e.value).startswith(expected + " (referenced by XVNLI/annotations/en/test.jsonl:"), e.value
    assert inventory.main(["--data-root", str(IGLUE), "--features", str(h5), "--verify"]) == 1
    out = capsys.readouterr().out
    bad = [line for line in out.splitlines() if line.startswith("bad: ")]
    assert f"bad: {expected}" in bad and len(bad) == 1 + (how == "soft_link_outside"), out  # + the link's own entry


def test_images_in_non_photo_formats_are_not_parsed(tmp_path):
    """PIL hands EPS to Ghostscript (an external program): load_image opens photo formats only."""
    (tmp_path / "images" / "flickr30k").mkdir(parents=True)
    ex = data.load_split(IGLUE, "xvnli", "test", "en")[0]
    path = tmp_path / "images" / ex.image_file
    Image.new("RGB", (8, 8)).save(path, "EPS")
    with Image.open(path) as img:
        assert img.format == "EPS"  # plain PIL would take it (and run Ghostscript to decode it)
    with pytest.raises(ValueError) as e:
        data.CCLMDataset([ex], tmp_path / "images", "xvnli", image_res=32)[0]
    msg = str(e.value)
    assert msg.startswith(f"image file {path} is corrupt or not an image (UnidentifiedImageError: ") and "\n" not in msg
    for fmt in ("JPEG", "PNG"):
        Image.new("RGB", (8, 8)).save(path, fmt)
        assert data.CCLMDataset([ex], tmp_path / "images", "xvnli", image_res=32)[0]["pixels"].shape == (32, 32, 3)
