"""Tests of data.py on the real IGLUE sample and the UC2/CCLM reference fixtures (tests/fixtures only)."""

import argparse
import io
import itertools
import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
from contextlib import redirect_stdout
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from _timeouts import scaled

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
from training import loaders  # noqa: E402
from formats import tokenizer_check  # noqa: E402
from formats import iglue, iglue_layout  # noqa: E402
from formats import readers, x2vlm_text  # noqa: E402
from formats import feature_sets  # noqa: E402
from formats.features import box_locations, decode_serialized, is_serialized_lmdb, open_features  # noqa: E402
from formats.features import SerializedRecords, pad_regions, serialized_task  # noqa: E402
from comparisons.mclip import xtd_data  # noqa: E402
from synthetic import fixtures  # noqa: E402
from checks import inventory, preflight  # noqa: E402
from parity import assert_matches_reference  # noqa: E402
import _serialized_lmdb as serialized_lmdb  # noqa: E402
import train_uc2 as U  # noqa: E402

FIX = Path(__file__).parent / "fixtures"
ROOT = FIX / "iglue"
FEAT = FIX / "features"
XGQA_LANGS = ["bn", "de", "en", "id", "ko", "pt", "ru", "zh"]
XVNLI_LANGS = ["ar", "en", "es", "fr", "ru"]
XFLICKRCO_LANGS = ["de", "en", "es", "id", "ja", "ru", "tr", "zh"]


# --------------------------------------------------------------------------------------------- helpers


