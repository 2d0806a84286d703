"""PECTVLM's other experiments beside the M-CLIP routines: Multi30K task 2 (xtd_data, train_mclip --dataset
multi30k_task2), at tiny size: files written in the real layout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from comparisons.mclip import train_mclip as M  # noqa: E402
from comparisons.mclip import xtd_data  # noqa: E402
from synthetic import fixtures  # noqa: E402

# ---------------------------------------------------------------- Multi30K task 2


def write_task2(root: Path, sizes=(("train", 6), ("val", 3), ("test", 4))) -> dict[str, list[str]]:
    """multi30k/dataset's data/task2 layout (image_splits/<split>_images.txt; raw/<stem>.<d>.<lang> for the 5
    descriptions d; PECTVLM's translated_from_en/ and translated_to_en/ beside raw/), uncompressed as the reference
    reads it. Caption text: '<folder> <lang> d<d> <image>'."""
    base = root / "data" / "task2"
    images = {}
    for split, n in sizes:
        image_list, stem = xtd_data.MULTI30K_TASK2_SPLITS[split]
        names = [f"{split}{i}.jpg" for i in range(n)]
        images[split] = names
        (base / "image_splits").mkdir(parents=True, exist_ok=True)
        (base / "image_splits" / f"{image_list}.txt").write_text("\n".join(names) + "\n")
        for folder in ("raw", "translated_from_en", "translated_to_en"):
            (base / folder).mkdir(exist_ok=True)
            for d in range(1, 6):
                for lang in ("en", "de"):
                    lines = [f"{folder} {lang} d{d} {n.split('.')[0]}" for n in names]
                    (base / folder / f"{stem}.{d}.{lang}").write_text("\n".join(lines) + "\n")
    return images


def test_task2_loader_reads_the_first_description_of_each_image_as_the_reference(tmp_path):
    images = write_task2(tmp_path)
    test = xtd_data.load_multi30k(tmp_path, "test", ["de", "en"], task=2)
    assert test.images == [f"flickr30k-images/{n}" for n in images["test"]]
    assert test.captions("native", "de") == [f"raw de d1 test{i}" for i in range(4)]
    assert test.captions("to_en", "de")[2] == "translated_to_en de d1 test2"
    assert test.captions("en", "de") == [f"raw en d1 test{i}" for i in range(4)]  # the English partner
    third = xtd_data.load_multi30k(tmp_path, "val", ["de"], task=2, description=3)
    assert third.captions("from_en", "de") == [f"translated_from_en de d3 val{i}" for i in range(3)]
    splits = xtd_data.multi30k_splits(tmp_path, ["de", "en"], 2, 42, task=2)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(42)).tolist()  # load_file_from_task's subsample
    assert splits["train"].images == [f"flickr30k-images/train{i}.jpg" for i in perm[:2]]
    assert [len(s.images) for s in splits.values()] == [2, 3, 4]  # val and test whole, as run_choose_pet_task2.py
    with pytest.raises(ValueError, match="descriptions 1..5 per image, not 6"):
        xtd_data.load_multi30k(tmp_path, "val", ["de"], task=2, description=6)


def test_task2_bad_files_are_one_line_errors_naming_them(tmp_path):
    write_task2(tmp_path)
    raw = tmp_path / "data" / "task2" / "raw"
    (raw / "test_2016.1.de").write_text("only one line\n")
    with pytest.raises(ValueError, match=r"raw/test_2016\.1\.de: 1 lines, expected 4 \(one per image\)"):
        xtd_data.load_multi30k(tmp_path, "test", ["de"], task=2)
    (raw / "test_2016.1.de").rename(raw / "test_2016.1.de.gz")  # as multi30k/dataset ships it
    with pytest.raises(ValueError, match=r"test_2016\.1\.de: file not found \(test_2016\.1\.de\.gz is: gunzip it"):
        xtd_data.load_multi30k(tmp_path, "test", ["de"], task=2)


def test_inventory_lists_task2_splits_beside_task1(tmp_path):
    write_task2(tmp_path / "multi30k-dataset")
    inv = xtd_data.inventory(tmp_path)["multi30k"]
    assert inv["task2_test"]["de"] == {"examples": 4, "images": 4, "missing": None}
    assert set(inv["task2_train_translated_to_en"]) == {"en", "de"}
    assert "error" in inv["train"]["*"]  # no task 1 files: named, not fatal


@pytest.fixture(scope="module")
def task2_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("m30k2")
    images = write_task2(root / "multi30k-dataset")
    texts = [l for p in (root / "multi30k-dataset").rglob("*.*") if p.suffix != ".txt" for l in p.read_text().split()]
    fixtures.make_tiny_tokenizer(texts * 2, root / "tok", vocab_size=80)
    names = [f"flickr30k-images/{n}" for ns in images.values() for n in ns]
    torch.manual_seed(0)
    torch.save({"names": names, "features": torch.randn(len(names), 16)}, root / "feats.pt")
    return root


def test_task2_run_trains_on_description_1_and_tests_on_test_2016(task2_world, tmp_path):
    w = task2_world
    argv = ["--dataset", "multi30k_task2", "--data-root", str(w / "multi30k-dataset"), "--lang", "de"]
    argv += ["--routine", "method3", "--pet", "lora", "--n-shot", "0", "--text-config", "tiny", "--random-init"]
    argv += ["--tokenizer", str(w / "tok"), "--image-features", str(w / "feats.pt"), "--epochs", "1"]
    argv += ["--batch-size", "3", "--eval-steps", "1", "--seed", "0", "--output-dir", str(tmp_path / "run")]
    result = M.main(argv)
    assert result["dataset"] == "multi30k_task2" and result["test_text"] == "to_en"
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2]  # 6 training images, batch 3
    with pytest.raises(SystemExit, match="--lang fr: multi30k_task2 has en, de"):
        M.main([*argv[:5], "fr", *argv[6:-1], str(tmp_path / "fr")])
