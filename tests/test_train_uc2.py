"""train_uc2.py on CPU with the tiny config: every task x policy learns, torchrun (gloo) equals one
process, resume is bitwise exact, and --print-schedule pins UC2's schedule.

Data: the IGLUE annotation sample in tests/fixtures/iglue, a tiny tokenizer trained on it and
synthetic region features (fixtures.write_synthetic_features) for every image it references.
"""

import argparse
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from _timeouts import scaled

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _configs import UC2_TINY  # noqa: E402
import data  # noqa: E402
from formats import tokenizer_check  # noqa: E402
from formats.features import open_features  # noqa: E402
from formats.bad_input import BadInput  # noqa: E402
from synthetic import fixtures  # noqa: E402
from checks import preflight  # noqa: E402
import engine  # noqa: E402
from training import progress  # noqa: E402
from formats import run_folder  # noqa: E402
import freeze  # noqa: E402
import train_uc2 as U  # noqa: E402
from formats import feature_sets, volta  # noqa: E402
import _faults  # noqa: E402
import _guard  # noqa: E402
from _marvl_batches import uc2_batch, uc2_slot, uc2_swapped  # noqa: E402
import _serialized_lmdb as serialized_lmdb  # noqa: E402
import scoring.evaluate  # noqa: E402

IGLUE = ROOT / "tests" / "fixtures" / "iglue"
# marvl: the sample has no NLVR2 train.jsonl (IGLUE stores it as a large-file pointer); its 60 dev lines train here
SPLITS = {
    "xgqa": ("testdev", "dev"),
    "xvnli": ("train_48", "test"),
    "xflickrco": ("valid", "test"),
    "marvl": ("dev", "test"),
}
EVAL_LANGS = {"xgqa": ["en", "de"], "xvnli": ["en", "ar"], "xflickrco": ["en", "de"], "marvl": ["en", "id"]}
REGIONS = 10


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("uc2_sample")
    texts, ids = [], set()
    for task, (train, test) in SPLITS.items():
        for split, langs in ((train, ["en"]), (test, EVAL_LANGS[task])):
            for lang in langs:
                exs = data.load_split(IGLUE, task, split, lang)
                texts += [e.text for e in exs]
                ids |= {e.image for e in exs} | {e.image2 for e in exs if e.image2}  # marvl: the right image too
    fixtures.make_tiny_tokenizer(texts, out / "tok", vocab_size=1000)
    fixtures.write_synthetic_features(out / "feats", ids, num_boxes=REGIONS)
    return out


def cli(task, sample, out, *extra):
    train, test = SPLITS[task]
    return [
        "--task",
        task,
        "--model-config",
        UC2_TINY,
        "--data-root",
        str(IGLUE),
        "--features",
        str(sample / "feats"),
        "--tokenizer",
        str(sample / "tok"),
        "--train-split",
        train,
        "--eval-split",
        test,
        "--max-regions",
        str(REGIONS),
        "--num-workers",
        "0",
        "--output-dir",
        str(out),
        *extra,
    ]


def fixed_batch(task, sample, n=4):
    tok = tokenizer_check.load_tokenizer(sample / "tok")
    exs = data.load_split(IGLUE, task, SPLITS[task][0], "en")
    ds = data.make_dataset("uc2", task, exs, features=str(sample / "feats"), train=True, max_regions=REGIONS)
    return data.UC2Collate(task, tok, train=True)([ds[i] for i in range(n)])