class FakeTokenizer:
    """Maps known texts to fixed ids (the reference fixtures' stand-in tokenizer output)."""

    pad_token_id = 1

    def __init__(self, table):
        self.table = table

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [list(self.table[t]) for t in texts]}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [
        ex.text
        for t, s, l in [
            ("xgqa", "dev", "en"),
            ("xgqa", "dev", "de"),
            ("xvnli", "test", "en"),
            ("xflickrco", "valid", "en"),
            ("xflickrco", "test", "zh"),
            ("marvl", "dev", "en"),
            ("marvl", "test", "zh"),
        ]
        for ex in data.load_split(ROOT, t, s, l)
    ]
    out = tmp_path_factory.mktemp("tok")
    fixtures.make_tiny_tokenizer(texts, out, vocab_size=400)
    return tokenizer_check.load_tokenizer(out)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Synthetic features and images for every image the sample references."""
    base = tmp_path_factory.mktemp("synthetic")
    keys, files = set(), set()
    for task in data.TASKS:
        for split in iglue_layout.available_splits(ROOT, task):
            for lang in iglue_layout.available_langs(ROOT, task, split):
                for ex in data.load_split(ROOT, task, split, lang):
                    keys |= {ex.image, ex.image2} - {""}
                    files |= {ex.image_file, ex.image2_file} - {""}
    fixtures.write_synthetic_features(base / "feats.lmdb", keys, num_boxes=5, seed=1)
    fixtures.write_synthetic_images(base / "images", sorted(files), size=(40, 30))
    return {"features": base / "feats.lmdb", "images": base / "images", "keys": keys, "files": files}


def ids(task, split, lang, **kw):
    return [ex.id for ex in data.load_split(ROOT, task, split, lang, **kw)]


# --------------------------------------------------------------------------------------------- annotations


def test_discovery():
    assert iglue_layout.available_splits(ROOT, "xgqa") == ["dev", "testdev", "train_5"]
    assert iglue_layout.available_splits(ROOT, "xvnli") == ["test", "train_48"]
    assert iglue_layout.available_splits(ROOT, "xvnli", translate_test=True) == ["test"]
    assert iglue_layout.available_splits(ROOT, "xflickrco") == ["valid", "test"]
    assert iglue_layout.available_langs(ROOT, "xgqa", "dev") == XGQA_LANGS
    assert iglue_layout.available_langs(ROOT, "xgqa", "testdev") == ["en"]
    assert iglue_layout.available_langs(ROOT, "xvnli", "test") == XVNLI_LANGS
    assert iglue_layout.available_langs(ROOT, "xvnli", "test", translate_test=True) == ["ar", "es", "fr", "ru"]
    assert iglue_layout.available_langs(ROOT, "xflickrco", "test") == XFLICKRCO_LANGS
    assert data.select_langs("de,ko", XGQA_LANGS) == ["de", "ko"]
    assert data.select_langs(None, XGQA_LANGS) == XGQA_LANGS
    with pytest.raises(ValueError, match="xx"):
        data.select_langs(["de", "xx"], XGQA_LANGS)


def test_answer_vocab():
    ans2label, label2ans = data.load_answer_vocab(ROOT)
    assert len(ans2label) == len(label2ans) == data.NUM_ANSWERS == 1842
    assert all(label2ans[i] == a for a, i in ans2label.items())


def test_xgqa_dev_and_few_shot_parallel():
    ans2label, _ = data.load_answer_vocab(ROOT)
    for split, n, n_img in (("dev", 120, 42), ("train_5", 155, 5)):
        per_lang = {l: data.load_split(ROOT, "xgqa", split, l) for l in XGQA_LANGS}
        ref = per_lang["en"]
        assert len(ref) == n and len({ex.image for ex in ref}) == n_img
        for lang, exs in per_lang.items():
            assert [ex.id for ex in exs] == [ex.id for ex in ref], (split, lang)
            assert [ex.image for ex in exs] == [ex.image for ex in ref]
            assert [ex.gold for ex in exs] == [ex.gold for ex in ref]
            assert all(
                ex.lang == lang and ex.label == ans2label[ex.gold] and ex.scores == {ex.label: 1.0} for ex in exs
            )
            assert {ex.qtype for ex in exs} <= {"verify", "query", "choose", "logical", "compare"}
        assert sum(ex.qtype == "query" for ex in ref) == (62 if split == "dev" else 86)
    de = data.load_split(ROOT, "xgqa", "dev", "de")[0]
    assert (de.id, de.image, de.image_file, de.text) == (
        "201640614",
        "n235859",
        "gqa/n235859.jpg",
        "Wer trägt das Kleid?",
    )


def test_gqa_testdev_list_format():
    exs = data.load_split(ROOT, "xgqa", "testdev", "en")
    assert len(exs) == 300 and len({ex.image for ex in exs}) == 175
    assert (exs[0].id, exs[0].image, exs[0].text, exs[0].gold) == ("201307251", "n161313", "Is it overcast?", "no")
    assert all(ex.label >= 0 and sum(ex.scores.values()) == 1.0 and ex.qtype == "" for ex in exs)


def test_xvnli_parallel_and_translate_test():
    ref = data.load_split(ROOT, "xvnli", "test", "en")
    assert len(ref) == 90 and len({ex.image for ex in ref}) == 30
    assert (ref[0].id, ref[0].image, ref[0].image_file, ref[0].text, ref[0].gold, ref[0].label) == (
        "759822302.jpg#2r1c",
        "759822302",
        "flickr30k/759822302.jpg",
        "He is wearing the newspaper on his head.",
        "contradiction",
        0,
    )
    assert sum(ex.gold == "-" for ex in ref) == 1 and all((ex.label == -1) == (ex.gold == "-") for ex in ref)
    for lang in XVNLI_LANGS:
        exs = data.load_split(ROOT, "xvnli", "test", lang)
        assert [ex.id for ex in exs] == [ex.id for ex in ref] and [ex.gold for ex in exs] == [ex.gold for ex in ref]
        assert len(ids("xvnli", "train_48", lang)) == 60 and ids("xvnli", "train_48", lang) == ids(
            "xvnli", "train_48", "en"
        )
    for lang in ["ar", "es", "fr", "ru"]:
        mt = data.load_split(ROOT, "xvnli", "test", lang, translate_test=True)
        assert [ex.id for ex in mt] == [ex.id for ex in ref] and [ex.gold for ex in mt] == [ex.gold for ex in ref]
        assert "annotations_machine-translate" in mt[0].source


def test_xflickrco_and_flickr30k():
    ref = data.load_split(ROOT, "xflickrco", "test", "en")
    assert len(ref) == 40 and [ex.label for ex in ref] == list(range(40))
    assert all(ex.image_file == f"flickr30k/{ex.image}" and ex.image[:-4].isdigit() for ex in ref[:20])
    assert all(ex.image.startswith("COCO_val2014_") and ex.image_file == f"coco/{ex.image}" for ex in ref[20:])
    for lang in XFLICKRCO_LANGS:
        exs = data.load_split(ROOT, "xflickrco", "test", lang)
        assert [(ex.id, ex.image) for ex in exs] == [(ex.id, ex.image) for ex in ref]
    valid = data.load_split(ROOT, "xflickrco", "valid", "en")
    assert len(valid) == 300 and len({ex.image for ex in valid}) == 60
    assert all(sum(e.image == ex.image for e in valid) == 5 for ex in valid[::5])
    assert (valid[0].id, valid[0].image, valid[0].image_file) == (
        "1018148011#0",
        "1018148011",
        "flickr30k/1018148011.jpg",
    )


def test_retrieval_line_without_captions_takes_no_image_index(tmp_path):
    folder = tmp_path / "datasets" / "xFlickrCO" / "annotations" / "de"
    folder.mkdir(parents=True)
    lines = [
        {"sentences": [], "id": "A", "img_path": "A.jpg"},
        {"sentences": ["ein hund"], "id": "B", "img_path": "B.jpg"},
        {"sentences": ["eine katze"], "id": "C", "img_path": "C.jpg"},
    ]
    (folder / "test.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    exs = data.load_split(tmp_path, "xflickrco", "test", "de")
    assert [(ex.image, ex.label) for ex in exs] == [("B.jpg", 0), ("C.jpg", 1)]  # gold indices = image items


def test_oov_answer_is_label_minus_one(tmp_path, tokenizer):
    root = tmp_path / "datasets"
    shutil.copytree(ROOT / "datasets" / "gqa", root / "gqa")
    q = json.loads((ROOT / "datasets/xGQA/annotations/few_shot/en/dev.json").read_text())
    qid = next(iter(q))
    q[qid]["answer"] = "not-an-answer-in-the-vocabulary"
    (root / "xGQA/annotations/few_shot/en").mkdir(parents=True)
    (root / "xGQA/annotations/few_shot/en/test.json").write_text(json.dumps(q))
    exs = data.load_split(tmp_path, "xgqa", "test", "en")
    assert exs[0].label == -1 and exs[0].scores == {} and exs[1].label >= 0
    fixtures.write_synthetic_features(tmp_path / "f.lmdb", [ex.image for ex in exs[:2]], num_boxes=2)
    ds = data.UC2Dataset(exs[:2], str(tmp_path / "f.lmdb"), "xgqa")
    batch = data.UC2Collate("xgqa", tokenizer)([ds[0], ds[1]])
    assert batch["label"][0] == -1 and batch["target"][0].sum() == 0 and batch["target"][1].sum() == 1


# --------------------------------------------------------------------------------------------- region features


@pytest.mark.parametrize(
    "path,expected",
    [
        ("features_fixture.lmdb", "features_fixture_expected.pt"),
        ("features_fixture.h5", "features_fixture_expected.pt"),
        ("features_fixture_x101.lmdb", "features_fixture_x101_expected.pt"),
    ],
)
def test_region_features_match_volta(path, expected):
    exp = torch.load(FEAT / expected, weights_only=True)
    meta = json.loads((FEAT / "features_fixture_meta.json").read_text())
    kind = "x101" if "x101" in path else "h5"
    sizes = {
        k: (tuple(s), n)
        for k, s, n in zip(
            meta[f"ids_{kind}"], meta[f"sizes_wh_{kind}"], meta["num_rows_x101" if kind == "x101" else "num_boxes_h5"]
        )
    }
    reader = open_features(FEAT / path)
    assert reader.keys() == set(exp["order"]) == set(sizes)
    for key, e in exp["images"].items():
        feats, boxes, w, h = reader.get(key)
        assert len(feats) == e["reader_num_boxes"] and sizes[key] == ((w, h), len(feats))
        assert torch.equal(torch.from_numpy(box_locations(boxes, w, h)), e["reader_image_location"])
        for r in (36, 100):
            out = reader.regions(key, r)
            n = e[f"num_boxes_{r}"]
            assert out["features"].shape == (r, 2048) and out["features"].dtype == torch.float32
            assert torch.equal(out["features"][:n], e["features"][:n]) and not out["features"][n:].any()
            assert torch.equal(out["spatials"], e[f"spatials_{r}"])
            assert torch.equal(out["image_mask"], e[f"image_mask_{r}"])


def test_serialized_gqa_matches_volta():
    exp = torch.load(FEAT / "gqa_serialized_fixture_expected.pt", weights_only=True)
    feats_exp = torch.load(FEAT / "features_fixture_expected.pt", weights_only=True)["images"]
    recs = exp["records"]
    tok = FakeTokenizer({r["question"]: r["token_ids"] for r in recs})
    assert is_serialized_lmdb(FEAT / "gqa_serialized_fixture.lmdb")
    for r, b in ((100, exp["batch_100"]), (36, exp["batch_36"])):
        ds = data.SerializedGQADataset(FEAT / "gqa_serialized_fixture.lmdb", max_regions=r)
        assert len(ds) == 12
        rows = list(range(12)) if r == 100 else exp["batch_36_record_index"].tolist()
        batch = data.UC2Collate("xgqa", tok)([ds[i] for i in rows])
        assert batch["id"] == [recs[i]["question_id_str"] for i in rows]
        assert torch.equal(batch["input_ids"], b["input_ids"]) and torch.equal(batch["attention_mask"], b["input_mask"])
        assert torch.equal(batch["target"], b["target"]) and torch.equal(batch["spatials"], b["spatials"])
        assert torch.equal(batch["image_mask"], b["image_mask"])
        assert batch["label"].tolist() == [recs[i]["labels"][0] for i in rows]
        for j, i in enumerate(rows):
            f = feats_exp[recs[i]["image_id"]]["features"]
            n = min(len(f), r)
            assert torch.equal(batch["features"][j, :n], f[:n]) and not batch["features"][j, n:].any()
    # records VOLTA cannot process at 36 boxes are truncated like the image-keyed reader
    ds36 = data.SerializedGQADataset(FEAT / "gqa_serialized_fixture.lmdb", max_regions=36)
    for i, rec in enumerate(recs):
        if not rec["ok_36"]:
            assert torch.equal(
                pad_regions(*ds36[i]["regions"], 36)["spatials"], feats_exp[rec["image_id"]]["spatials_36"]
            )
    assert (
        data.make_dataset("uc2", "xgqa", None, features=str(FEAT / "gqa_serialized_fixture.lmdb")).__class__
        is data.SerializedGQADataset
    )


def test_lmdb_opened_lazily_per_worker(synthetic):
    exs = data.load_split(ROOT, "xvnli", "test", "en")[:8]
    ds = data.UC2Dataset(exs, str(synthetic["features"]), "xvnli")
    state = pickle.loads(pickle.dumps(ds.reader))
    assert state._handle is None
    loader = DataLoader(
        ds,
        batch_size=4,
        num_workers=2,
        collate_fn=data.UC2Collate("xvnli", FakeTokenizer({ex.text: [0, 5, 2] for ex in exs})),
        multiprocessing_context="fork",
    )
    batches = list(loader)
    assert [b["image_mask"].sum(1).tolist() for b in batches] == [[5] * 4] * 2
    serial = [data.UC2Collate("xvnli", FakeTokenizer({ex.text: [0, 5, 2] for ex in exs}))([ds[i] for i in range(4, 8)])]
    assert all(torch.equal(batches[1][k], serial[0][k]) for k in ("features", "spatials", "image_mask", "input_ids"))


def test_synthetic_features_format(tmp_path):
    import lmdb

    fixtures.write_synthetic_features(tmp_path / "f.lmdb", ["b", "a", 3], num_boxes=4, seed=0)
    env = lmdb.open(str(tmp_path / "f.lmdb"), readonly=True, lock=False)
    with env.begin() as txn:
        assert pickle.loads(txn.get(b"keys")) == [b"3", b"a", b"b"]
        item = pickle.loads(txn.get(b"a"))
    assert item["features"].shape == (4, 2048) and item["boxes"].dtype == np.float32 and item["img_id"] == "a"
    assert isinstance(item["img_w"], np.int64)
    env.close()


# --------------------------------------------------------------------------------------------- images and text


def test_cclm_eval_transform_matches_reference(tmp_path):
    ref = torch.load(FEAT / "cclm_preprocess.pt", weights_only=True)
    for i, raw in enumerate(ref["raw_images_uint8_hwc"]):
        path = tmp_path / f"{i}.png"  # stored losslessly and read back, as the reference did
        Image.fromarray(raw.numpy()).save(path)
        out = data.eval_transform(readers.load_image(path), ref["image_res"])
        assert out.shape == ref["images"][i].shape
        assert_matches_reference(f"image {i}", out, ref["images"][i])
    assert torch.allclose(torch.tensor(data.CLIP_MEAN), ref["mean"]) and torch.allclose(
        torch.tensor(data.CLIP_STD), ref["std"]
    )


def test_train_transform_seeded():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    a = data.train_transform(img, 32, np.random.default_rng([0, 1, 2]), flip=True)
    b = data.train_transform(img, 32, np.random.default_rng([0, 1, 2]), flip=True)
    c = data.train_transform(img, 32, np.random.default_rng([0, 2, 2]), flip=True)
    assert a.shape == (3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    for seed in range(30):  # every augmentation op runs on odd sizes without error
        data.train_transform(img, 17, np.random.default_rng(seed), flip=True)


def test_text_cleaning():
    assert x2vlm_text.pre_caption("A <person> in a Red-Shirt, runs!!  Fast.", 80) == "a person in a red shirt runs fast"
    assert x2vlm_text.pre_caption("one two three four", 2) == "one two"
    assert x2vlm_text.pre_question("Is the man to the LEFT of the car?", 50) == "is the man to the left of the car"
    assert x2vlm_text.pre_question("a  b c d", 3) == "a  b"  # whitespace runs are not collapsed in questions
    with pytest.raises(ValueError, match="empty"):
        x2vlm_text.pre_caption("...", 80)


def test_tokenizer_padding_and_truncation(tokenizer, tmp_path):
    assert (
        tokenizer.pad_token_id,
        tokenizer.convert_tokens_to_ids("<s>"),
        tokenizer.convert_tokens_to_ids("</s>"),
        tokenizer.unk_token_id,
    ) == (1, 0, 2, 3)
    texts = ["a cat", "a man rides a bicycle down the road next to a red car"]
    ids, mask = data.encode_texts(tokenizer, texts)
    full = tokenizer(texts)["input_ids"]
    assert ids.shape == (2, len(full[1])) and ids.dtype == mask.dtype == torch.long
    assert ids[0, : len(full[0])].tolist() == full[0] and (ids[0, len(full[0]) :] == 1).all()
    assert mask.sum(1).tolist() == [len(full[0]), len(full[1])]
    tokenizer(texts, truncation=True, max_length=4)  # an HF call leaves truncation state in the fast backend
    assert torch.equal(data.encode_texts(tokenizer, texts)[0], ids)
    short, smask = data.encode_texts(tokenizer, texts, max_len=6)
    assert short.shape == (2, 6) and short[1].tolist() == full[1][:5] + [2] and smask[1].all()
    with pytest.raises(ValueError, match="no-such-tokenizer"):
        tokenizer_check.load_tokenizer(tmp_path / "no-such-tokenizer")


def test_encode_texts_ids_equal_the_fast_backend_on_every_fixture_text(tokenizer):
    """encode_texts tokenises through the tokenizer's public call; its ids are those the Rust backend gives
    directly (what data.py used before), on every text of every fixture file, with and without truncation."""
    texts = [
        ex.text
        for task in data.TASKS
        for split in iglue_layout.available_splits(ROOT, task)
        for lang in iglue_layout.available_langs(ROOT, task, split)
        for ex in data.load_split(ROOT, task, split, lang)
    ]
    backend = tokenizer._tokenizer
    backend.no_truncation()
    backend.no_padding()
    want = [e.ids for e in backend.encode_batch(texts, add_special_tokens=True)]
    tokenizer(texts[:2], truncation=True, max_length=4, padding="max_length")  # leaves state in the backend
    assert len(texts) > 300
    for max_len in (None, 40, 6):
        for i in range(0, len(texts), 64):
            ids, mask = data.encode_texts(tokenizer, texts[i : i + 64], max_len)
            rows = [w if max_len is None or len(w) <= max_len else w[: max_len - 1] + w[-1:] for w in want[i : i + 64]]
            assert [row[m.bool()].tolist() for row, m in zip(ids, mask)] == rows


# --------------------------------------------------------------------------------------------- batches


def _check(batch, spec):
    for key, (shape, dtype) in spec.items():
        assert key in batch, key
        assert tuple(batch[key].shape) == shape and batch[key].dtype == dtype, (key, batch[key].shape, batch[key].dtype)


def test_uc2_batches(synthetic, tokenizer):
    f, i64, f32 = str(synthetic["features"]), torch.long, torch.float32
    for task, split, lang in (("xgqa", "dev", "de"), ("xvnli", "test", "en")):
        exs = data.load_split(ROOT, task, split, lang)[:3]
        ds = data.make_dataset("uc2", task, exs, features=f)
        b = data.make_collate("uc2", task, tokenizer)([ds[i] for i in range(3)])
        L = b["input_ids"].shape[1]
        _check(
            b,
            {
                "input_ids": ((3, L), i64),
                "attention_mask": ((3, L), i64),
                "features": ((3, 36, 2048), f32),
                "spatials": ((3, 36, 7), f32),
                "image_mask": ((3, 36), i64),
                "label": ((3,), i64),
            },
        )
        assert b["id"] == [ex.id for ex in exs] and b["lang"] == lang and b["image_mask"].sum(1).tolist() == [5] * 3
        if task == "xgqa":
            _check(b, {"target": ((3, 1842), f32)})
            assert b["qtype"] == [ex.qtype for ex in exs] and (b["target"].argmax(1) == b["label"]).all()
        else:
            _check(b, {"target": ((3, 3), f32)})
            assert b["label"].tolist() == [data.XVNLI_LABELS_UC2.index(ex.gold) for ex in exs]
            assert (b["target"].argmax(1) == b["label"]).all()
    gold_dash = [ex for ex in data.load_split(ROOT, "xvnli", "test", "en") if ex.gold == "-"]
    b = data.UC2Collate("xvnli", tokenizer)([data.UC2Dataset(gold_dash, f, "xvnli")[0]])
    assert b["label"].tolist() == [-1] and b["target"].sum() == 0
    # retrieval training: [B, 4, ...]
    exs = data.load_split(ROOT, "xflickrco", "valid", "en")
    ds = data.make_dataset("uc2", "xflickrco", exs, features=f, train=True, seed=3)
    b = data.make_collate("uc2", "xflickrco", tokenizer, train=True)([ds[i] for i in range(2)])
    L = b["input_ids"].shape[2]
    _check(
        b,
        {
            "input_ids": ((2, 4, L), i64),
            "attention_mask": ((2, 4, L), i64),
            "features": ((2, 4, 36, 2048), f32),
            "spatials": ((2, 4, 36, 7), f32),
            "image_mask": ((2, 4, 36), i64),
        },
    )
    assert L <= 80
    # retrieval eval: images and captions separately, each once
    images, captions = data.make_retrieval_eval("uc2", data.load_split(ROOT, "xflickrco", "test", "ja"), features=f)
    assert len(images) == 40 and len(captions) == 40
    col = data.make_collate("uc2", "xflickrco", tokenizer)
    bi, bc = col([images[i] for i in range(3)]), col([captions[i] for i in (5, 6)])
    _check(bi, {"features": ((3, 36, 2048), f32), "image_index": ((3,), i64)})
    assert bi["image_key"][0] == "1007129816.jpg" and bi["lang"] == "ja"
    _check(bc, {"input_ids": ((2, bc["input_ids"].shape[1]), i64), "image_index": ((2,), i64)})
    assert bc["image_index"].tolist() == [5, 6]


def test_cclm_batches(synthetic, tokenizer):
    im, i64, f32, u8 = str(synthetic["images"]), torch.long, torch.float32, torch.uint8
    q = data.load_split(ROOT, "xgqa", "dev", "en")[:3]
    train = data.make_dataset("cclm", "xgqa", q, images=im, train=True, image_res=32)
    b = data.make_collate("cclm", "xgqa", tokenizer, train=True)([train[i] for i in range(3)])
    _check(
        b,
        {
            "images": ((3, 32, 32, 3), u8),
            "text_ids": ((3, b["text_ids"].shape[1]), i64),
            "answer_ids": ((3, b["answer_ids"].shape[1]), i64),
            "answer_atts": ((3, b["answer_ids"].shape[1]), i64),
            "weights": ((3,), f32),
        },
    )
    assert b["k"] == [1, 1, 1] and b["text_ids"].shape[1] <= 40
    ev = data.make_dataset("cclm", "xgqa", q, images=im, image_res=32)
    b = data.make_collate("cclm", "xgqa", tokenizer)([ev[i] for i in range(3)])
    assert b["label"].tolist() == [ex.label for ex in q] and b["qtype"] == [ex.qtype for ex in q] and "target" not in b
    nli = data.load_split(ROOT, "xvnli", "test", "en")
    ds = data.make_dataset("cclm", "xvnli", nli, images=im, image_res=32)
    assert len(ds) == 89 and ds.dropped == 1  # X2-VLM skips the gold label "-"
    b = data.make_collate("cclm", "xvnli", tokenizer)([ds[i] for i in range(4)])
    assert b["label"].tolist() == [data.XVNLI_LABELS_CCLM.index(ex.gold) for ex in ds.examples[:4]]
    assert b["label"][0] == 0 and b["id"][0] == "759822302.jpg#2r1c"
    ret = data.load_split(ROOT, "xflickrco", "valid", "en")
    ds = data.make_dataset("cclm", "xflickrco", ret, images=im, train=True, image_res=32)
    b = data.make_collate("cclm", "xflickrco", tokenizer, train=True)([ds[i] for i in (0, 1, 5)])
    assert b["idx"].tolist() == [0, 0, 1] and b["images"].shape == (3, 32, 32, 3)
    images, captions = data.make_retrieval_eval(
        "cclm", data.load_split(ROOT, "xflickrco", "test", "de"), images=im, image_res=32
    )
    col = data.make_collate("cclm", "xflickrco", tokenizer)
    bi, bc = col([images[i] for i in (19, 20)]), col([captions[i] for i in (0, 39)])
    assert bi["images"].shape == (2, 32, 32, 3) and bi["image_index"].tolist() == [19, 20]
    assert bi["images"].dtype == u8  # normalised by the model (normalize_images), on its device
    normalised = data.normalize_images(bi["images"])
    assert normalised.shape == (2, 3, 32, 32) and normalised.dtype == f32 and normalised.is_contiguous()
    assert data.normalize_images(normalised) is normalised
    for row, i in enumerate((19, 20)):  # batch + normalize_images == the per-image reference transform, bit for bit
        ex = images.items[i]
        assert torch.equal(normalised[row], data.eval_transform(readers.load_image(Path(im) / ex.image_file), 32))
    assert bi["image_key"] == ["1131056918.jpg", "COCO_val2014_000000391895.jpg"]
    assert bc["text_ids"].dtype == i64 and bc["image_index"].tolist() == [0, 39] and bc["text_ids"].shape[1] <= 80


def test_cclm_retrieval_skips_a_line_of_empty_captions_as_x2vlm(synthetic, tokenizer):
    """IGLUE's de and id xFlickrCo test files each hold one line with an empty caption: X2-VLM skips it
    (1,999 images); UC2 (VOLTA) scores the empty caption."""
    exs = data.load_split(ROOT, "xflickrco", "test", "de")
    empty = 5
    exs = [replace(ex, text="") if ex.label == empty else ex for ex in exs]
    images, captions = data.make_retrieval_eval("cclm", exs, images=str(synthetic["images"]), image_res=16)
    assert len(images) == len(captions) == 39
    assert [ex.label for ex in captions.examples] == list(range(39))  # renumbered: gold indices stay aligned
    assert [it.image for it in images.items] == [ex.image for ex in exs if ex.label != empty]
    col = data.make_collate("cclm", "xflickrco", tokenizer)
    col([captions[i] for i in range(len(captions))])  # every caption cleans to text
    images, captions = data.make_retrieval_eval("uc2", exs, features=str(synthetic["features"]))
    assert len(images) == len(captions) == 40
    assert data.make_collate("uc2", "xflickrco", tokenizer)([captions[empty]])["input_ids"].tolist() == [[0, 2]]


def test_retrieval_negatives_never_the_positive_image(synthetic, tmp_path):
    exs = data.load_split(ROOT, "xflickrco", "valid", "en")
    keys = list(dict.fromkeys(ex.image for ex in exs))
    # hard-negative pool: for image i, itself first then its 3 neighbours (one is i again: must be skipped)
    pool = np.array([[i, i, (i + 1) % 60, (i + 2) % 60] for i in range(60)])
    with open(tmp_path / "hard_negative.pkl", "wb") as fh:
        pickle.dump({"train_image_list": [int(k) for k in keys], "train_hard_pool": pool}, fh)
    ds = data.UC2Dataset(
        exs,
        str(synthetic["features"]),
        "xflickrco",
        train=True,
        negatives="corrected",
        hard_negatives=tmp_path / "hard_negative.pkl",
    )
    for i in range(0, len(exs), 7):
        it = ds[i]
        img = keys.index(exs[i].image)
        assert it["image_indices"][0] == it["image_indices"][1] == it["image_indices"][3] == img
        assert it["image_indices"][2] != img and it["caption_images"][0] == img
        assert it["caption_images"][1] != img and it["caption_images"][3] in ((img + 1) % 60, (img + 2) % 60)
        assert it["texts"][0] == it["texts"][2] == exs[i].text
        assert it["regions"][0] is it["regions"][1] is it["regions"][3]
        assert not np.array_equal(it["regions"][0][0], it["regions"][2][0])


VOLTA_DRAWS = json.loads((FIX / "volta_negatives" / "draws.json").read_text())


def _volta_fixture_dataset(synthetic, with_pool: bool) -> data.UC2Dataset:
    exs = data.load_split(ROOT, "xflickrco", "valid", "en")  # the annotation file VOLTA read for the fixture
    hn = {k: VOLTA_DRAWS[k] for k in ("train_image_list", "train_hard_pool")} if with_pool else None
    return data.UC2Dataset(exs, str(synthetic["features"]), "xflickrco", train=True, hard_negatives=hn)


@pytest.mark.parametrize("branch", ["train", "no_pool"])
def test_volta_negatives_equal_voltas_own_draws_for_the_same_generator_states(synthetic, branch):
    ds = _volta_fixture_dataset(synthetic, with_pool=branch == "train")
    assert ds.negatives == "volta"  # the default: what IGLUE's UC2 runs trained with
    keys = ds.retrieval.image_keys
    for d in VOLTA_DRAWS["draws"][branch]:
        i = d["index"]
        img = ds.retrieval.image_of[i]
        img2, cap2, img3, img4, cap4 = ds.retrieval.volta(
            random.Random(d["py_seed"]), np.random.RandomState(d["np_seed"]), img
        )
        assert [i, cap2, i, cap4] == d["captions"], d
        assert [keys[j] for j in (img, img, img3, img)] == [str(x) for x in d["images"]], d
        assert [keys[img2], keys[img4]] == [str(x) for x in d["caption_images_drawn"]], d


def test_volta_negative_captions_are_always_among_the_files_first_five(synthetic):
    ds = _volta_fixture_dataset(synthetic, with_pool=True)
    ds.set_epoch(2)
    seen = set()
    for i in range(len(ds)):
        it = ds[i]
        assert it["caption_indices"][0] == it["caption_indices"][2] == i
        seen.update(it["caption_indices"][1::2])
        assert it["texts"][1::2] == [ds.examples[c].text for c in it["caption_indices"][1::2]]
        assert it["caption_images"][1::2] == [0, 0]  # entries 0..4 are the first image's captions
        assert it["image_indices"][2] != ds.retrieval.image_of[i]
    assert seen == {0, 1, 2, 3, 4}
    corrected = data.UC2Dataset(
        ds.examples,
        ds.reader,
        "xflickrco",
        train=True,
        negatives="corrected",
        hard_negatives={k: VOLTA_DRAWS[k] for k in ("train_image_list", "train_hard_pool")},
    )
    assert max(c for i in range(len(ds)) for c in corrected[i]["caption_indices"][1::2]) > 4


def test_volta_negatives_maps_one_draw_sequence_to_global_caption_indices(synthetic):
    """The exact index mapping for given draws: random.choice over the image list (redrawn while equal to the
    positive's image), random.choice(range(5)) used as a global caption index, the pool position from numpy."""
    ds = _volta_fixture_dataset(synthetic, with_pool=True)

    class Scripted(random.Random):
        def __init__(self, picks):
            super().__init__(0)
            self.picks = list(picks)

        def choice(self, seq):
            return seq[self.picks.pop(0)]

    class Pos:
        def randint(self, lo, hi):
            assert (lo, hi) == (1, 6)
            return 3

    # image 8; draws: image 8 again (redrawn), image 20, caption 4, image 8, image 31, caption 2
    img = ds.retrieval.image_of[40]
    img2, cap2, img3, img4, cap4 = ds.retrieval.volta(Scripted([8, 20, 4, 8, 31, 2]), Pos(), img)
    assert (img2, cap2, img3, cap4) == (20, 4, 31, 2)
    pool_image = VOLTA_DRAWS["train_image_list"][
        VOLTA_DRAWS["train_hard_pool"][
            [int(k) for k in VOLTA_DRAWS["train_image_list"]].index(int(ds.retrieval.image_keys[img]))
        ][3]
    ]
    assert ds.retrieval.image_keys[img4] == str(pool_image)  # pool position 3 of the image's row
    assert ds.retrieval.volta_count[img4] == 5  # range(5) is what the last choice saw


def test_volta_negatives_refuse_a_pool_without_the_training_images(synthetic):
    hn = {"train_image_list": VOLTA_DRAWS["train_image_list"][1:], "train_hard_pool": [[0, 1]] * 59}
    exs = data.load_split(ROOT, "xflickrco", "valid", "en")
    with pytest.raises(ValueError, match="has no row in train_hard_pool"):
        data.UC2Dataset(exs, str(synthetic["features"]), "xflickrco", train=True, hard_negatives=hn)
    data.UC2Dataset(exs, str(synthetic["features"]), "xflickrco", train=True, hard_negatives=hn, negatives="corrected")


@pytest.mark.parametrize(
    "case, message",
    [
        ("short_row", "the train_hard_pool row of image .* has fewer than 2 entries"),
        ("unknown_image", "names an image that is not in the training annotations"),
        ("not_a_dict", r"expected a dict \(VOLTA's hard_negative.pkl\), got list"),
        ("missing_key", "missing 'train_hard_pool'"),
    ],
)
def test_malformed_hard_negative_file_is_refused_naming_it(synthetic, tmp_path, case, message):
    n = len(VOLTA_DRAWS["train_image_list"])
    hn = {"train_image_list": VOLTA_DRAWS["train_image_list"], "train_hard_pool": [[0, 1]] * n}
    if case == "short_row":
        hn["train_hard_pool"] = [[0]] * n
    elif case == "unknown_image":
        hn["train_hard_pool"] = [[0, n + 5]] * n  # pool index past the list: no training image
    hn = {"not_a_dict": [hn], "missing_key": {"train_image_list": hn["train_image_list"]}}.get(case, hn)
    path = tmp_path / "hard_negative.pkl"
    path.write_bytes(pickle.dumps(hn))
    exs = data.load_split(ROOT, "xflickrco", "valid", "en")
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: .*{message}"):
        data.UC2Dataset(exs, str(synthetic["features"]), "xflickrco", train=True, hard_negatives=str(path))


@pytest.mark.parametrize("label", [["no"], {"no": "x"}, {"no": True}, {"no": float("inf")}, "no", None])
def test_gqa_label_that_is_not_answer_scores_is_refused_naming_the_item(tmp_path, label):
    ds = tmp_path / "datasets"
    shutil.copytree(ROOT / "datasets", ds)
    path = ds / "gqa" / "annotations" / "testdev.json"
    items = json.loads(path.read_text())
    items[3]["label"] = label
    path.write_text(json.dumps(items))
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))} item 3: field 'label' must be an object of answer"):
        data.load_split(tmp_path, "xgqa", "testdev", "en")


