"""Bad-input catalogue (docs/bad_input.md, pasted into the README): every way the inputs can be wrong, what
the user sees (one line naming the file / line / key) and proof that nothing already written was lost or
overwritten. Rows already covered elsewhere (tests/test_data.py, tests/test_engine.py) are listed in the
table with those tests; test_catalogue_matches_the_tests keeps the table and the tests in sync.

The trainer rows run train_uc2's real CLI (in-process main(argv); the real script in a subprocess where a
crash would take pytest down, or where the exact terminal output matters) with the tiny config, the IGLUE
sample, a tiny tokenizer and synthetic region features. Most of them resume a "paused" run (epoch 1 of 2
done) with the bad input, and check that its folder is byte-identical afterwards.
"""

import argparse
import base64
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _timeouts import scaled

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _configs import CCLM_TINY, UC2_TINY  # noqa: E402
import _faults  # noqa: E402
import data  # noqa: E402
from training import loaders  # noqa: E402
from formats.features import open_features  # noqa: E402
from formats.bad_input import BadInput  # noqa: E402
from synthetic import fixtures  # noqa: E402
from checks import inventory  # noqa: E402
from checks import preflight  # noqa: E402
import scoring.metrics  # noqa: E402
from formats import run_folder, tokenizer_check, torch_files  # noqa: E402
import train_cclm  # noqa: E402
import train_uc2 as U  # noqa: E402
import _serialized_lmdb as serialized_lmdb  # noqa: E402
from formats import nlvr2_serialized  # noqa: E402

IGLUE = ROOT / "tests" / "fixtures" / "iglue"
CATALOGUE = ROOT / "docs" / "bad_input.md"
XVNLI_EN = "XVNLI/annotations/en"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(env: dict, out: Path, *extra: str, features=None, root=IGLUE, tokenizer=None) -> list[str]:
    return [
        "--task",
        "xvnli",
        "--model-config",
        UC2_TINY,
        "--data-root",
        str(root),
        "--features",
        str(features or env["feats"]),
        "--tokenizer",
        str(tokenizer or env["tok"]),
        "--train-split",
        "train_48",
        "--eval-split",
        "test",
        "--langs",
        "en",
        "--max-regions",
        "4",
        "--num-workers",
        "0",
        "--batch-size",
        "8",
        "--epochs",
        "2",
        "--max-steps-per-epoch",
        "1",
        "--output-dir",
        str(out),
        *extra,
    ]


def fails(argv: list[str]) -> str:
    """train_uc2.main(argv) must stop with a one-line 'error: ...' (SystemExit, no traceback)."""
    with pytest.raises(SystemExit) as e:
        U.main(argv)
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def resume_fails(env: dict, **kw) -> str:
    """Resume the paused run with a bad input: one-line error, and the run folder byte-identical."""
    msg = fails(cli(env, env["paused"], "--resume", **kw))
    assert snapshot(env["paused"]) == env["paused_files"]
    return msg