@pytest.mark.parametrize("policy", freeze.POLICIES)
@pytest.mark.parametrize("task", U.TASKS)
def test_loss_falls_on_a_fixed_batch(task, policy, sample):
    torch.manual_seed(0)
    config = {**U.resolve_config(UC2_TINY), "hidden_dropout": 0.0, "attention_dropout": 0.0, "classifier_dropout": 0.0}
    model = U.build_model(task, config)
    layout = U.layer_layout(task, config)
    schedule = freeze.Schedule(policy=policy, num_layers=layout.num_layers)
    args = argparse.Namespace(
        lr=1e-3, weight_decay=0.01, adam_eps=1e-8, adam_betas=[0.9, 0.999], warmup_ratio=0.0, adamw="reference"
    )
    opt, sched = engine.build_optimizer(model, layout, schedule, args, total_steps=1000)
    freeze.apply_schedule(model, layout, schedule, epoch=0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    batch = fixed_batch(task, sample)
    losses = []
    for _ in range(6):
        loss = model.loss(batch)
        loss.backward()
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert bool(frozen) == (policy in ("suf", "top"))
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"


def final_weights(run: Path) -> dict:
    return torch.load(run / "model_final.pt", weights_only=True)["model"]


@pytest.mark.system
def test_torchrun_two_processes_equal_one(sample, tmp_path):
    common = [
        "--policy",
        "suf",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--max-steps-per-epoch",
        "2",
        "--dropout",
        "0",
        "--no-eval",
        "--seed",
        "3",
    ]
    U.main(cli("xgqa", sample, tmp_path / "one", *common))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(ROOT / "train_uc2.py"),
            *cli("xgqa", sample, tmp_path / "two", *common),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=scaled(300),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    start = U.build_model("xgqa", U.resolve_config(UC2_TINY)).state_dict()
    moved = [k for k in one if not torch.equal(one[k], start[k])]
    assert any(k.startswith("encoder.layer.6.") for k in moved), "the second SUF stage never trained"
    for k in one:
        assert torch.allclose(one[k], two[k], rtol=1e-4, atol=1e-6), k
    trained = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["trainable_layers"] for r in trained if r["type"] == "train"] == [[9, 10, 11], [6, 7, 8, 9, 10, 11]]


@pytest.mark.parametrize("task", ["xflickrco", "marvl"])  # xflickrco: VOLTA's hard negatives; marvl: image pairs
def test_resume_after_epoch_one_is_bitwise_equal(task, sample, tmp_path, monkeypatch):
    common = [
        "--policy",
        "suf",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--max-steps-per-epoch",
        "2",
        "--eval-batch-size",
        "400",
        "--langs",
        EVAL_LANGS[task][1],
        "--seed",
        "5",
        "--eval-every",
        "1",
    ]
    U.main(cli(task, sample, tmp_path / "full", *common))
    undo_fault = _faults.install("raise:epoch_end:1", monkeypatch=monkeypatch)
    with pytest.raises(RuntimeError, match="SUF_FAULT"):
        U.main(cli(task, sample, tmp_path / "cut", *common))
    assert not (tmp_path / "cut" / "model_final.pt").exists()
    undo_fault()
    U.main(cli(task, sample, tmp_path / "cut", *common, "--resume"))
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = [
        [
            {k: v for k, v in json.loads(line).items() if k not in progress.DataWait.KEYS}  # wall-clock aside
            for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()
        ]
        for r in ("full", "cut")
    ]
    assert logs[0] == logs[1]
    evals = [r for r in logs[0] if r["type"] == "eval"]
    assert [(r["epoch"], r["lang"]) for r in evals] == [(1, EVAL_LANGS[task][1]), (2, EVAL_LANGS[task][1])]
    if task == "xflickrco":
        assert all(0 <= r["tr_r1"] <= 100 and r["n_images"] == 40 for r in evals)
    else:  # the sample's 30 MaRVL-id pairs
        assert all(0 <= r["accuracy"] <= 100 and r["n"] == 30 for r in evals)
    meta = torch.load(tmp_path / "cut" / "model_final.pt", weights_only=True)["meta"]
    assert meta["model"] == "uc2" and meta["config"]["hidden_size"] == 32 and meta["task"] == task
    rebuilt = U.build_model(meta["task"], meta["config"])
    assert volta.load_into(rebuilt, str(tmp_path / "cut" / "model_final.pt")).ok