@pytest.mark.parametrize("value", [None, ["q1"], True, 1.5])
@pytest.mark.parametrize("key", ["question_id", "img_id"])
def test_gqa_identifier_that_is_not_a_string_or_integer_is_refused_naming_the_item(tmp_path, key, value):
    ds = tmp_path / "datasets"
    shutil.copytree(ROOT / "datasets", ds)
    path = ds / "gqa" / "annotations" / "testdev.json"
    items = json.loads(path.read_text())
    items[3][key] = value  # null would have become the id "None" in prediction files
    path.write_text(json.dumps(items))
    with pytest.raises(
        ValueError, match=f"^{re.escape(str(path))} item 3: field '{key}' must be a string or an integer"
    ):
        data.load_split(tmp_path, "xgqa", "testdev", "en")


def test_integer_identifiers_are_read_as_their_decimal_strings(tmp_path):
    ds = tmp_path / "datasets"
    shutil.copytree(ROOT / "datasets", ds)
    path = ds / "gqa" / "annotations" / "testdev.json"
    items = json.loads(path.read_text())
    items[3]["question_id"] = 20240512
    path.write_text(json.dumps(items))
    assert data.load_split(tmp_path, "xgqa", "testdev", "en")[3].id == "20240512"


def test_set_epoch_determinism(synthetic):
    exs = data.load_split(ROOT, "xflickrco", "valid", "en")
    for negatives in data.RETRIEVAL_NEGATIVES:
        ds = data.UC2Dataset(exs, str(synthetic["features"]), "xflickrco", train=True, seed=5, negatives=negatives)

        def draws():
            return [ds[i]["caption_indices"] + ds[i]["image_indices"] for i in range(20)]

        first = draws()
        assert first == draws()
        ds.set_epoch(1)
        assert first != draws()
        ds.set_epoch(0)
        assert first == draws()
    cd = data.CCLMDataset(exs[:2], str(synthetic["images"]), "xflickrco", train=True, image_res=16, seed=5)
    a = cd[1]["pixels"]
    cd.set_epoch(3)
    b = cd[1]["pixels"]
    cd.set_epoch(0)
    assert torch.equal(a, cd[1]["pixels"]) and not torch.equal(a, b)