def assert_nothing_written(out: Path) -> None:
    assert not any((out / f).exists() for f in run_folder.RUN_FILES), sorted(os.listdir(out))


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def env(tmp_path_factory, system_tests_run):
    base = tmp_path_factory.mktemp("bad_input")
    train = data.load_split(IGLUE, "xvnli", "train_48", "en")
    test = data.load_split(IGLUE, "xvnli", "test", "en")
    fixtures.make_tiny_tokenizer([e.text for e in train + test], base / "tok", vocab_size=300)
    fixtures.write_synthetic_features(base / "feats", {e.image for e in train + test}, num_boxes=4)
    env = {
        "base": base,
        "tok": base / "tok",
        "feats": base / "feats",
        "paused": base / "paused",
        "train": train,
        "test": test,
    }
    with _faults.injected("raise:epoch_end:1"):  # stop after epoch 1's checkpoint, as a killed run would
        with pytest.raises(RuntimeError, match="SUF_FAULT"):
            U.main(cli(env, env["paused"], "--no-eval"))
    env["paused_files"] = snapshot(env["paused"])
    assert sorted(env["paused_files"]) == ["args.json", "checkpoint_last.pt", "metrics.jsonl"]

    truncated = base / "feats_truncated"  # an interrupted copy: data.mdb cut in half
    shutil.copytree(base / "feats", truncated)
    os.truncate(truncated / "data.mdb", (truncated / "data.mdb").stat().st_size // 2)
    env["truncated"], env["truncated_files"] = truncated, snapshot(truncated)

    if not system_tests_run:  # -m "not system": the tests that collect them do not run
        yield env
        return
    # The real CLIs in subprocesses, started now and collected by their tests (torch start-up is slow here).
    # A resuming process writes a probe file into its run folder: give it its own copy of the paused run.
    shutil.copytree(env["paused"], base / "paused_lmdb")
    sub_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    script = [sys.executable, str(ROOT / "train_uc2.py")]
    env["procs"] = {
        "truncated_lmdb": subprocess.Popen(
            script + cli(env, base / "paused_lmdb", "--resume", features=truncated),
            env=sub_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ),
        "truncated_lmdb_inventory": subprocess.Popen(
            [sys.executable, "-m", "checks.inventory", "--data-root", str(IGLUE), "--features", str(truncated)],
            env=sub_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ),
        "existing_run": subprocess.Popen(
            script + cli(env, env["paused"]), env=sub_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ),
    }
    yield env
    for p in env["procs"].values():
        if p.poll() is None:
            p.kill()


def finished(env: dict, name: str) -> tuple[int, str]:
    proc = env["procs"][name]
    _, err = proc.communicate(timeout=scaled(240))
    return proc.returncode, err


# ------------------------------------------------------------------------------------------ images (CCLM)


def test_missing_image_fails_fast(env, tmp_path):
    images = tmp_path / "images"
    files = [e.image_file for e in env["test"]]
    fixtures.write_synthetic_images(images, files, size=(16, 12))
    gone = images / env["test"][3].image_file
    gone.unlink()
    before = snapshot(images)
    with pytest.raises(ValueError) as e:
        preflight.check_inputs(env["test"], images=images)
    msg = str(e.value)
    assert "\n" not in msg and f"image file {gone} not found (referenced by {XVNLI_EN}/test.jsonl:" in msg
    assert msg.endswith(f"1 of {len(set(files))} images missing")
    assert snapshot(images) == before


def test_corrupt_image_names_the_file(env, tmp_path):
    images = tmp_path / "images"
    first = env["test"][0]
    exs = [first] + [next(e for e in env["test"] if e.image != first.image)] * 2  # two images
    paths = fixtures.write_synthetic_images(images, [e.image_file for e in exs[:2]], size=(160, 120))
    jpeg = paths[1].read_bytes()
    paths[0].write_bytes(b"this is not a JPEG")
    for case, (path, content) in {
        "not_an_image": (paths[0], None),
        "header_cut": (paths[1], jpeg[:150]),
        "body_cut": (paths[1], jpeg[: len(jpeg) * 3 // 4]),
    }.items():
        if content is not None:
            path.write_bytes(content)
        before = snapshot(images)
        ds = data.CCLMDataset(exs, images, "xvnli", image_res=32)
        if case == "body_cut":  # decodes, the missing part grey (ImageFile.LOAD_TRUNCATED_IMAGES, as X2-VLM)
            assert ds[1]["pixels"].shape == (32, 32, 3)
        else:
            with pytest.raises(ValueError) as e:
                ds[0 if case == "not_an_image" else 1]
            msg = str(e.value)
            assert (
                "\n" not in msg
                and msg.startswith(f"image file {path} is corrupt or not an image (")
                and f"(referenced by {XVNLI_EN}/test.jsonl:" in msg
            ), (case, msg)
        assert snapshot(images) == before


# ------------------------------------------------------------------------------------------ region features (UC2)


@pytest.mark.system
def test_truncated_lmdb_is_one_line_error_not_a_crash(env):
    data_mdb = env["truncated"] / "data.mdb"
    for name, prefix in (("truncated_lmdb", "error: --features: "), ("truncated_lmdb_inventory", "error: ")):
        rc, err = finished(env, name)
        assert rc == 1, (name, rc, err[-2000:])  # not -7 (SIGBUS from reading the mmap past its end)
        assert re.fullmatch(
            re.escape(f"{prefix}{data_mdb}: LMDB file is truncated (") + r".* bytes, its header needs .*\)"
            r"; copy or download it again",
            last_line(err),
        ), err[-2000:]
    assert snapshot(env["truncated"]) == env["truncated_files"]  # opened read-only, lock-free
    assert snapshot(env["base"] / "paused_lmdb") == env["paused_files"]


@pytest.mark.parametrize("case", ["truncated_h5", "not_h5"])
def test_corrupt_h5_features_are_one_line_error(env, tmp_path, case):
    h5 = tmp_path / "features.h5"
    real = (ROOT / "tests" / "fixtures" / "features" / "features_fixture.h5").read_bytes()
    h5.write_bytes(real[:5000] if case == "truncated_h5" else b"not an HDF5 file")
    before = h5.read_bytes()
    msg = fails(cli(env, tmp_path / "run", features=h5))
    assert re.fullmatch(
        re.escape(f"error: --features: {h5}: cannot open as HDF5 (") + r".+\); copy or download it again", msg
    ), msg
    assert h5.read_bytes() == before
    assert_nothing_written(tmp_path / "run")


def test_missing_feature_key_fails_before_training(env, tmp_path):
    train_keys = {e.image for e in env["train"]}
    eval_only = sorted({e.image for e in env["test"]} - train_keys)
    for name, drop, where, split in (
        ("train", sorted(train_keys)[0], "training data", "train_48"),
        ("eval", eval_only[0], "evaluation data", "test"),
    ):
        feats = fixtures.write_synthetic_features(
            tmp_path / name, ({e.image for e in env["train"] + env["test"]} - {drop}), num_boxes=4
        )
        msg = resume_fails(env, features=feats)
        assert re.fullmatch(
            re.escape(
                f"error: {where}: feature key '{drop}' not found in {feats} (referenced by {XVNLI_EN}/{split}.jsonl:"
            )
            + r"\d+, example .*\); 1 of \d+ images missing",
            msg,
        ), msg


# ------------------------------------------------------------------------------------------ annotations


def _annotation_root(tmp_path: Path, text: str) -> Path:
    root = tmp_path / "iglue"
    shutil.copytree(IGLUE / "datasets" / "XVNLI", root / "datasets" / "XVNLI")
    (root / "datasets" / XVNLI_EN / "train_48.jsonl").write_text(text)
    return root


@pytest.mark.parametrize("case", ["malformed_line", "empty_file", "unknown_label"])
def test_bad_annotation_file(env, tmp_path, case):
    lines = (IGLUE / "datasets" / XVNLI_EN / "train_48.jsonl").read_text().splitlines()
    bad = json.loads(lines[1])
    bad["gold_label"] = "maybe"
    text, expected = {
        "malformed_line": ("\n".join(lines[:2] + ['{"gold_label": ']), r"train_48\.jsonl:3: malformed JSON line"),
        "empty_file": ("\n", r"train_48\.jsonl: annotation file is empty"),
        "unknown_label": ("\n".join([lines[0], json.dumps(bad)]), r"train_48\.jsonl:2: unknown gold_label 'maybe'"),
    }[case]
    root = _annotation_root(tmp_path, text)
    before = snapshot(root)
    msg = resume_fails(env, root=root)
    assert msg.startswith("error: training data: ") and re.search(expected, msg), msg
    assert snapshot(root) == before


@pytest.mark.parametrize("case", ["missing_root", "no_datasets_folder", "missing_features"])
def test_wrong_data_root(env, tmp_path, case):
    if case == "missing_root":
        msg = resume_fails(env, root=tmp_path / "nope")
        assert (
            msg == f"error: training data: data root {tmp_path / 'nope'} does not exist (expected an IGLUE "
            "checkout holding datasets/)"
        )
    elif case == "no_datasets_folder":
        msg = resume_fails(env, root=tmp_path)
        assert msg.startswith(f"error: training data: data root {tmp_path}: expected folder {tmp_path / 'datasets'}"), (
            msg
        )
    else:
        msg = resume_fails(env, features=tmp_path / "feats.lmdb")
        assert msg == f"error: --features {tmp_path / 'feats.lmdb'} does not exist"


# ------------------------------------------------------------------------------------------ checkpoints, tokenizer


def _cclm_state_dict() -> dict:
    keys = [
        line.split("\t")[0] for line in (ROOT / "tests/fixtures/cclm/ft_xvnli.keys.tsv").read_text().splitlines()[:40]
    ]
    return {k: torch.zeros(2) for k in keys}


@pytest.mark.parametrize("case", ["cclm_state_dict", "other_task"])
def test_checkpoint_of_the_wrong_model(env, tmp_path, case):
    out = tmp_path / "run"
    if case == "cclm_state_dict":  # e.g. X2-VLM/CCLM weights given to the UC2 trainer
        ckpt = tmp_path / "cclm_xvnli.th"
        torch.save(_cclm_state_dict(), ckpt)
        expected = re.escape(
            f"error: --checkpoint: {ckpt}: unrecognised checkpoint layout (first keys: ['vision_encoder."
        )
        argv = cli(env, out, "--checkpoint", str(ckpt))
    else:  # our xvnli checkpoint given to an xgqa run: heads differ
        ckpt = env["paused"] / "checkpoint_last.pt"
        expected = re.escape(f"error: --checkpoint: {ckpt}: checkpoint (ours): missing key 'head.0.weight' (")
        argv = [a if a != "xvnli" else "xgqa" for a in cli(env, out, "--checkpoint", str(ckpt))]
    before = ckpt.read_bytes()
    msg = fails(argv)
    assert re.match(expected, msg), msg
    assert ckpt.read_bytes() == before
    assert_nothing_written(out)


@pytest.mark.parametrize("case", ["uc2_run_to_cclm", "cclm_run_to_uc2"])
def test_checkpoint_of_our_other_model_is_named(env, tmp_path, case):
    out = tmp_path / "run"
    if case == "uc2_run_to_cclm":
        ckpt = env["paused"] / "checkpoint_last.pt"
        (tmp_path / "images").mkdir()
        with pytest.raises(SystemExit) as e:
            train_cclm.main(
                [
                    "--task",
                    "xvnli",
                    "--data-root",
                    str(IGLUE),
                    "--images",
                    str(tmp_path / "images"),
                    "--tokenizer",
                    str(env["tok"]),
                    "--checkpoint",
                    str(ckpt),
                    "--output-dir",
                    str(out),
                ]
            )
        msg, want = str(e.value), (ckpt, "uc2", "cclm")
    else:
        ckpt = tmp_path / "cclm_run.pt"
        torch.save({"model": _cclm_state_dict(), "meta": {"model": "cclm"}}, ckpt)
        msg, want = fails(cli(env, out, "--checkpoint", str(ckpt))), (ckpt, "cclm", "uc2")
    assert (
        msg == f"error: --checkpoint: checkpoint {want[0]} holds a {want[1]} model, not {want[2]}; give a "
        f"{want[2]} checkpoint"
    )
    assert_nothing_written(out)


@pytest.mark.parametrize("case", ["missing_file", "truncated_file", "cclm_missing_file", "cclm_truncated_file"])
def test_unreadable_checkpoint(env, tmp_path, case):
    ckpt = tmp_path / "model_final.pt"
    if case.endswith("truncated_file"):
        ckpt.write_bytes((env["paused"] / "checkpoint_last.pt").read_bytes()[:5000])
    if case.startswith("cclm"):
        (tmp_path / "images").mkdir()
        with pytest.raises(SystemExit) as e:
            train_cclm.main(
                [
                    "--task",
                    "xvnli",
                    "--data-root",
                    str(IGLUE),
                    "--images",
                    str(tmp_path / "images"),
                    "--tokenizer",
                    str(env["tok"]),
                    "--checkpoint",
                    str(ckpt),
                    "--output-dir",
                    str(tmp_path / "run"),
                ]
            )
        msg = str(e.value)
    else:
        msg = fails(cli(env, tmp_path / "run", "--checkpoint", str(ckpt)))
    assert "\n" not in msg and msg.startswith(f"error: --checkpoint: {ckpt}: ")
    assert ("checkpoint file not found" if "missing" in case else "cannot read checkpoint: ") in msg
    assert_nothing_written(tmp_path / "run")


@pytest.mark.parametrize("case", ["checkpoint", "resume"])
def test_checkpoint_with_mismatched_shapes(env, tmp_path, capsys, case):
    other = {**U.resolve_config(UC2_TINY), "intermediate_size": 48}
    if case == "checkpoint":
        ckpt = tmp_path / "model_final.pt"
        torch.save(
            {"model": U.build_model("xvnli", other).state_dict(), "meta": {"model": "uc2", "config": other}}, ckpt
        )
        before = ckpt.read_bytes()
        msg = fails(cli(env, tmp_path / "run", "--checkpoint", str(ckpt)))
        assert msg.startswith(
            f"error: --checkpoint: {ckpt}: checkpoint (ours): encoder.layer.0.intermediate.dense.weight "
            "[48, 32] -> encoder.layer.0.intermediate.dense.weight [64, 32] (0 missing, 0 unexpected, "
        ), msg
        assert "  SHAPE    encoder.layer.11.output.dense.weight [32, 48]" in capsys.readouterr().err  # the full report
        assert ckpt.read_bytes() == before
        assert_nothing_written(tmp_path / "run")
    else:  # --resume with another architecture than the run's
        config = tmp_path / "other.json"
        config.write_text(json.dumps(other))
        ckpt = env["paused"] / "checkpoint_last.pt"
        msg = fails(cli(env, env["paused"], "--resume", "--model-config", str(config)))
        assert msg.startswith(
            f"error: --resume: {ckpt} does not fit this model (size mismatch for "
            "encoder.layer.0.intermediate.dense.weight"
        ), msg
        assert snapshot(env["paused"]) == env["paused_files"]


def same_size_other_vocabulary(tok: Path, out: Path) -> Path:
    """A copy of the tokenizer with two pieces swapped: same size, other ids for those pieces."""
    shutil.copytree(tok, out)
    spec = json.loads((out / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab[10], vocab[11] = vocab[11], vocab[10]
    (out / "tokenizer.json").write_text(json.dumps(spec))
    return out


@pytest.mark.parametrize("case", ["same_size_checkpoint", "same_size_resume"])
def test_tokenizer_with_the_same_size_but_another_vocabulary(env, tmp_path, case):
    other = same_size_other_vocabulary(env["tok"], tmp_path / "tok")
    assert len(tokenizer_check.load_tokenizer(other)) == len(tokenizer_check.load_tokenizer(env["tok"]))
    was = tokenizer_check.tokenizer_fingerprint(tokenizer_check.load_tokenizer(env["tok"]))
    now = tokenizer_check.tokenizer_fingerprint(tokenizer_check.load_tokenizer(other))
    if case == "same_size_checkpoint":
        ckpt = env["paused"] / "checkpoint_last.pt"
        msg = fails(cli(env, tmp_path / "run", "--checkpoint", str(ckpt), tokenizer=other))
        assert msg == (
            f"error: --tokenizer {other} is not the tokenizer checkpoint {ckpt} was trained with (same size, "
            f"different vocabulary: fingerprint {now} vs {was}); use the tokenizer the checkpoint was trained with"
        )
        assert_nothing_written(tmp_path / "run")
    else:
        run = tmp_path / "paused"
        shutil.copytree(env["paused"], run)
        before = snapshot(run)
        msg = fails(cli(env, run, "--resume", tokenizer=other))
        assert msg == (
            f"error: --resume: --tokenizer {other} is not the tokenizer the run in {run / 'checkpoint_last.pt'} "
            f"was trained with (vocabulary fingerprint {now} vs {was}); resume with that tokenizer"
        )
        assert snapshot(run) == before


@pytest.mark.parametrize("case", ["checkpoint", "config", "cclm_checkpoint"])
def test_tokenizer_vocabulary_mismatch(env, tmp_path, case):
    if (
        case == "cclm_checkpoint"
    ):  # train_cclm: a checkpoint of ours records the size of the tokenizer it was trained with
        config = train_cclm.resolve_config(CCLM_TINY)
        ckpt = tmp_path / "cclm.pt"
        trained = len(tokenizer_check.load_tokenizer(env["tok"]))
        torch.save(
            {
                "model": train_cclm.build_model("xvnli", config).state_dict(),
                "meta": {"model": "cclm", "config": config, "tokenizer_size": trained + 1},
            },
            ckpt,
        )
        (tmp_path / "images").mkdir()
        with pytest.raises(SystemExit) as e:
            train_cclm.main(
                [
                    "--task",
                    "xvnli",
                    "--data-root",
                    str(IGLUE),
                    "--images",
                    str(tmp_path / "images"),
                    "--tokenizer",
                    str(env["tok"]),
                    "--checkpoint",
                    str(ckpt),
                    "--output-dir",
                    str(tmp_path / "run"),
                ]
            )
        assert str(e.value) == (
            f"error: --tokenizer {env['tok']} has {trained} ids but checkpoint {ckpt} was trained with "
            f"a {trained + 1}-id tokenizer; use the tokenizer the checkpoint was trained with"
        )
    elif case == "checkpoint":  # the paused run's weights were trained with env["tok"]; give another vocabulary
        other = tmp_path / "tok"
        fixtures.make_tiny_tokenizer([e.text for e in env["train"]], other, vocab_size=200)
        n, trained = len(tokenizer_check.load_tokenizer(other)), len(tokenizer_check.load_tokenizer(env["tok"]))
        assert n != trained
        ckpt = env["paused"] / "checkpoint_last.pt"
        msg = fails(cli(env, tmp_path / "run", "--checkpoint", str(ckpt), tokenizer=other))
        assert msg == (
            f"error: --tokenizer {other} has {n} ids but checkpoint {ckpt} was trained with a {trained}-id "
            "tokenizer; use the tokenizer the checkpoint was trained with"
        )
    else:  # more ids than the model has embedding rows
        config = tmp_path / "small_vocab.json"
        config.write_text(json.dumps({**U.resolve_config(UC2_TINY), "vocab_size": 100}))
        n = len(tokenizer_check.load_tokenizer(env["tok"]))
        msg = fails(cli(env, tmp_path / "run", "--model-config", str(config)))
        assert msg == (
            f"error: --tokenizer {env['tok']} has {n} ids but the model config's vocab_size is 100 "
            "(ids >= 100 have no embedding); use a matching tokenizer or config"
        )
    assert_nothing_written(tmp_path / "run")


# ------------------------------------------------------------------------------------------ run folder


@pytest.mark.system
def test_existing_run_folder_without_resume(env):
    rc, err = finished(env, "existing_run")
    assert rc == 1, err[-2000:]
    assert last_line(err) == (
        f"error: {env['paused']} already holds a run (checkpoint_last.pt, metrics.jsonl, args.json); "
        "pass --resume to continue it or choose another --output-dir"
    )
    assert snapshot(env["paused"]) == env["paused_files"]


# ------------------------------------------------------------------------------------------ CLI numbers, model config


@pytest.mark.parametrize(
    "case",
    [
        "epochs_0",
        "negative_lr",
        "negative_weight_decay",
        "warmup_above_1",
        "max_regions_0",
        "negative_workers",
        "nan_lr",
        "llrd_decay_0",
        "suf_k_0",
    ],
)
def test_cli_number_out_of_range_is_refused_before_anything_is_written(env, tmp_path, case):
    flag, value, rule = {
        "epochs_0": ("--epochs", "0", ">= 1"),
        "negative_lr": ("--lr", "-1", ">= 0"),
        "negative_weight_decay": ("--weight-decay", "-5", ">= 0"),
        "warmup_above_1": ("--warmup-ratio", "2", "in [0, 1]"),
        "max_regions_0": ("--max-regions", "0", ">= 1"),
        "negative_workers": ("--num-workers", "-1", ">= 0"),
        "nan_lr": ("--lr", "nan", ">= 0"),
        "llrd_decay_0": ("--llrd-decay", "0", "in (0, 1]"),
        "suf_k_0": ("--suf-k", "0", ">= 1"),
    }[case]
    msg = fails(cli(env, tmp_path / "run", flag, value))
    assert msg == f"error: {flag} {value} is out of range: must be {rule}", msg
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["uc2_heads", "cclm_heads"])
def test_heads_not_dividing_the_hidden_size(env, tmp_path, case):
    config = tmp_path / "config.json"
    if case == "uc2_heads":
        config.write_text(json.dumps({**U.resolve_config(UC2_TINY), "num_heads": 3}))
        msg = fails(cli(env, tmp_path / "run", "--model-config", str(config)))
        assert msg == (
            f"error: --model-config {config}: hidden_size 32 is not divisible by num_heads 3 (each "
            "attention head takes hidden_size / num_heads dimensions)"
        ), msg
        assert not (tmp_path / "run").exists()
    else:
        config.write_text(json.dumps({**train_cclm.resolve_config(CCLM_TINY), "cross_heads": 5}))
        (tmp_path / "images").mkdir()
        with pytest.raises(SystemExit) as e:
            train_cclm.main(
                [
                    "--task",
                    "xvnli",
                    "--data-root",
                    str(IGLUE),
                    "--images",
                    str(tmp_path / "images"),
                    "--tokenizer",
                    str(env["tok"]),
                    "--model-config",
                    str(config),
                    "--output-dir",
                    str(tmp_path / "run"),
                ]
            )
        assert str(e.value) == (
            f"error: --model-config {config}: hidden_size 32 is not divisible by cross_heads 5 "
            "(each attention head takes hidden_size / cross_heads dimensions)"
        )
        assert_nothing_written(tmp_path / "run")


# ------------------------------------------------------------------------------------------ annotation values


@pytest.mark.parametrize("case", ["null_text", "list_text", "number_text"])
def test_text_field_that_is_not_a_string(env, tmp_path, case):
    lines = (IGLUE / "datasets" / XVNLI_EN / "train_48.jsonl").read_text().splitlines()
    bad = json.loads(lines[1])
    bad["sentence2"], shown = {
        "null_text": (None, "NoneType null"),
        "list_text": (["a", "b"], 'list ["a", "b"]'),
        "number_text": (12345, "int 12345"),
    }[case]
    root = _annotation_root(tmp_path, "\n".join([lines[0], json.dumps(bad)] + lines[2:]))
    msg = resume_fails(env, root=root)
    assert msg.startswith("error: training data: ") and msg.endswith(
        f"train_48.jsonl:2: field 'sentence2' must be a string, got {shown}"
    ), msg


def test_split_whose_labels_are_all_unknown(env, tmp_path):
    lines = [json.loads(line) for line in (IGLUE / "datasets" / XVNLI_EN / "train_48.jsonl").read_text().splitlines()]
    root = _annotation_root(tmp_path, "\n".join(json.dumps({**obj, "gold_label": "-"}) for obj in lines))
    msg = resume_fails(env, root=root)
    path = root / "datasets" / XVNLI_EN / "train_48.jsonl"
    assert msg == (
        f"error: training data: {path}: none of the {len(lines)} examples has a known label (every "
        "gold_label is '-'); wrong file or answer vocabulary?"
    ), msg


def test_invalid_utf8_names_file_and_line(env, tmp_path):
    lines = (IGLUE / "datasets" / XVNLI_EN / "train_48.jsonl").read_text().splitlines()
    root = _annotation_root(tmp_path, "")
    path = root / "datasets" / XVNLI_EN / "train_48.jsonl"
    path.write_bytes("\n".join(lines[:2]).encode() + b'\n{"sentence2": "caf\xe9"}\n')  # Latin-1, not UTF-8
    msg = resume_fails(env, root=root)
    assert msg == (
        f"error: training data: {path}:3: invalid UTF-8 (byte 0xe9 at column 19); the file must be UTF-8 encoded"
    ), msg


@pytest.mark.parametrize("case", ["repeated_id", "all_identical_ids"])
def test_repeated_ids_in_a_test_split_are_refused(env, tmp_path, case):
    """A test pair listed twice (or every pairID the same) would be scored twice: refused before training, naming
    the file and both records."""
    root = _annotation_root(tmp_path, (IGLUE / "datasets" / XVNLI_EN / "train_48.jsonl").read_text())
    path = root / "datasets" / XVNLI_EN / "test.jsonl"
    objs = [json.loads(line) for line in path.read_text().splitlines()]
    first = objs[0 if case == "all_identical_ids" else 1]["pairID"]
    for i, obj in enumerate(objs):
        if case == "all_identical_ids" or i == 3:
            obj["pairID"] = first
    path.write_text("".join(json.dumps(obj) + "\n" for obj in objs))
    (a, b), repeats = ((1, 2), len(objs) - 1) if case == "all_identical_ids" else ((2, 4), 1)
    msg = resume_fails(env, root=root)
    assert msg == (
        f"error: evaluation data: {path}: example id {first!r} repeats ({XVNLI_EN}/test.jsonl:{a} and "
        f"{XVNLI_EN}/test.jsonl:{b}; "
        f"{repeats} of {len(objs)} examples repeat an earlier id); ids must be unique in xvnli split 'test' (each "
        "example is scored once, by its id)"
    ), msg


def test_which_splits_must_have_unique_ids(tmp_path):
    """GQA's question ids are unique in every split (training ones too); XVNLI / retrieval training splits may repeat
    an id (it is never scored); every evaluation split must not."""
    root = tmp_path / "iglue"
    shutil.copytree(IGLUE / "datasets", root / "datasets")
    ds = root / "datasets"
    train48 = ds / XVNLI_EN / "train_48.jsonl"
    objs = [json.loads(line) for line in train48.read_text().splitlines()]
    objs[2]["pairID"] = objs[0]["pairID"]
    train48.write_text("".join(json.dumps(obj) + "\n" for obj in objs))
    assert len(data.load_split(root, "xvnli", "train_48", "en")) == len(objs)  # a training split may repeat
    xfl = ds / "xFlickrCO" / "annotations" / "de" / "test.jsonl"
    lines = xfl.read_text().splitlines()
    xfl.write_text("\n".join(lines + lines[:1]) + "\n")
    with pytest.raises(ValueError, match=r"example id '.*#0' repeats \(xFlickrCO/annotations/de/test.jsonl:1 and "):
        data.load_split(root, "xflickrco", "test", "de")
    testdev = ds / "gqa" / "annotations" / "testdev.json"
    qs = json.loads(testdev.read_text())
    qs[5]["question_id"] = qs[4]["question_id"]
    (ds / "gqa" / "annotations" / "train.json").write_text(json.dumps(qs))
    with pytest.raises(ValueError, match=r"repeats \(gqa/annotations/train.json item 4 and gqa/annotations/train"):
        data.load_split(root, "xgqa", "train", "en")


@pytest.mark.parametrize("case", ["deep_nesting", "long_number"])
def test_json_python_cannot_read_is_one_line_naming_file_and_line(env, tmp_path, case):
    """100,000 nested brackets (a RecursionError in json) and a 5,000-digit integer (beyond Python's conversion
    limit): one line naming the file and line, from JSON lines (the trainer) and whole-file JSON (GQA) alike."""
    value, tail = {
        "deep_nesting": ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply to read (100,001 levels)"),
        "long_number": ("9" * 5000, "a number of 5,000 digits (more than the 4,300 Python reads)"),
    }[case]
    lines = (IGLUE / "datasets" / XVNLI_EN / "train_48.jsonl").read_text().splitlines()
    obj = json.loads(lines[2])
    text = json.dumps(obj)[:-1] + f', "extra": {value}}}'
    root = _annotation_root(tmp_path, "\n".join(lines[:2] + [text] + lines[3:]))
    msg = resume_fails(env, root=root)
    assert msg == f"error: training data: {root / 'datasets' / XVNLI_EN / 'train_48.jsonl'}:3: {tail}", msg
    gqa = tmp_path / "gqa"
    shutil.copytree(IGLUE / "datasets" / "gqa", gqa / "datasets" / "gqa")
    testdev = gqa / "datasets" / "gqa" / "annotations" / "testdev.json"
    items = json.loads(testdev.read_text())
    testdev.write_text("[\n" + ",\n".join(json.dumps(q) for q in items[:3]) + f',\n{{"sent": {value}}}]')
    with pytest.raises(ValueError) as e:
        data.load_split(gqa, "xgqa", "testdev", "en")
    assert str(e.value) == f"{testdev}:5: {tail.replace('100,001', '100,002')}"  # inside the list and the object


# ------------------------------------------------------------------------------------------ feature records


def _lmdb_put(feats: Path, key: str, value: bytes | None) -> None:
    """Overwrite (None: delete) one record of a feature LMDB, keeping its `keys` entry."""
    import lmdb

    lmdb_env = lmdb.open(str(feats), map_size=1 << 28)
    with lmdb_env.begin(write=True) as txn:
        if value is None:
            txn.delete(key.encode())
        else:
            txn.put(key.encode(), value)
    lmdb_env.close()


def _record_of(feats: Path, key: str) -> dict:
    import lmdb

    lmdb_env = lmdb.open(str(feats), readonly=True, lock=False)
    with lmdb_env.begin() as txn:
        record = pickle.loads(txn.get(key.encode()))
    lmdb_env.close()
    return record


def _damaged_features(env, tmp_path: Path, case: str) -> tuple[Path, str, str]:
    """A copy of the features with one training image's record damaged: (folder, key, expected message tail)."""
    feats = tmp_path / "feats"
    shutil.copytree(env["feats"], feats)
    key = sorted({e.image for e in env["train"]})[0]
    rec = _record_of(feats, key)
    four_by_1024 = rec["features"][:2].reshape(4, 1024)
    value, tail = {
        "wrong_width": (
            {**rec, "features": four_by_1024},
            "features is a float32 array of shape [4, 1024]; expected a float array of shape [N, 2048]",
        ),
        "wrong_width_base64": (
            {
                **rec,
                "features": base64.b64encode(four_by_1024.tobytes()),
                "boxes": base64.b64encode(rec["boxes"].tobytes()),
            },
            "2 feature rows of 2048 but 4 boxes",
        ),
        "integer_dtype": (
            {**rec, "features": rec["features"].astype("int64")},
            "features is a int64 array of shape [4, 2048]; expected a float array of shape [N, 2048]",
        ),
        "no_record": (
            None,
            "is listed in its keys but has no record (a damaged or incomplete copy); copy or download "
            "the features again",
        ),
        "bit_rot": (b"\x80\x04\x95\x00garbage", "not a readable pickle of plain data"),
        "nan_values": ({**rec, "features": np.full_like(rec["features"], np.nan)}, "holds NaN or inf values"),
        "box_outside_image": (
            {**rec, "boxes": rec["boxes"] + np.float32(1e6)},
            f"lies outside its {int(rec['img_w'])}x{int(rec['img_h'])} image (x1 y1 x2 y2 in pixels, 4 of 4 boxes; "
            "allowed: 1% of the side beyond it)",
        ),
        "huge_image_size": (
            {**rec, "img_w": 10**30},
            "img_w is an integer of about 31 digits; expected a positive integer of pixels, at most 100,000",
        ),
        "no_boxes": (
            {**rec, "features": rec["features"][:0], "boxes": rec["boxes"][:0]},
            "holds no boxes (0 regions); expected at least one box per image",
        ),
    }[case]
    _lmdb_put(feats, key, value if value is None or isinstance(value, bytes) else pickle.dumps(value))
    return feats, key, tail


@pytest.mark.parametrize(
    "case",
    [
        "wrong_width",
        "wrong_width_base64",
        "integer_dtype",
        "no_record",
        "bit_rot",
        "nan_values",
        "box_outside_image",
        "huge_image_size",
        "no_boxes",
    ],
)
def test_bad_feature_record_is_one_line_error_naming_the_key(env, tmp_path, case):
    feats, key, tail = _damaged_features(env, tmp_path, case)
    msg = resume_fails(env, features=feats)  # the start-up check decodes the training records
    assert msg.startswith(f"error: training data: {feats}: feature ") and f"{key!r}" in msg and tail in msg, msg
    assert re.search(
        rf"\(referenced by {XVNLI_EN}/train_48\.jsonl:\d+, example .*\); 1 of \d+ feature records "
        r"checked are bad \(python -m checks\.inventory --verify lists them all\)$",
        msg,
    ), msg
    if case != "nan_values":  # reading it for a batch (in a worker, mid-epoch) is the same one line
        ds = data.make_dataset(
            "uc2", "xvnli", [e for e in env["train"] if e.image == key], features=str(feats), max_regions=4
        )
        with pytest.raises(BadInput) as e:
            ds[0]
        assert tail in str(e.value) and f"{key!r}" in str(e.value) and "\n" not in str(e.value)


def test_keys_entry_that_does_not_decode(env, tmp_path):
    feats = tmp_path / "feats"
    shutil.copytree(env["feats"], feats)
    _lmdb_put(feats, "keys", b"\x80\x04\x95\x00rotten")
    msg = resume_fails(env, features=feats)
    assert re.fullmatch(
        re.escape(f"error: --features: {feats} entry 'keys': not a readable pickle of plain data (") + r"\w+: .*\)", msg
    ), msg


def test_bad_record_in_a_loader_worker_is_one_line(env, tmp_path):
    feats, key, tail = _damaged_features(env, tmp_path, "wrong_width")
    exs = [e for e in env["train"] if e.image == key][:1]
    loader = loaders.BatchLoader(
        data.make_dataset("uc2", "xvnli", exs, features=str(feats), max_regions=4),
        batch_size=1,
        num_workers=1,
        collate_fn=lambda items: {"n": len(items)},
    )
    with pytest.raises(BadInput) as e:
        next(iter(loader))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{feats}: feature record {key!r}: {tail}"), msg


def test_verify_reports_every_bad_record_and_image(env, tmp_path, capsys):
    feats, key, _ = _damaged_features(env, tmp_path, "wrong_width")
    other = sorted({e.image for e in env["train"]})[1]
    rec = _record_of(feats, other)
    _lmdb_put(feats, other, pickle.dumps({**rec, "features": np.full_like(rec["features"], np.inf)}))
    images = tmp_path / "images"
    files = sorted({e.image_file for e in env["train"] + env["test"]})
    paths = fixtures.write_synthetic_images(images, files, size=(16, 12))
    paths[0].write_bytes(b"this is not a JPEG")
    before = snapshot(tmp_path)
    rc = inventory.main(["--data-root", str(IGLUE), "--features", str(feats), "--images", str(images), "--verify"])
    out, err = capsys.readouterr()
    bad = [line for line in out.splitlines() if line.startswith("bad: ")]
    assert rc == 1 and len(bad) == 3, out
    assert any(f"feature record {key!r}: features is a float32 array of shape [4, 1024]" in b for b in bad)
    assert any(f"feature record {other!r} holds NaN or inf values" in b for b in bad)
    assert any(f"image file {paths[0]} is corrupt or not an image (UnidentifiedImageError" in b for b in bad)
    n_keys = len(open_features(feats).keys())
    assert last_line(err) == (
        f"error: --verify: 3 bad of {n_keys} feature records and {len(files)} images checked (listed above)"
    ), err
    assert snapshot(tmp_path) == before


def test_corrupt_test_image_stops_the_run_before_training(env, tmp_path):
    """CCLM: a test-split image that is not an image is found by the start-up check, not after an epoch
    (and if it were read in a loader worker, the error would still be one line: BadInput)."""
    images = tmp_path / "images"
    train = data.load_split(IGLUE, "xvnli", "train_48", "en")
    files = sorted({e.image_file for e in train + env["test"]})
    paths = dict(zip(files, fixtures.write_synthetic_images(images, files, size=(16, 12))))
    test_only = sorted({e.image_file for e in env["test"]} - {e.image_file for e in train})[0]
    paths[test_only].write_bytes(b"this is not a JPEG")
    with pytest.raises(SystemExit) as e:
        train_cclm.main(
            [
                "--task",
                "xvnli",
                "--data-root",
                str(IGLUE),
                "--images",
                str(images),
                "--tokenizer",
                str(env["tok"]),
                "--model-config",
                CCLM_TINY,
                "--train-split",
                "train_48",
                "--langs",
                "en",
                "--num-workers",
                "0",
                "--output-dir",
                str(tmp_path / "run"),
            ]
        )
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(
        f"error: data: image file {paths[test_only]} is corrupt or not an image (UnidentifiedImageError"
    ), msg
    assert re.search(rf"\(referenced by {XVNLI_EN}/test\.jsonl:\d+, example .*\); 1 of \d+ images checked are bad", msg)
    assert_nothing_written(tmp_path / "run")


# ------------------------------------------------------------------------------------------ evaluation results


def test_nan_logits_at_evaluation_are_an_error_not_an_accuracy(env, tmp_path):
    import eval_zeroshot

    run = tmp_path / "paused"
    shutil.copytree(env["paused"], run)
    ckpt = torch_files.load_checkpoint(run / "checkpoint_last.pt")
    ckpt["model"] = {k: v * float("nan") if k.startswith("head.") else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, run / "checkpoint_last.pt")
    before = snapshot(run)
    with pytest.raises(SystemExit) as e:
        eval_zeroshot.main(["--run", str(run), "--langs", "en", "--num-workers", "0"])
    assert str(e.value).startswith("error: non-finite logits (NaN or inf) for ") and "\n" not in str(e.value)
    assert snapshot(run) == before  # no results.json, no CSV
    with pytest.raises(FloatingPointError, match="non-finite retrieval scores"):
        scoring.metrics.recall_metrics(torch.tensor([[1.0, float("nan")]]), torch.tensor([[1.0], [2.0]]), [0])


def test_table_marks_an_unfinished_run(env, capsys):
    from report import cli as report_cli

    lines = [
        {"type": "eval", "epoch": 1, "step": 1, "lang": lang, "split": "test", "accuracy": 50.0}
        for lang in ("en", "ar")
    ]
    paused = env["base"] / "paused_with_eval"
    shutil.copytree(env["paused"], paused)
    with open(paused / "metrics.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in lines))
    assert report_cli.main(["table", str(paused)]) == 0
    out = capsys.readouterr().out
    assert "50.0! " in out and "! = from a run that has not finished" in out
    assert f"metrics.jsonl epoch 1 (test) of {paused}: epoch 1 of 2, no model_final.pt" in out


# ------------------------------------------------------------------------------------------ marvl (NLVR2 + MaRVL pairs)

MARVL_TEST_ZH = "marvl/zero_shot/annotations/marvl-zh.jsonl"
NLVR2_DEV = "nlvr2/annotations/dev.jsonl"


def _pair_root(tmp_path: Path, name: str, edit) -> tuple[Path, Path]:
    """A checkout of the sample's nlvr2/ and marvl/ whose file `name` has its third line changed by edit(obj)."""
    root = tmp_path / "iglue"
    for folder in ("nlvr2", "marvl"):
        shutil.copytree(IGLUE / "datasets" / folder, root / "datasets" / folder)
    path = root / "datasets" / name
    lines = path.read_text().splitlines()
    obj = json.loads(lines[2])
    edit(obj)
    lines[2] = json.dumps(obj, ensure_ascii=False)
    path.write_text("\n".join(lines) + "\n")
    return root, path


PAIR_LINE_CASES = {  # case: (file, edit, split, lang, the message after "<file>:3: ")
    "marvl_string_label": (
        MARVL_TEST_ZH,
        lambda o: o.update(label="true"),
        "test",
        "zh",
        'field \'label\' must be true or false (a JSON boolean), got "true"',
    ),
    "marvl_number_label": (
        MARVL_TEST_ZH,
        lambda o: o.update(label=1),
        "test",
        "zh",
        "field 'label' must be true or false (a JSON boolean), got 1",
    ),
    "nlvr2_boolean_label": (
        NLVR2_DEV,
        lambda o: o.update(label=True),
        "dev",
        "en",
        'field \'label\' must be "True" or "False" (NLVR2), got true',
    ),
    "nlvr2_lowercase_label": (
        NLVR2_DEV,
        lambda o: o.update(label="false"),
        "dev",
        "en",
        'field \'label\' must be "True" or "False" (NLVR2), got "false"',
    ),
    "same_image": (
        MARVL_TEST_ZH,
        lambda o: o.update(right_img=o["left_img"]),
        "test",
        "zh",
        "left_img '82-4.jpg' and right_img '82-4.jpg' are the same image (feature key '82-4'); a pair needs two images",
    ),
    "same_feature_key": (
        MARVL_TEST_ZH,
        lambda o: o.update(right_img=o["left_img"].replace(".jpg", ".png")),
        "test",
        "zh",
        "left_img '82-4.jpg' and right_img '82-4.png' are the same image (feature key '82-4'); a pair needs two images",
    ),
}


@pytest.mark.parametrize("case", list(PAIR_LINE_CASES))
def test_pair_line_with_a_label_that_is_not_a_boolean_or_one_image_twice(tmp_path, case):
    name, edit, split, lang, expected = PAIR_LINE_CASES[case]
    root, path = _pair_root(tmp_path, name, edit)
    before = snapshot(root)
    with pytest.raises(ValueError) as e:
        data.load_split(root, "marvl", split, lang)
    assert str(e.value) == f"{path}:3: {expected}"
    assert snapshot(root) == before


@pytest.mark.parametrize("case", ["marvl_right_image_file", "nlvr2_left_image_file", "marvl_right_feature_key"])
def test_missing_image_of_a_pair_fails_fast(tmp_path, case):
    name, split, lang = (NLVR2_DEV, "dev", "en") if case.startswith("nlvr2") else (MARVL_TEST_ZH, "test", "zh")
    exs = data.load_split(IGLUE, "marvl", split, lang)
    gone = exs[2]
    left = (gone.image, gone.image_file, "")
    key, rel, side = left if "left" in case else (gone.image2, gone.image2_file, " (right image)")
    images = tmp_path / "images"
    files = {f for e in exs for f in (e.image_file, e.image2_file)}
    fixtures.write_synthetic_images(images, sorted(files - {rel}), size=(16, 12))
    keys = {k for e in exs for k in (e.image, e.image2)}
    before = snapshot(images)
    with pytest.raises(ValueError) as e:
        if case.endswith("feature_key"):
            feats = fixtures.write_synthetic_features(tmp_path / "feats", keys - {key}, num_boxes=2)
            preflight.check_inputs(exs, features=feats)
        else:
            preflight.check_inputs(exs, images=images)
    msg = str(e.value)
    what = f"image file {images / rel} not found"
    if case.endswith("feature_key"):
        what = f"feature key '{key}' not found in {feats}"
    assert msg == f"{what} (referenced by {name}:3{side}, example {gone.id}); 1 of {len(keys)} images missing", msg
    assert snapshot(images) == before


# ------------------------------------------------------------------------------------------ serialized NLVR2 records

SERIALIZED_NLVR2_CASES = {  # case: (edit of record 2, the message after "<file>: record '00000002'")
    "missing_field": (lambda r: r.pop("img_w_1"), ": no field 'img_w_1' (an NLVR2 pair record has "),
    "wrong_width": (
        lambda r: r.update(features_0=r["features_0"].reshape(-1, 1024)),
        " (left image, the *_0 fields): features is a float32 array of shape [6, 1024]; expected a float array of "
        "shape [N, 2048]",
    ),
    "nan_values": (
        lambda r: r.update(features_1=np.full_like(r["features_1"], np.nan)),
        " (right image, the *_1 fields): holds NaN or inf values",
    ),
    "box_outside_image": (
        lambda r: r.update(boxes_0=r["boxes_0"] + np.float32(1e6)),
        " (left image, the *_0 fields): box 0 [",
    ),
    "label_not_boolean": (lambda r: r.update(labels=[2]), ": labels is [2]; expected [0] or [1] (false / true)"),
    "label_string": (lambda r: r.update(labels=["True"]), ": labels is ['True']; expected [0] or [1] (false / true)"),
    "same_image": (
        lambda r: r.update(img_id_1=r["img_id_0"]),
        ": img_id_0 and img_id_1 are both 'dev-850-3-img0'; a pair needs two images",
    ),
    "bit_rot": (None, ": cannot be decoded ("),
}


@pytest.mark.parametrize("case", list(SERIALIZED_NLVR2_CASES))
def test_bad_serialized_nlvr2_record_is_one_line_naming_file_and_record(tmp_path, case):
    exs = data.load_split(IGLUE, "marvl", "dev", "en")[:4]
    feats = fixtures.write_synthetic_features(tmp_path / "feats", {k for e in exs for k in (e.image, e.image2)}, 3)
    records = serialized_lmdb.nlvr2_records(exs, feats)
    edit, tail = SERIALIZED_NLVR2_CASES[case]
    raw = {2: b"\xc1 rotten"} if edit is None else {}
    if edit is not None:
        edit(records[2])
    path = serialized_lmdb.write_serialized(tmp_path / "nlvr2-train_boxes36.lmdb", records, raw)
    before = snapshot(path)
    head = f"{path}: record '00000002'{tail}"
    with pytest.raises(BadInput) as e:  # reading the record (for a batch, in a worker or not)
        nlvr2_serialized.SerializedNLVR2(path).pair(2)
    assert str(e.value).startswith(head) and "\n" not in str(e.value), str(e.value)
    args = argparse.Namespace(task="marvl", max_regions=36)
    with pytest.raises(ValueError) as e:  # train_uc2 --task marvl --features <it>: before training
        U.checked_train_dataset(args, *U.open_feature_files([str(path)]))
    msg = str(e.value)
    assert msg.startswith(f"training data: {head}") and msg.endswith("; 1 of 4 records checked are bad"), msg
    assert "\n" not in msg and snapshot(path) == before
    assert [line.startswith(head) for line in inventory.verify(IGLUE, [str(path)])[0]] == [True]


# ------------------------------------------------------------------------------------------ the catalogue itself


def test_catalogue_matches_the_tests():
    """Every test named in docs/bad_input.md exists (function, and parameter id when given), and every
    test of this file is named in the catalogue."""
    table = [line for line in CATALOGUE.read_text().splitlines() if line.startswith("|")][2:]
    assert len(table) >= 12, "catalogue table missing or too short"
    named = set()
    for row in table:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 4 and all(cells), row
        refs = re.findall(r"`(tests/test_\w+\.py)::(\w+)(?:\[(\w+)\])?`", cells[3])
        assert refs, f"no test named in row: {row}"
        for path, func, param in refs:
            src = (ROOT / path).read_text()
            assert re.search(rf"^def {func}\(", src, re.M), f"{path}::{func} does not exist"
            assert param is None or param == "" or f'"{param}"' in src, f"{path}::{func}[{param}]: no such parameter"
            if path == "tests/test_bad_input.py":
                named.add(func)
    here = set(re.findall(r"^def (test_\w+)\(", Path(__file__).read_text(), re.M)) - {
        "test_catalogue_matches_the_tests"
    }
    assert here <= named, f"tests missing from the catalogue: {sorted(here - named)}"