def test_resume_before_the_first_checkpoint_loads_the_checkpoint(sample, tmp_path, monkeypatch):
    """A run killed in epoch 1 has no checkpoint_last.pt: --resume starts it anew, from --checkpoint."""
    common = [
        "--policy",
        "suf",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--max-steps-per-epoch",
        "2",
        "--no-eval",
        "--seed",
        "3",
    ]
    U.main(cli("xvnli", sample, tmp_path / "init", *common, "--seed", "4"))  # weights to start from
    start = ["--checkpoint", str(tmp_path / "init" / "model_final.pt")]
    U.main(cli("xvnli", sample, tmp_path / "whole", *common, *start))
    undo_fault = _faults.install("raise:step:1", monkeypatch=monkeypatch)
    with pytest.raises(RuntimeError, match="SUF_FAULT"):
        U.main(cli("xvnli", sample, tmp_path / "cut", *common, *start))
    assert not (tmp_path / "cut" / run_folder.CHECKPOINT).exists()
    undo_fault()
    U.main(cli("xvnli", sample, tmp_path / "cut", *common, *start, "--resume"))
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_xflickrco_training_finds_volta_hard_negatives(sample, tmp_path, capsys):
    """hard_negative.pkl where VOLTA keeps it (<datasets>/flickr30k/) is used and recorded; without it, a warning."""
    root = tmp_path / "iglue" / "datasets"
    root.mkdir(parents=True)
    for d in (IGLUE / "datasets").iterdir():
        (root / d.name).symlink_to(d)
    (root / "flickr30k").unlink()
    (root / "flickr30k").mkdir()
    for d in (IGLUE / "datasets" / "flickr30k").iterdir():
        (root / "flickr30k" / d.name).symlink_to(d)
    common = [
        "--data-root",
        str(root.parent),
        "--policy",
        "full",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--max-steps-per-epoch",
        "1",
        "--no-eval",
    ]
    U.main(cli("xflickrco", sample, tmp_path / "without", *common))
    assert "warning: no hard_negative.pkl" in capsys.readouterr().err
    assert json.loads((tmp_path / "without" / "args.json").read_text())["hard_negatives"] is None
    keys = list(dict.fromkeys(e.image for e in data.load_split(IGLUE, "xflickrco", SPLITS["xflickrco"][0], "en")))
    pkl = root / "flickr30k" / "hard_negative.pkl"
    pkl.write_bytes(
        pickle.dumps(
            {
                "train_image_list": [int(k) for k in keys],
                "train_hard_pool": np.array([[i, (i + 1) % len(keys)] for i in range(len(keys))]),
            }
        )
    )
    U.main(cli("xflickrco", sample, tmp_path / "with", *common))
    assert "hard_negative.pkl" not in capsys.readouterr().err
    args = json.loads((tmp_path / "with" / "args.json").read_text())
    assert args["hard_negatives"] == str(pkl) and args["retrieval_negatives"] == "volta"  # IGLUE's sampler by default
    with pytest.raises(SystemExit, match="--resume: --retrieval-negatives is 'corrected' but the run .* used 'volta'"):
        U.main(cli("xflickrco", sample, tmp_path / "with", *common, "--retrieval-negatives", "corrected", "--resume"))