# --------------------------------------------------------------------------------------------- batch memory


def _batch_sources(synthetic, tokenizer):
    """(dataset, collate) of UC2 region-feature batches and of CCLM image batches (xGQA training: answer lists)."""
    exs = data.load_split(ROOT, "xvnli", "test", "en")[:24]
    uc2 = data.UC2Dataset(exs, str(synthetic["features"]), "xvnli"), data.UC2Collate("xvnli", tokenizer)
    q = data.load_split(ROOT, "xgqa", "dev", "en")[:24]
    cclm = (
        data.CCLMDataset(q, str(synthetic["images"]), "xgqa", train=True, image_res=16),
        data.CCLMCollate("xgqa", tokenizer, train=True),
    )
    return {"uc2": uc2, "cclm": cclm}


def _assert_same_batch(want: dict, got: dict):
    assert want.keys() == got.keys()
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
        else:
            assert got[k] == v, k


@pytest.mark.parametrize("workers", [0, 2, "spawn"])
def test_batch_loader_gives_the_dataloader_batches(synthetic, tokenizer, workers):
    sources = _batch_sources(synthetic, tokenizer)
    if workers == "spawn":  # a worker started fresh (macOS/Windows default), not forked: UC2 only, start-up is slow
        sources = {"uc2": sources["uc2"]}
    kwargs = {"num_workers": 1, "multiprocessing_context": "spawn"} if workers == "spawn" else {"num_workers": workers}
    for ds, collate in sources.values():
        want = list(DataLoader(ds, batch_size=4, collate_fn=collate))
        got = loaders.BatchLoader(ds, batch_size=4, collate_fn=collate, **kwargs)
        for _ in range(2):  # a second epoch: the same batches again (new workers)
            batches = list(got)
            assert len(batches) == len(want)
            for w, g in zip(want, batches):
                _assert_same_batch(w, g)


@pytest.mark.parametrize("workers", [0, 1])
def test_kept_batches_and_views_are_never_overwritten(synthetic, tokenizer, workers):
    ds, collate = _batch_sources(synthetic, tokenizer)["uc2"]
    want = list(DataLoader(ds, batch_size=2, collate_fn=collate))
    kept = {}
    for i, b in enumerate(loaders.BatchLoader(ds, batch_size=2, collate_fn=collate, num_workers=workers)):
        if i % 3 == 0:  # the whole batch
            kept[i] = b
        elif i % 3 == 1:  # only a view and a numpy view of the batch
            kept[i] = {"features": b["features"][1:], "spatials": b["spatials"].numpy()}
        # i % 3 == 2: dropped (its memory may be reused by a later batch)
    assert len(kept) == 8  # 12 batches
    for i, b in kept.items():
        if i % 3 == 0:
            _assert_same_batch(want[i], b)
        else:
            assert torch.equal(b["features"], want[i]["features"][1:])
            assert np.array_equal(b["spatials"], want[i]["spatials"].numpy())


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true")
@pytest.mark.parametrize("workers", [0, 2])
def test_two_live_iterations_of_one_loader_and_pin_memory_without_accelerator(synthetic, tokenizer, workers):
    ds, collate = _batch_sources(synthetic, tokenizer)["uc2"]
    want = list(DataLoader(ds, batch_size=2, collate_fn=collate))
    loader = loaders.BatchLoader(ds, batch_size=2, collate_fn=collate, num_workers=workers, pin_memory=True)
    first, second = iter(loader), iter(loader)  # pin_memory: ignored without an accelerator, as DataLoader does
    seen = {"first": 0, "second": 0}

    def check(name, batches, n=None):  # batches are dropped as they are checked
        for b in itertools.islice(batches, n):
            _assert_same_batch(want[seen[name]], b)
            seen[name] += 1

    check("first", first, 1)
    check("second", second, 5)  # the second iteration is under way ...
    check("first", first)  # ... when the first ends: it must forget only its own
    check("second", second)
    assert seen == {"first": len(want), "second": len(want)}


# --------------------------------------------------------------------------------------------- inventory and errors