@pytest.mark.parametrize("config", ["base", pytest.param(UC2_TINY, id="tiny")])
def test_print_schedule_pins_uc2_suf(config, capsys):
    U.main(["--task", "xgqa", "--policy", "suf", "--model-config", config, "--print-schedule", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["trainable_layers"] for r in rows] == [
        list(range(9, 12)),
        list(range(6, 12)),
        list(range(3, 12)),
        list(range(12)),
        list(range(12)),
    ]
    assert all(r["always_trainable"] == ["embeddings", "head"] and r["embeddings_trainable"] for r in rows)
    if config == "base":
        assert rows[-1]["trainable_params"] == 281_637_426 and rows[0]["frozen_params"] == 9 * 7_087_872
    U.main(["--task", "xflickrco", "--policy", "full", "--model-config", config, "--print-schedule", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 10 and all(r["trainable_layers"] == list(range(12)) for r in rows)


def test_feature_set_reads_each_key_from_the_file_holding_it(tmp_path):
    """FeatureSet (several --features files): keys, `in`, get / kept_regions / regions go to the file that holds
    the key, an unknown key is a KeyError, and datasets and the start-up check read through it."""
    fixtures.write_synthetic_features(tmp_path / "a", ["1", "2"], num_boxes=4, seed=1)
    fixtures.write_synthetic_features(tmp_path / "b", ["3"], num_boxes=6, seed=2)
    fs = feature_sets.FeatureSet([str(tmp_path / "a"), str(tmp_path / "b")])
    a, b = open_features(tmp_path / "a"), open_features(tmp_path / "b")
    assert fs.keys() == {"1", "2", "3"} and "3" in fs and "4" not in fs
    for key, reader in (("2", a), ("3", b)):
        want, got = reader.get(key), fs.get(key)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2:] == want[2:]
        assert all(np.array_equal(g, w) for g, w in zip(fs.kept_regions(key, 5), reader.kept_regions(key, 5)))
        assert all(torch.equal(fs.regions(key, 8)[k], v) for k, v in reader.regions(key, 8).items())
    assert fs.get("3", max_rows=2)[0].shape == (2, 2048)
    with pytest.raises(KeyError):
        fs.get("4")
    exs = [
        data.Example(
            task="xvnli",
            lang="en",
            id=f"p{k}",
            image=k,
            image_file=f"flickr30k/{k}.jpg",
            text="a dog",
            label=0,
            source=f"t:{k}",
        )
        for k in ("1", "3")
    ]
    preflight.check_inputs(exs, features=fs, sample=None)
    assert data.REGION_FEATURES.dataset("xvnli", exs, features=fs, max_regions=8)[1]["regions"][0].shape == (6, 2048)
    with pytest.raises(BadInput, match="'4' not found"):
        data.REGION_FEATURES.dataset("xvnli", [replace(exs[0], image="4")], features=fs)[0]


def test_non_finite_run_writes_no_result(sample, tmp_path, monkeypatch, capsys):
    """The trainers' guard: NaN logits at the final evaluation end the run as one line, exit status 1, with no
    model_final.pt, no results.json and no evaluation record."""
    monkeypatch.setattr(U.UC2, "_run", _guard.nan_output(U.UC2._run))
    run = tmp_path / "run"
    argv = cli(
        "xvnli", sample, run, "--epochs", "1", "--batch-size", "4", "--max-steps-per-epoch", "1", "--langs", "en"
    )
    code, line = _guard.exit_line(U.main, argv, capsys)
    assert code == 1 and line.startswith("error: evaluation after epoch 1: non-finite logits (NaN or inf) for "), line
    assert f"the epoch's checkpoint {run / run_folder.CHECKPOINT} is kept" in line
    assert _guard.results_written(run) == [] and '"type": "eval"' not in (run / run_folder.METRICS).read_text()


# ---------------------------------------------------------------- MaRVL: VOLTA's NLVR2 model on the pair


def marvl_model(seed: int = 0) -> U.UC2:
    torch.manual_seed(seed)
    return U.build_model("marvl", U.resolve_config(UC2_TINY)).eval()


def test_marvl_logits_are_the_pair_classifier_on_left_then_right():
    """VOLTA's VL-binary-classifier: the 2B rows (left, right of each example) are encoded separately and
    dropout(pooled).view(-1, 2 * pooler) feeds SimpleClassifier(2 * pooler, clf_hidden, 2): per example the left
    image's pooled output, then the right's. Swapping the images swaps the two halves of the head's input."""
    model, batch = marvl_model(), uc2_batch(U.resolve_config(UC2_TINY))
    with torch.no_grad():
        logits = model._run(batch)
        left, right = model.encode(*uc2_slot(batch, 0)), model.encode(*uc2_slot(batch, 1))
        swapped = model._run(uc2_swapped(batch))
        assert logits.shape == (3, 2) and model.predict(batch).tolist() == logits.argmax(-1).tolist()
        torch.testing.assert_close(logits, model.head(torch.cat([left, right], -1)))
        torch.testing.assert_close(swapped, model.head(torch.cat([right, left], -1)))
        assert not torch.allclose(swapped, logits)
        # loss: VOLTA's BCEWithLogits against the one-hot target, mean over batch and both classes, unscaled
        torch.testing.assert_close(
            model.loss(batch), torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["target"])
        )
        assert model.cls_features(batch).shape == (6, 32)  # pooled output per image row


def test_marvl_dropout_acts_on_each_image_row_before_the_pair_is_joined():
    """In training the classifier's dropout masks the 2B pooled rows (VOLTA: self.dropout(pooled_output_t), then
    the view): with only that dropout active, the logits are the head on the masked rows, joined per pair."""
    model = marvl_model()
    model.dropout.train()
    batch = uc2_batch(U.resolve_config(UC2_TINY))
    with torch.no_grad():
        pooled = model.encode(*U.UC2._flat(batch))
        torch.manual_seed(5)
        got = model._run(batch)
        torch.manual_seed(5)
        want = model.head(model.dropout(pooled).view(-1, 2 * pooled.shape[1]))
    torch.testing.assert_close(got, want)


def test_marvl_defaults_and_help():
    """IGLUE's NLVR2 task config (TASK12: lr 1e-5, batch 64, 20 epochs) for both recipes (the paper is silent on
    MaRVL), IGLUE's optimizer flags under --recipe iglue; --help lists the marvl defaults."""
    assert U.DEFAULTS[("paper", "marvl")] == dict(epochs=20, lr=1e-5, batch_size=64)
    assert U.DEFAULTS[("iglue", "marvl")] == dict(epochs=20, lr=1e-5, batch_size=64, **U.IGLUE_OPTIM)
    args = engine.parse_args(U.build_parser(), ["--task", "marvl", "--print-schedule"], U.DEFAULTS, "uc2")
    assert (args.epochs, args.lr, args.batch_size, args.max_regions) == (20, 1e-5, 64, 36)
    text = U.build_parser().format_help()
    assert "marvl 20" in text and "marvl 1e-05" in text and "marvl 64" in text


def test_print_schedule_shows_the_two_image_layout(capsys):
    U.main(["--task", "marvl", "--policy", "suf", "--model-config", UC2_TINY, "--print-schedule", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 20 and [len(r["trainable_layers"]) for r in rows[:5]] == [3, 6, 9, 12, 12]
    assert all(r["passes_per_layer"] == 2 and r["task_head"] == ["head", "pooler"] for r in rows)
    U.main(["--task", "marvl", "--policy", "top", "--model-config", UC2_TINY, "--print-schedule"])
    out = capsys.readouterr().out
    assert out.startswith("2 images per example: every layer runs once per image") and "task head: head, pooler" in out


# ------------------------------------------------------------------- marvl: IGLUE's serialized NLVR2 train + dev files


def serialized_cli(sample, out, files, *extra, task: str = "marvl"):
    """cli(task, ...) with --features `files` (serialized LMDBs, then any image-keyed ones) and the split the
    serialized dev file serves: marvl dev, xgqa valid (English only)."""
    argv = cli(task, sample, out, *(("--langs", "en") if task == "xgqa" else ()), *extra)
    at = argv.index("--features") + 1
    argv[at : at + 1] = [str(f) for f in files]
    argv[argv.index("--eval-split") + 1] = {"marvl": "dev", "xgqa": "valid"}[task]
    return argv


@pytest.fixture(scope="module")
def nlvr2_lmdbs(sample, tmp_path_factory):
    """IGLUE's serialized NLVR2 files as its VOLTA config names them: training = the sample's first 40 dev lines,
    dev = all 60 (records of the sample's annotation lines, features from the image-keyed sample file)."""
    out, exs = tmp_path_factory.mktemp("nlvr2_lmdb"), data.load_split(IGLUE, "marvl", "dev", "en")
    write = serialized_lmdb.write_serialized
    train = write(out / "nlvr2-train_boxes36.lmdb", serialized_lmdb.nlvr2_records(exs[:40], sample / "feats"))
    return train, write(out / "nlvr2-dev_boxes36.lmdb", serialized_lmdb.nlvr2_records(exs, sample / "feats"))


def test_marvl_trains_and_evaluates_dev_from_iglues_serialized_files(sample, nlvr2_lmdbs, tmp_path):
    """--features nlvr2-train_boxes36.lmdb nlvr2-dev_boxes36.lmdb --eval-split dev: training from the training file,
    English dev from the dev file after every epoch, no image-keyed file needed; the dev accuracy logged equals the
    final model's on the image-keyed equivalent (the same records as annotation lines, the same features), example
    by example. With image-keyed features too, the other dev languages (dev-<lang>_gmt) are evaluated beside it."""
    common = ["--policy", "full", "--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--dropout", "0", "--seed", "2"]
    run = tmp_path / "run"
    U.main(serialized_cli(sample, run, nlvr2_lmdbs, *common, "--eval-every", "1", "--langs", "en"))
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in logged if r["type"] == "eval"]
    assert [(r["epoch"], r["lang"], r["split"], r["n"]) for r in evals] == [(1, "en", "dev", 60), (2, "en", "dev", 60)]
    assert sum(r["type"] == "train" for r in logged) == 2
    model = U.build_model("marvl", U.resolve_config(UC2_TINY))
    assert volta.load_into(model, str(run / "model_final.pt")).ok
    tok = tokenizer_check.load_tokenizer(sample / "tok")
    keyed = scoring.evaluate.build_eval_sets(
        "uc2", "marvl", IGLUE, tok, ["en"], "dev", features=str(sample / "feats"), max_regions=REGIONS
    )
    ser = scoring.evaluate.build_eval_sets(
        "uc2", "marvl", IGLUE, tok, ["en"], "dev", max_regions=REGIONS, dev_lmdb=nlvr2_lmdbs[1]
    )
    assert isinstance(ser["en"].dataset, data.SerializedNLVR2Dataset) and isinstance(
        keyed["en"].dataset, data.UC2Dataset
    )
    (pk, ps) = ({}, {})
    got_keyed = scoring.evaluate.evaluate_task(model, "marvl", keyed, predictions=pk)
    got_ser = scoring.evaluate.evaluate_task(model, "marvl", ser, predictions=ps)
    assert got_keyed == got_ser and got_keyed["en"]["accuracy"] == evals[-1]["accuracy"]
    with torch.no_grad():  # beyond the argmax: the same logits, example by example
        logits = [model.eval()._run(s["en"].collate([s["en"].dataset[i] for i in range(60)])) for s in (keyed, ser)]
    assert torch.equal(*logits) and logits[0].std(0).min() > 0
    assert pk == ps and [i for i, _ in ps["en"]] == [ex.id for ex in data.load_split(IGLUE, "marvl", "dev", "en")]
    # the image-keyed file beside them: English dev from the serialized file, MaRVL-id's dev (NLVR2 dev translated)
    # image-keyed; the training file stays the serialized one
    both = tmp_path / "both"
    U.main(serialized_cli(sample, both, [*nlvr2_lmdbs, sample / "feats"], *common, "--langs", "en", "id"))
    final = [json.loads(line) for line in (both / "metrics.jsonl").read_text().splitlines()]
    assert [(r["lang"], r["n"]) for r in final if r["type"] == "eval"] == [
        ("en", 60),
        ("id", len(data.load_split(IGLUE, "marvl", "dev", "id"))),
    ]


@pytest.mark.parametrize(
    "case",
    [
        "two_training_files",
        "two_dev_files",
        "dev_file_alone",
        "three_files",
        "dev_file_of_gqa",
        "dev_file_with_test_split",
    ],
)
def test_bad_serialized_nlvr2_file_combination_is_one_line(case, sample, nlvr2_lmdbs, tmp_path):
    """Which serialized NLVR2 file is which goes by name (IGLUE's nlvr2-train_* / nlvr2-dev_*): two training files,
    two dev files, a dev file alone, three files, a dev file holding GQA records, or a dev file with --eval-split test
    (it is English dev) are each one line before training; no checkpoint or metrics are written."""
    train, dev = nlvr2_lmdbs
    copy = lambda src, name: shutil.copytree(src, tmp_path / name)  # noqa: E731
    files, split, want = {
        "two_training_files": (
            [train, copy(train, "nlvr2-train2_boxes36.lmdb")],
            "dev",
            r"two training files \(neither is named dev\)",
        ),
        "two_dev_files": ([dev, copy(dev, "nlvr2-dev_X101.lmdb")], "dev", r"two dev files"),
        "dev_file_alone": ([dev], "dev", r"a dev file and no training file"),
        "three_files": (
            [train, dev, copy(dev, "nlvr2-dev_copy.lmdb")],
            "dev",
            r"several serialized LMDBs given \(.*\); give the training one and at most the dev one",
        ),
        "dev_file_of_gqa": (
            [train, copy(ROOT / "tests/fixtures/features/gqa_serialized_fixture.lmdb", "gqa-dev_boxes36.lmdb")],
            "dev",
            r"evaluation data: .*gqa-dev_boxes36.lmdb is a serialized LMDB of xgqa records, not of marvl's",
        ),
        "dev_file_with_test_split": (
            [train, dev],
            "test",
            r"evaluation data: .*nlvr2-dev_boxes36.lmdb: a serialized NLVR2 dev file is evaluated with --task marvl "
            r"--eval-split dev, not marvl test",
        ),
    }[case]
    argv = serialized_cli(sample, tmp_path / "run", files, "--epochs", "1", "--langs", "en")
    argv[argv.index("--eval-split") + 1] = split
    with pytest.raises(SystemExit) as e:
        U.main(argv)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg and re.search(want, msg), msg
    assert not any((tmp_path / "run").glob("*.pt")) and not (tmp_path / "run" / "metrics.jsonl").exists()


def zeroshot_results(run, *extra) -> dict:
    """eval_zeroshot.py evaluate --run `run` (data arguments from its args.json unless `extra` gives them): the
    results.json record of the split evaluated and that split's per-example English predictions file."""
    import eval_zeroshot

    assert eval_zeroshot.main(["evaluate", "--run", str(run), "--num-workers", "0", *extra]) == 0
    split = (
        extra[extra.index("--split") + 1]
        if "--split" in extra
        else json.loads((run / "args.json").read_text())["eval_split"]
    )
    record = json.loads((run / "results.json").read_text())[split]
    return {**record, "predictions": json.loads((run / f"{split}_en_0_result.json").read_text())}


def test_eval_zeroshot_dev_of_a_serialized_marvl_run_reads_the_dev_file(sample, nlvr2_lmdbs, tmp_path):
    """eval_zeroshot.py evaluate --split dev of a run trained from IGLUE's serialized NLVR2 files reads English dev
    from the run's serialized dev file (no annotation or image-keyed file needed) and reproduces the accuracy the
    trainer logged; --split test reads image-keyed files, the dev file among --features notwithstanding."""
    run = tmp_path / "run"
    common = ["--policy", "full", "--epochs", "1", "--batch-size", "8", "--lr", "1e-3", "--dropout", "0", "--seed", "3"]
    U.main(serialized_cli(sample, run, nlvr2_lmdbs, *common, "--langs", "en"))
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (final,) = [r for r in logged if r["type"] == "eval"]
    dev = zeroshot_results(run)  # --split dev, --features and --langs en from args.json
    assert dev["split"] == "dev" and dev["files"] == {"en": str(nlvr2_lmdbs[1])}
    assert dev["langs"]["en"]["accuracy"] == final["accuracy"] and dev["langs"]["en"]["n"] == 60
    exs = data.load_split(IGLUE, "marvl", "dev", "en")
    assert [(p["id"], p["sentence"], p["label"]) for p in dev["predictions"]] == [(e.id, e.text, e.label) for e in exs]
    test = zeroshot_results(run, "--split", "test", "--features", *map(str, nlvr2_lmdbs), str(sample / "feats"))
    assert test["files"]["en"].endswith("test.jsonl") and test["langs"]["en"]["n"] == len(
        data.load_split(IGLUE, "marvl", "test", "en")
    )


# ------------------------------------------------------------------- xgqa: IGLUE's serialized GQA train + valid files


@pytest.fixture(scope="module")
def gqa_lmdbs(sample, tmp_path_factory):
    """IGLUE's serialized GQA files as its VOLTA config names them: training = the sample's first 128 GQA testdev
    questions, validation = all 300 (records of the sample's annotation lines, features from the sample file)."""
    out, exs = tmp_path_factory.mktemp("gqa_lmdb"), data.load_split(IGLUE, "xgqa", "testdev", "en")
    write = serialized_lmdb.write_serialized
    train = write(out / "gqa-train_boxes36.lmdb", serialized_lmdb.gqa_records(exs[:128], sample / "feats"))
    return train, write(out / "gqa-valid_boxes36.lmdb", serialized_lmdb.gqa_records(exs, sample / "feats"))


def test_xgqa_trains_and_validates_from_iglues_serialized_files(sample, gqa_lmdbs, tmp_path):
    """--features gqa-train_boxes36.lmdb gqa-valid_boxes36.lmdb --eval-split valid: training from the training file,
    English valid from the validation file after every epoch (VOLTA's val_split), no annotation or image-keyed file
    needed; the accuracy logged equals the final model's on the image-keyed equivalent (the same questions as
    annotation lines, the same features), prediction by prediction, and eval_zeroshot.py reproduces it."""
    common = ["--policy", "full", "--epochs", "2", "--batch-size", "16", "--lr", "1e-2", "--dropout", "0"]
    run = tmp_path / "run"
    U.main(serialized_cli(sample, run, gqa_lmdbs, *common, "--seed", "2", "--eval-every", "1", task="xgqa"))
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in logged if r["type"] == "eval"]
    assert [(r["epoch"], r["lang"], r["split"], r["n"]) for r in evals] == [
        (1, "en", "valid", 300),
        (2, "en", "valid", 300),
    ]
    model = U.build_model("xgqa", U.resolve_config(UC2_TINY))
    assert volta.load_into(model, str(run / "model_final.pt")).ok
    tok = tokenizer_check.load_tokenizer(sample / "tok")
    keyed = scoring.evaluate.build_eval_sets(
        "uc2", "xgqa", IGLUE, tok, ["en"], "testdev", features=str(sample / "feats"), max_regions=REGIONS
    )
    ser = scoring.evaluate.build_eval_sets(
        "uc2", "xgqa", IGLUE, tok, ["en"], "valid", max_regions=REGIONS, dev_lmdb=gqa_lmdbs[1]
    )
    assert isinstance(ser["en"].dataset, data.SerializedGQADataset) and isinstance(keyed["en"].dataset, data.UC2Dataset)
    (pk, ps) = ({}, {})
    got_keyed = scoring.evaluate.evaluate_task(model, "xgqa", keyed, predictions=pk)
    got_ser = scoring.evaluate.evaluate_task(model, "xgqa", ser, predictions=ps)
    same = lambda m: {k: v for k, v in m["en"].items() if v == v}  # noqa: E731 - NaN (no question of a type) aside
    assert same(got_keyed) == same(got_ser) and got_keyed["en"]["accuracy"] == evals[-1]["accuracy"] > 0
    with torch.no_grad():  # beyond the argmax: the same logits, question by question
        logits = [model.eval()._run(s["en"].collate([s["en"].dataset[i] for i in range(300)])) for s in (keyed, ser)]
    assert torch.equal(*logits) and logits[0].std(0).max() > 0 and pk == ps
    valid = zeroshot_results(run)  # --split valid from args.json
    assert same(valid["langs"]) == same(got_ser) and valid["files"] == {"en": str(gqa_lmdbs[1])}
    assert [p["questionId"] for p in valid["predictions"]] == [i for i, _ in ps["en"]]


@pytest.mark.parametrize(
    "case",
    ["two_training_files", "two_validation_files", "validation_file_alone", "three_files", "valid_with_another_split"]
    + ["valid_file_of_nlvr2", "valid_record_without_question"],
)
def test_bad_serialized_gqa_file_combination_is_one_line(case, sample, gqa_lmdbs, nlvr2_lmdbs, tmp_path):
    """As marvl's: the serialized GQA files are told apart by name (IGLUE's gqa-train_* / gqa-valid_*; val too): two
    training files, two validation files, a validation file alone, three files, a validation file with another
    --eval-split or holding NLVR2 records, and a validation record without its question are each one line before
    training; no checkpoint or metrics are written."""
    train, valid = gqa_lmdbs
    copy = lambda src, name: shutil.copytree(src, tmp_path / name)  # noqa: E731
    bad = None
    if case == "valid_record_without_question":
        records = serialized_lmdb.gqa_records(data.load_split(IGLUE, "xgqa", "testdev", "en")[:8], sample / "feats")
        del records[5]["entry"]["question"]
        bad = serialized_lmdb.write_serialized(tmp_path / "gqa-valid_boxes36.lmdb", records)
    files, split, want = {
        "two_training_files": (
            [train, copy(train, "gqa-train2_boxes36.lmdb")],
            "valid",
            r"two training files \(neither "
            r"is named valid or val\); serialized GQA files are told apart by name, as IGLUE names them",
        ),
        "two_validation_files": ([valid, copy(valid, "gqa-val_X101.lmdb")], "valid", r"two validation files"),
        "validation_file_alone": ([valid], "valid", r"a validation file and no training file"),
        "three_files": (
            [train, valid, copy(valid, "gqa-val.lmdb")],
            "valid",
            r"several serialized LMDBs given \(.*\); "
            r"give the training one and at most the validation one \(gqa-valid_\*\.lmdb\)",
        ),
        "valid_with_another_split": (
            [train, valid],
            "dev",
            r"evaluation data: .*gqa-valid_boxes36.lmdb: a serialized GQA "
            r"validation file is evaluated with --task xgqa --eval-split valid, not xgqa dev",
        ),
        "valid_file_of_nlvr2": (
            [train, copy(nlvr2_lmdbs[1], "nlvr2-valid.lmdb")],
            "valid",
            r"evaluation data: "
            r".*nlvr2-valid.lmdb is a serialized LMDB of marvl records, not of xgqa's",
        ),
        "valid_record_without_question": (
            [train, bad],
            "valid",
            r"evaluation data: .*gqa-valid_boxes36.lmdb: record '00000005': not a GQA question record \(KeyError ",
        ),
    }[case]
    argv = serialized_cli(sample, tmp_path / "run", files, "--epochs", "1", task="xgqa")
    argv[argv.index("--eval-split") + 1] = split
    with pytest.raises(SystemExit) as e:
        U.main(argv)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg and re.search(want, msg), msg
    assert not any((tmp_path / "run").glob("*.pt")) and not (tmp_path / "run" / "metrics.jsonl").exists()