def test_inventory_reports_removed_image(synthetic, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(synthetic["images"], images)
    os.remove(images / "coco/COCO_val2014_000000560623.jpg")
    out = io.StringIO()
    with redirect_stdout(out):
        assert (
            inventory.main(
                ["--data-root", str(ROOT), "--images", str(images), "--features", str(synthetic["features"]), "--json"]
            )
            == 0
        )
    inv = json.loads(out.getvalue())
    assert inv["xflickrco"]["test"]["de"] == {
        "examples": 40,
        "images": 40,
        "missing": ["coco/COCO_val2014_000000560623.jpg"],
    }
    assert inv["xgqa"]["dev"]["ko"] == {"examples": 120, "images": 42, "missing": []}
    assert inv["xvnli"]["test_translate_test"]["ar"]["examples"] == 90
    assert inv["xflickrco"]["valid"]["en"] == {"examples": 300, "images": 60, "missing": []}
    inv = inventory.inventory(ROOT, features=[str(FEAT / "features_fixture.lmdb")])
    assert "759822302" not in inv["xvnli"]["test"]["en"]["missing"] and len(inv["xvnli"]["test"]["en"]["missing"]) == 29
    assert inventory.inventory(ROOT)["xgqa"]["testdev"]["en"] == {"examples": 300, "images": 175, "missing": None}


def _write_translation_sets(root: Path) -> None:
    """XTD10 (3 images; en, de with both translation directions; fr captions only) and Multi30K (2 images a split;
    en, cs; the cs test caption file one line short) in PECTVLM's layouts, as mclip.mk's default folder names."""
    xtd = root / "XTD10"
    (xtd / "all").mkdir(parents=True)
    (xtd / "all" / "test_image_names.txt").write_text("".join(f"COCO_val2014_{i:012d}.jpg\n" for i in range(3)))
    for lang in ("en", "de", "fr"):
        (xtd / "all" / f"test_1kcaptions_{lang}.txt").write_text(f"{lang} a\n{lang} b\n{lang} c\n")
    for folder in ("translated_from_en", "translated_to_en"):
        (xtd / folder).mkdir()
        (xtd / folder / "de.txt").write_text("x\ny\nz\n")
    base = root / "multi30k-dataset" / "data" / "task1"
    for name in xtd_data.MULTI30K_SPLITS.values():
        (base / "image_splits").mkdir(parents=True, exist_ok=True)
        (base / "image_splits" / f"{name}.txt").write_text("1.jpg\n2.jpg\n")
        for folder in ("raw", "translated_to_en"):
            (base / folder).mkdir(exist_ok=True)
            for lang in ("en", "cs"):
                short = folder == "raw" and lang == "cs" and name == "test_2016_flickr"
                (base / folder / f"{name}.{lang}").write_text("one\n" if short else "one\ntwo\n")


def test_inventory_lists_xtd10_and_multi30k_beside_iglue(tmp_path):
    shutil.copytree(ROOT / "datasets", tmp_path / "datasets")
    _write_translation_sets(tmp_path)
    inv = {}
    for main in (inventory.main, xtd_data.main):  # IGLUE's inventory; M-CLIP's sets' (comparisons/mclip)
        out = io.StringIO()
        with redirect_stdout(out):
            assert main(["--data-root", str(tmp_path), "--json"]) == 0
        inv.update(json.loads(out.getvalue()))
    assert inv["xgqa"]["testdev"]["en"] == {"examples": 300, "images": 175, "missing": None}  # IGLUE still there
    assert set(inv["xtd10"]) == {"all", "all_translated_from_en", "all_translated_to_en"}
    assert inv["xtd10"]["all"] == {lang: {"examples": 3, "images": 3, "missing": None} for lang in ("de", "en", "fr")}
    assert set(inv["xtd10"]["all_translated_to_en"]) == {"de"}
    assert inv["multi30k"]["val_translated_to_en"]["cs"] == {"examples": 2, "images": 2, "missing": None}
    assert "multi30k" not in inv["xgqa"] and "train_translated_from_en" not in inv["multi30k"]
    bad = inv["multi30k"]["test"]["cs"]["error"]
    assert bad.endswith("test_2016_flickr.cs: 1 lines, expected 2 (one per image)")
    shutil.rmtree(tmp_path / "datasets")  # the translation sets alone: no IGLUE folder needed
    out = io.StringIO()
    with redirect_stdout(out):
        assert xtd_data.main(["--data-root", str(tmp_path)]) == 0
    printed = out.getvalue()
    assert "xtd10\n  all                      de   examples       3  images      3\n" in printed
    assert "ERROR " in printed and "xgqa" not in printed


def test_iglue_layout_names_the_tasks_of_data_py():
    assert data.TASKS is iglue_layout.TASKS  # one table, not a copy that could drift


def test_translation_set_inventory_without_the_sets_is_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: data root .*: no XTD10/ or multi30k-dataset/ inside"):
        xtd_data.main(["--data-root", str(tmp_path)])


@pytest.mark.system
def test_cli_exit_code():
    res = subprocess.run(
        [sys.executable, "-m", "checks.inventory", "--data-root", str(ROOT)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=scaled(120),
    )
    assert res.returncode == 0, res.stderr
    assert "xflickrco" in res.stdout and "examples" in res.stdout


def test_missing_image_and_feature_errors(synthetic, tmp_path):
    exs = data.load_split(ROOT, "xvnli", "test", "en")[:2]
    with pytest.raises(ValueError, match=r"759822302\.jpg.*XVNLI/annotations/en/test\.jsonl:1.*759822302\.jpg#2r1c"):
        data.CCLMDataset(exs, str(tmp_path), "xvnli")[0]
    fixtures.write_synthetic_features(tmp_path / "f.lmdb", ["1"], num_boxes=2)
    with pytest.raises(ValueError, match=r"'759822302'.*f\.lmdb.*test\.jsonl:1.*759822302\.jpg#2r1c"):
        data.UC2Dataset(exs, str(tmp_path / "f.lmdb"), "xvnli")[0]


def _root_with(tmp_path, rel, text):
    path = tmp_path / "datasets" / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return tmp_path


def test_bad_annotation_errors(tmp_path):
    good = (ROOT / "datasets/XVNLI/annotations/en/test.jsonl").read_text().splitlines()
    root = _root_with(tmp_path / "a", "XVNLI/annotations/en/test.jsonl", "\n".join(good[:2] + ['{"gold_label": ']))
    with pytest.raises(ValueError, match=r"test\.jsonl:3: malformed JSON"):
        data.load_split(root, "xvnli", "test", "en")
    bad = json.loads(good[1])
    bad["gold_label"] = "maybe"
    root = _root_with(tmp_path / "b", "XVNLI/annotations/en/test.jsonl", "\n".join([good[0], json.dumps(bad)]))
    with pytest.raises(ValueError, match=r"test\.jsonl:2: unknown gold_label 'maybe'"):
        data.load_split(root, "xvnli", "test", "en")
    root = _root_with(tmp_path / "c", "XVNLI/annotations/en/test.jsonl", "\n\n")
    with pytest.raises(ValueError, match=r"test\.jsonl: annotation file is empty"):
        data.load_split(root, "xvnli", "test", "en")
    root = _root_with(tmp_path / "d", "xFlickrCO/annotations/de/test.jsonl", '{"sentences": ["x"], "id": 1}\n')
    with pytest.raises(ValueError, match=r"test\.jsonl:1: missing field 'img_path'"):
        data.load_split(root, "xflickrco", "test", "de")
    shutil.copytree(ROOT / "datasets/gqa", tmp_path / "e/datasets/gqa")
    root = _root_with(
        tmp_path / "e", "xGQA/annotations/few_shot/de/dev.json", '{"1": {"question": "q",\n "imageId": }}'
    )
    with pytest.raises(ValueError, match=r"dev\.json:2: malformed JSON"):
        data.load_split(root, "xgqa", "dev", "de")
    root = _root_with(tmp_path / "f", "xGQA/annotations/few_shot/de/dev.json", "")
    with pytest.raises(ValueError, match="empty"):
        data.load_split(root, "xgqa", "dev", "de")


def test_wrong_data_root_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        iglue_layout.dataset_dir(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"expected folder .*datasets .*is missing"):
        iglue_layout.dataset_dir(tmp_path)
    root = _root_with(
        tmp_path, "XVNLI/annotations/en/test.jsonl", (ROOT / "datasets/XVNLI/annotations/en/test.jsonl").read_text()
    )
    with pytest.raises(ValueError, match=r"xflickrco: expected folder .*xFlickrCO/annotations is missing"):
        data.load_split(root, "xflickrco", "test", "de")
    with pytest.raises(ValueError, match=r"no split 'dev'.*found: test"):
        data.load_split(root, "xvnli", "dev", "en")
    with pytest.raises(ValueError, match=r"language 'de'.*found: en"):
        data.load_split(root, "xvnli", "test", "de")
    with pytest.raises(SystemExit, match="expected folder"):
        inventory.main(["--data-root", str(tmp_path / "datasets" / "XVNLI")])


def test_old_data_py_entry_point_says_where_the_inventory_went():
    """`python data.py --verify ...` (the inventory's old entry point): one line naming the new one, exit 2."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "data.py"), "--data-root", str(root / "tests/fixtures/iglue"), "--verify"],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=scaled(120),
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "data.py --data-root/--verify moved: python -m checks.inventory --data-root DIR [--verify] ..."
    ]


@pytest.mark.system
def test_inventory_cli_into_a_closed_pipe_ends_quietly():
    """`python -m checks.inventory --json | head`: the reader going away is not a traceback."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "checks.inventory", "--data-root", str(root / "tests/fixtures/iglue"), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=root,
    )
    proc.stdout.close()  # before it writes: its first print meets a pipe without a reader
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=scaled(120)) == 141 and err == ""


# --------------------------------------------------------------------------------------------- marvl (NLVR2 + MaRVL)

MARVL_LANGS = ["id", "sw", "ta", "tr", "zh"]


def test_marvl_discovery_covers_nlvr2_marvl_translate_test_and_few_shot():
    assert iglue_layout.available_splits(ROOT, "marvl") == [
        "dev",
        "test",
        "train_1",
        "train_2",
        "train_4",
        "train_10",
        "train_10x2",
    ]
    assert iglue_layout.available_splits(ROOT, "marvl", translate_test=True) == ["test"]
    assert iglue_layout.available_langs(ROOT, "marvl", "test") == ["en"] + MARVL_LANGS
    assert iglue_layout.available_langs(ROOT, "marvl", "test", translate_test=True) == MARVL_LANGS
    assert iglue_layout.available_langs(ROOT, "marvl", "dev") == ["en", "id", "sw", "tr", "zh"]  # no dev-ta_gmt
    assert iglue_layout.available_langs(ROOT, "marvl", "train_10x2") == ["id", "tr", "zh"]
    ds = ROOT / "datasets"
    assert iglue_layout.split_file(ROOT, "marvl", "test", "en") == ds / "nlvr2/annotations/test.jsonl"
    assert iglue_layout.split_file(ROOT, "marvl", "dev", "sw") == ds / "nlvr2/annotations/dev-sw_gmt.jsonl"
    assert iglue_layout.split_file(ROOT, "marvl", "test", "ta") == ds / "marvl/zero_shot/annotations/marvl-ta.jsonl"
    assert (
        iglue_layout.split_file(ROOT, "marvl", "test", "ta", translate_test=True)
        == ds / "marvl/zero_shot/annotations_machine-translate/marvl-ta_gmt.jsonl"
    )
    assert (
        iglue_layout.split_file(ROOT, "marvl", "train_10x2", "zh")
        == ds / "marvl/few_shot/annotations/marvl-zh_train10x2.jsonl"
    )
    with pytest.raises(ValueError, match=r"marvl: no split 'train' under .*; found: dev, test, train_1"):
        iglue_layout.split_file(ROOT, "marvl", "train", "en")  # NLVR2 train.jsonl is not in the sample
    with pytest.raises(ValueError, match=r"marvl test: no file for language 'de' .*found: en, id, sw, ta, tr, zh"):
        iglue_layout.split_file(ROOT, "marvl", "test", "de")


def test_marvl_checkout_with_only_nlvr2_and_marvl_folders(tmp_path):
    for name in ("nlvr2", "marvl"):
        shutil.copytree(ROOT / "datasets" / name, tmp_path / "datasets" / name)
    assert iglue_layout.dataset_dir(tmp_path) == tmp_path / "datasets"
    assert len(data.load_split(tmp_path, "marvl", "test", "sw")) == 30
    shutil.rmtree(tmp_path / "datasets" / "marvl")
    assert iglue_layout.available_splits(tmp_path, "marvl") == ["dev", "test"]
    with pytest.raises(ValueError, match="marvl: expected folder .*annotations_machine-translate is missing"):
        data.load_split(tmp_path, "marvl", "test", "sw", translate_test=True)


def test_nlvr2_real_files_keys_labels_and_image_files():
    dev = data.load_split(ROOT, "marvl", "dev", "en")
    test = data.load_split(ROOT, "marvl", "test", "en")
    assert (len(dev), dev[0].id, dev[-1].id, sum(ex.label for ex in dev)) == (60, "dev-850-0-0", "dev-876-1-0", 31)
    assert (len(test), test[0].id, test[-1].id) == (60, "test1-0-1-0", "test1-653-0-1")
    first = dev[0]  # "label": "False", identifier dev-850-0-0
    assert (first.label, first.gold, first.lang, first.task) == (0, "False", "en", "marvl")
    assert first.text.startswith("The right image shows a curving walkway")
    assert (first.image, first.image2) == ("dev-850-0-img0", "dev-850-0-img1")  # VOLTA's keys
    assert (first.image_file, first.image2_file) == ("nlvr2/dev/dev-850-0-img0.png", "nlvr2/dev/dev-850-0-img1.png")
    assert (test[-1].image, test[-1].image_file) == ("test1-653-0-img0", "nlvr2/test1/test1-653-0-img0.png")
    raw = [json.loads(l) for l in (ROOT / "datasets/nlvr2/annotations/dev.jsonl").read_text().splitlines()]
    assert [ex.label for ex in dev] == [int(r["label"] == "True") for r in raw]
    assert first.source == "nlvr2/annotations/dev.jsonl:1"
    assert len(data.distinct_images(dev)) == 68  # two sentences of one pair share its images
    # dev machine-translated into each language: the same pairs, images and labels, translated sentences
    for lang in ("id", "sw", "tr", "zh"):
        mt = data.load_split(ROOT, "marvl", "dev", lang)
        assert [(e.id, e.image, e.image2, e.label) for e in mt] == [(e.id, e.image, e.image2, e.label) for e in dev]
        assert mt[0].lang == lang and mt[0].text != first.text


def test_nlvr2_training_image_files_sit_in_their_directory(tmp_path):
    line = json.loads((ROOT / "datasets/nlvr2/annotations/dev.jsonl").read_text().splitlines()[0])
    line.update(identifier="train-10171-0-0", directory=76)
    (tmp_path / "datasets/nlvr2/annotations").mkdir(parents=True)
    (tmp_path / "datasets/nlvr2/annotations/train.jsonl").write_text(json.dumps(line) + "\n")
    (ex,) = data.load_split(tmp_path, "marvl", "train", "en")
    assert (ex.image, ex.image2) == ("train-10171-0-img0", "train-10171-0-img1")
    assert ex.image_file == "nlvr2/train/76/train-10171-0-img0.png"


def test_marvl_real_files_keys_labels_translate_test_and_few_shot():
    expected = {  # lang: (first id, last id, true labels, first pair's VOLTA keys)
        "id": ("id-0", "id-29", 15, ("39-0", "39-11")),
        "sw": ("sw-0", "sw-29", 16, ("81-5", "81-11")),
        "ta": ("ta-0", "ta-29", 15, ("26-6", "26-3")),
        "tr": ("tr-0", "tr-29", 15, ("42-9", "42-5")),
        "zh": ("zh-0", "zh-29", 15, ("82-6", "82-1")),
    }
    for lang, (first_id, last_id, trues, keys) in expected.items():
        exs = data.load_split(ROOT, "marvl", "test", lang)
        assert (len(exs), exs[0].id, exs[-1].id, sum(e.label for e in exs)) == (30, first_id, last_id, trues)
        assert (exs[0].image, exs[0].image2) == keys and len(data.distinct_images(exs)) == 60
        n = keys[0].split("-")[0]  # X2-VLM: <lang>/images/<left_img.split("-")[0]>/<left_img>
        assert exs[0].image_file == f"marvl/{lang}/images/{n}/{keys[0]}.jpg"
        mt = data.load_split(ROOT, "marvl", "test", lang, translate_test=True)
        assert [(e.id, e.image, e.image2, e.image_file, e.label) for e in mt] == [
            (e.id, e.image, e.image2, e.image_file, e.label) for e in exs
        ]
    first = data.load_split(ROOT, "marvl", "test", "id")[0]
    assert first.text.startswith("Panci di salah satu foto") and (first.label, first.gold) == (1, "True")
    mt = data.load_split(ROOT, "marvl", "test", "id", translate_test=True)[0]
    assert mt.text.startswith("The pot in one photo is above") and mt.source.endswith("marvl-id_gmt.jsonl:1")
    sizes = {"train_1": 4, "train_2": 8, "train_4": 16, "train_10": 40, "train_10x2": 80}
    for split, n in sizes.items():
        for lang in ("id", "tr", "zh"):
            assert len(data.load_split(ROOT, "marvl", split, lang)) == n
    few = data.load_split(ROOT, "marvl", "train_1", "id")  # left_img "39-Panci/39-n-5.jpg"
    assert (few[0].image, few[0].image2) == ("39-n-5", "39-n-2")
    assert few[0].image_file == "marvl_fewshot/id/all/39-n-5.jpg"  # X2-VLM's few-shot layout: the base name
    assert [e.label for e in few] == [1, 0, 0, 1] and few[-1].id == "id-3"  # true, false, false, true


def test_marvl_uc2_batches_are_voltas_nlvr_layout(synthetic, tokenizer):
    f, i64, f32 = str(synthetic["features"]), torch.long, torch.float32
    exs = data.load_split(ROOT, "marvl", "test", "zh")[:3]
    for train in (False, True):
        ds = data.make_dataset("uc2", "marvl", exs, features=f, train=train, max_regions=36)
        b = data.make_collate("uc2", "marvl", tokenizer, train=train)([ds[i] for i in range(3)])
        L = b["input_ids"].shape[2]
        _check(
            b,
            {
                "input_ids": ((3, 2, L), i64),
                "attention_mask": ((3, 2, L), i64),
                "features": ((3, 2, 36, 2048), f32),
                "spatials": ((3, 2, 36, 7), f32),
                "image_mask": ((3, 2, 36), i64),
                "target": ((3, 2), f32),
                "label": ((3,), i64),
            },
        )
        assert L <= 80 and b["id"] == ["zh-0", "zh-1", "zh-2"] and b["lang"] == "zh"
        assert torch.equal(b["input_ids"][:, 0], b["input_ids"][:, 1])  # the caption with each image
        ids, _ = data.encode_texts(tokenizer, [ex.text for ex in exs], 80)
        assert torch.equal(b["input_ids"][:, 0], ids)
        assert b["label"].tolist() == [ex.label for ex in exs]
        assert b["target"].tolist() == [[1.0 - ex.label, float(ex.label)] for ex in exs]  # one-hot
    reader = open_features(f)
    for i, ex in enumerate(exs):  # slot 0 = the left image's regions, slot 1 = the right's
        for slot, key in enumerate((ex.image, ex.image2)):
            feats, locs = reader.kept_regions(key, 36)
            n = len(feats)
            assert torch.equal(b["features"][i, slot, :n], torch.from_numpy(np.asarray(feats, dtype=np.float32)))
            assert torch.equal(b["spatials"][i, slot, :n], torch.from_numpy(np.asarray(locs, dtype=np.float32)))
            assert (
                b["image_mask"][i, slot].tolist() == [1] * n + [0] * (36 - n) and not b["features"][i, slot, n:].any()
            )


def test_marvl_cclm_batches_hold_left_images_then_right_images(synthetic, tokenizer):
    im, u8 = str(synthetic["images"]), torch.uint8
    exs = data.load_split(ROOT, "marvl", "dev", "en")[:3]
    ev = data.make_dataset("cclm", "marvl", exs, images=im, image_res=32)
    b = data.make_collate("cclm", "marvl", tokenizer)([ev[i] for i in range(3)])
    assert b["images"].shape == (6, 32, 32, 3) and b["images"].dtype == u8
    assert b["text_ids"].shape == b["text_atts"].shape and b["text_ids"].shape[0] == 3
    assert b["label"].tolist() == [ex.label for ex in exs] and b["id"] == [ex.id for ex in exs]
    for i, ex in enumerate(exs):  # rows 0..B-1 the left images, B..2B-1 the right ones (X2-VLM's torch.cat)
        for row, rel in ((i, ex.image_file), (3 + i, ex.image2_file)):
            ref = data.eval_transform(readers.load_image(Path(im) / rel), 32)
            assert torch.equal(data.normalize_images(b["images"][row]), ref)
    clean = [x2vlm_text.pre_caption(ex.text, 30) for ex in exs]  # X2-VLM's nlvr_dataset: max_words 30
    assert torch.equal(b["text_ids"], data.encode_texts(tokenizer, clean, None)[0])
    long = replace(exs[0], text=" ".join(f"w{i}" for i in range(40)))
    assert ev.__class__([long], im, "marvl", image_res=32)[0]["text"] == " ".join(f"w{i}" for i in range(30))
    tr = data.make_dataset("cclm", "marvl", exs, images=im, train=True, image_res=32, seed=5)
    a, again = tr[1], tr[1]
    assert torch.equal(a["pixels"], again["pixels"]) and torch.equal(a["pixels2"], again["pixels2"])
    tr.set_epoch(1)
    assert not torch.equal(tr[1]["pixels"], a["pixels"])
    bt = data.make_collate("cclm", "marvl", tokenizer, train=True)([tr[i] for i in range(3)])
    assert bt["images"].shape == (6, 32, 32, 3) and bt["label"].tolist() == [ex.label for ex in exs]


def test_marvl_pair_of_missing_right_image_is_named_by_preflight_and_inventory(synthetic, tmp_path):
    exs = data.load_split(ROOT, "marvl", "test", "tr")
    right = exs[4]
    images = tmp_path / "images"
    shutil.copytree(synthetic["images"], images)
    os.remove(images / right.image2_file)
    with pytest.raises(ValueError) as e:
        preflight.check_inputs(exs, images=images)
    assert str(e.value) == (
        f"image file {images / right.image2_file} not found (referenced by marvl/zero_shot/annotations/"
        f"marvl-tr.jsonl:5 (right image), example tr-4); 1 of 60 images missing"
    )
    feats = fixtures.write_synthetic_features(tmp_path / "f", synthetic["keys"] - {right.image2}, num_boxes=3)
    with pytest.raises(ValueError, match=rf"feature key '{right.image2}' not found .*marvl-tr.jsonl:5 \(right image\)"):
        preflight.check_inputs(exs, features=feats)
    inv = inventory.inventory(ROOT, images=images)["marvl"]
    assert inv["test"]["tr"] == {"examples": 30, "images": 60, "missing": [right.image2_file]}
    assert inv["test_translate_test"]["tr"]["missing"] == [right.image2_file]
    assert inv["test"]["en"] == {"examples": 60, "images": 70, "missing": []}
    assert inv["train_10x2"]["zh"] == {"examples": 80, "images": 90, "missing": []}


def test_marvl_verify_decodes_both_images_of_every_pair(synthetic, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(synthetic["images"], images)
    ex = data.load_split(ROOT, "marvl", "test", "sw")[2]
    (images / ex.image2_file).write_bytes(b"not an image")
    bad, counts = inventory.verify(ROOT, images=images)
    assert len(bad) == 1 and str(images / ex.image2_file) in bad[0] and "(right image)" in bad[0]
    assert counts["images"] == len(synthetic["files"])


def test_marvl_results_csv_has_iglue_columns_zero_and_few_shot():
    per_lang = {l: {"accuracy": 50.0 + i, "n": 30} for i, l in enumerate(["en", *MARVL_LANGS])}
    header, row, n_row = (line.split(",") for line in iglue.iglue_csv("marvl", per_lang, "m", "accuracy").splitlines())
    assert header == ["model", "en", "id", "sw", "ta", "tr", "zh", "avg"]  # IGLUE's results/marvl/MaRVL_0.csv
    assert float(row[-1]) == sum(51.0 + i for i in range(5)) / 5 and n_row[1:-1] == ["30"] * 6
    few = iglue.iglue_csv("marvl", {l: per_lang[l] for l in ("id", "tr", "zh")}, "m", "accuracy", shots=10)
    assert few.splitlines()[0] == "model,id,tr,zh,avg"  # MaRVL_10.csv: the three few-shot languages
    assert float(few.splitlines()[1].split(",")[-1]) == (51.0 + 54.0 + 55.0) / 3
    assert iglue.csv_name("marvl", "accuracy", 0, True) == "MaRVL_0.mt.csv"


# --------------------------------------------------------------------------------------------- marvl: serialized LMDB


def test_serialized_writer_reproduces_tensorpacks_bytes():
    """tests/_serialized_lmdb.py encodes as tensorpack 0.9.4 + msgpack_numpy: every entry of the GQA fixture that
    tensorpack wrote re-encodes to the same bytes, so the NLVR2 LMDBs the tests write are in its exact layout."""
    with SerializedRecords(FEAT / "gqa_serialized_fixture.lmdb").handle.begin() as txn:  # the reader's own handle
        entries = [(bytes(k), bytes(v)) for k, v in txn.cursor()]
    assert len(entries) == 13 and entries[-1][0] == b"__keys__"
    for _, raw in entries:
        assert serialized_lmdb.dumps(decode_serialized(raw)) == raw


@pytest.mark.parametrize("max_regions", [36, 4])
def test_serialized_nlvr2_items_match_the_image_keyed_path(synthetic, tokenizer, tmp_path, max_regions):
    exs = data.load_split(ROOT, "marvl", "dev", "en")[:10]
    path = serialized_lmdb.write_serialized(
        tmp_path / "nlvr2-train_boxes36.lmdb", serialized_lmdb.nlvr2_records(exs, synthetic["features"], b64={3})
    )
    assert is_serialized_lmdb(path) and serialized_task(path) == "marvl"
    assert feature_sets.split_features([str(path), str(synthetic["features"])]) == (
        [str(path)],
        [str(synthetic["features"])],
    )
    ser = data.make_dataset("uc2", "marvl", None, features=str(path), max_regions=max_regions)
    keyed = data.make_dataset("uc2", "marvl", exs, features=str(synthetic["features"]), max_regions=max_regions)
    assert isinstance(ser, data.SerializedNLVR2Dataset) and len(ser) == len(keyed) == 10
    for i, ex in enumerate(exs):
        a, b = ser[i], keyed[i]
        assert a.keys() == b.keys() and (a["kind"], a["text"], a["max_regions"]) == (b["kind"], b["text"], max_regions)
        assert a["example"] == replace(ex, image_file="", image2_file="", source=f"{path} record {i:08}")
        for (fa, la), (fb, lb) in zip(a["regions"], b["regions"], strict=True):  # left, right
            assert len(fa) == min(5, max_regions) and np.array_equal(fa, fb) and np.array_equal(la, lb)
    collate = data.UC2Collate("marvl", tokenizer, train=True)
    got, want = collate([ser[i] for i in range(10)]), collate([keyed[i] for i in range(10)])
    assert got.keys() == want.keys() and got["id"] == [ex.id for ex in exs] and got["lang"] == "en"
    for k, v in want.items():
        assert torch.equal(got[k], v) if isinstance(v, torch.Tensor) else got[k] == v, k
    assert got["features"].shape == (10, 2, max_regions, 2048) and got["label"].tolist() == [e.label for e in exs]
    # train_uc2 --task marvl --features <serialized LMDB>: the training set is the LMDB's records
    args = argparse.Namespace(task="marvl", max_regions=max_regions)
    train_ds = U.checked_train_dataset(args, *U.open_feature_files([str(path)]))
    assert isinstance(train_ds, data.SerializedNLVR2Dataset) and train_ds[9]["example"].id == exs[9].id
    with pytest.raises(ValueError, match=r"is a serialized LMDB of marvl records, not of xvnli's"):
        data.make_dataset("uc2", "xvnli", None, features=str(path))
    with pytest.raises(ValueError, match=r"gqa_serialized_fixture.lmdb is a serialized LMDB of xgqa records, not"):
        data.make_dataset("uc2", "marvl", None, features=str(FEAT / "gqa_serialized_fixture.lmdb"))


def test_serialized_nlvr2_lmdb_in_inventory_and_verify(synthetic, tmp_path):
    exs = data.load_split(ROOT, "marvl", "dev", "en")[:4]
    records = serialized_lmdb.nlvr2_records(exs, synthetic["features"])
    path = serialized_lmdb.write_serialized(tmp_path / "nlvr2-dev_boxes36.lmdb", records)
    inv = inventory.inventory(ROOT, [str(path), str(synthetic["features"])])
    assert inv["notes"] == [
        f"{path}: serialized NLVR2 (per-sentence) LMDB (4 records; holds its own sentences, so annotation image "
        f"ids are not checked against it)"
    ]
    assert inv["marvl"]["dev"]["en"]["missing"] == []
    assert inventory.verify(ROOT, [str(path)]) == ([], {"feature records": 4, "images": 0})
    records[2]["labels"] = ["True"]
    bad_path = serialized_lmdb.write_serialized(tmp_path / "bad.lmdb", records)
    assert inventory.verify(ROOT, [str(bad_path)]) == (
        [f"{bad_path}: record '00000002': labels is ['True']; expected [0] or [1] (false / true)"],
        {"feature records": 4, "images": 0},
    )
