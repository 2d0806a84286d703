"""PECTVLM's other experiments beside the M-CLIP routines: Multi30K task 2 (xtd_data, train_mclip --dataset
multi30k_task2), the English-CLIP translate-test baseline (comparisons/mclip/translate_test.py, run_mono_XTD.py) and
run_XTD.py's --tuning_head (train_mclip --tuning-head), at tiny size: files written in the real layouts, a random tiny
CLIP release folder in OpenAI's whole-CLIPModel layout; their make targets."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from comparisons.mclip import train_mclip as M  # noqa: E402
from comparisons.mclip import translate_test as TT  # noqa: E402
from comparisons.mclip import xtd_data  # noqa: E402
from synthetic import fixtures  # noqa: E402
from test_mclip import cli, lines, make, write_xtd  # noqa: E402

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


# ---------------------------------------------------------------- English-CLIP translate-test baseline


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's / CLIP's byte -> printable character table (every byte gets a symbol of the BPE vocabulary)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tiny_clip(folder: Path, seed: int = 0) -> None:
    """A random CLIPModel (text 2 layers width 16, vision 32 px, projection 16) saved as OpenAI's release is
    (whole-CLIPModel safetensors), with a byte-level CLIP tokenizer whose merges are empty: one token per byte, EOT
    the largest id as in OpenAI's vocabulary."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    text = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2)
    text |= dict(num_attention_heads=2, max_position_embeddings=77, eos_token_id=2)  # 2: OpenAI's argmax pooling
    vision = dict(image_size=32, patch_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1)
    torch.manual_seed(seed)
    model = CLIPModel(
        CLIPConfig(text_config=text, vision_config=vision | {"num_attention_heads": 2}, projection_dim=16)
    )
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


@pytest.fixture(scope="module")
def xtd_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("mono")
    images = write_xtd(root / "XTD10")
    write_tiny_clip(root / "clip")
    torch.manual_seed(1)
    torch.save({"names": images, "features": torch.randn(len(images), 16)}, root / "feats.pt")
    return root


def reference_recall(image: torch.Tensor, text: torch.Tensor) -> float:
    """PECTVLM util.recall_k(labels, (100 t̂ v̂ᵀ).T, [1], [1]) in percent: top-1 of each image row and text column."""
    sim = (100 * (text / text.norm(dim=-1, keepdim=True)) @ (image / image.norm(dim=-1, keepdim=True)).T).T
    i2t = sum(int(sim[i].topk(1).indices[0]) == i for i in range(len(sim))) / len(sim)
    t2i = sum(int(sim.T[i].topk(1).indices[0]) == i for i in range(len(sim))) / len(sim)
    return 100 * (i2t + t2i) / 2


@pytest.mark.parametrize("routine,kind", [("method3", "to_en"), ("baseline1", "native")])
def test_english_clip_scores_the_routines_text_of_the_xtd_test_split(xtd_world, tmp_path, routine, kind):
    from transformers import CLIPModel, CLIPTokenizer

    w = xtd_world
    argv = ["--dataset", "xtd", "--data-root", str(w / "XTD10"), "--lang", "de", "--routine", routine]
    argv += ["--n-shot", "3", "--clip", str(w / "clip"), "--image-features", str(w / "feats.pt")]
    result = TT.main(argv + ["--eval-batch-size", "4", "--output-dir", str(tmp_path / "run")])
    assert result["test_text"] == kind and result["pet"] == "english_clip"
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == result
    # independently: the whole CLIPModel's get_text_features on clip.tokenize's ids (77 columns, zero padding)
    split = xtd_data.xtd_splits(xtd_data.load_xtd(w / "XTD10", ["de", "en"]), 3, 42)["test"]
    tok, model = CLIPTokenizer.from_pretrained(w / "clip"), CLIPModel.from_pretrained(w / "clip").eval()
    ids = torch.zeros(len(split.images), 77, dtype=torch.long)
    for i, t in enumerate(split.captions(kind, "de")):
        row = tok(t)["input_ids"]
        ids[i, : len(row)] = torch.tensor(row)
    with torch.no_grad():
        text = model.get_text_features(input_ids=ids)
        text = getattr(text, "pooler_output", text)
    feats = torch.load(w / "feats.pt", weights_only=True)
    image = torch.stack([feats["features"][feats["names"].index(p)] for p in split.images])
    assert result["test"]["mean_r1"] == pytest.approx(reference_recall(image, text), abs=1e-9)
    assert result["test"] == M.recall_at_1(image, text)


def test_english_clip_truncates_to_77_tokens_keeping_eot_last(xtd_world):
    model, tok = TT.load_clip_text(xtd_world / "clip")
    long = " ".join("ab"[i % 2] for i in range(120))  # 120 one-token words
    ids = tok([long], truncation=True, max_length=TT.CONTEXT_LENGTH)["input_ids"][0]
    assert len(ids) == 77 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id  # clip.tokenize(truncate)
    assert ids[1:-1] == tok([long])["input_ids"][0][1:76]  # the first 75 text tokens
    first_75 = " ".join(long.split()[:75])
    short = TT.encode_texts(model, tok, [long, first_75], batch_size=2)
    torch.testing.assert_close(short[0], short[1], rtol=0, atol=0)  # the truncated caption = its first 75 tokens


def test_english_clip_refuses_a_release_without_its_text_tower(xtd_world, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "clip"
    bad.mkdir()
    for f in (xtd_world / "clip").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    state = load_file(bad / "model.safetensors")
    save_file({k: v for k, v in state.items() if k != "text_projection.weight"}, bad / "model.safetensors")
    with pytest.raises(ValueError, match=r"--clip .*: weights lack 1 text key\(s\), e.g. 'text_projection.weight'"):
        TT.load_clip_text(bad)


def test_english_clip_runs_are_a_group_of_their_own_in_the_table(xtd_world, tmp_path, capsys):
    argv = ["--dataset", "xtd", "--data-root", str(xtd_world / "XTD10"), "--lang", "de", "--n-shot", "3"]
    argv += ["--clip", str(xtd_world / "clip"), "--image-features", str(xtd_world / "feats.pt")]
    TT.main(argv + ["--output-dir", str(tmp_path / "de")])
    TT.main([*argv[:5], "en", *argv[6:], "--output-dir", str(tmp_path / "en")])
    out = M.print_table([str(tmp_path / "de"), str(tmp_path / "en")])
    assert set(out) == {"xtd/method3/english_clip/3/test:to_en"} and {"de", "en"} <= set(out[next(iter(out))])


@pytest.mark.system
def test_pet_clip_en_target_prints_the_reference_baseline_run():
    out = make("-n", "pet-clip-en-xtd", "LANG=fr", "CLIP_VISION=/c", "XTD=/x")
    assert out.stdout.splitlines()[-1].strip() == (
        ".venv/bin/python -m comparisons.mclip.translate_test --dataset xtd --data-root /x --lang fr "
        "--routine method3 --n-shot 50 --clip /c --image-features runs/features/xtd-clip-vitl14.pt "
        "--output-dir runs/mclip-clipen-xtd50-fr-method3"
    )


@pytest.mark.system
def test_multi30k_task2_targets_print_its_features_and_runs():
    feats = make("-n", "pet-features-multi30k-task2", "MULTI30K=/m", "FLICKR=/f", "CLIP_VISION=/c")
    assert feats.stdout.splitlines()[-1].strip() == (
        ".venv/bin/python -m comparisons.mclip.train_mclip features --dataset multi30k_task2 --data-root /m "
        "--images /f --clip-vision /c --out runs/features/multi30k-task2-clip-vitl14.pt"
    )
    run = make("-n", "pet-multi30k-task2", "LANG=de", "PET=adapter", "MCLIP=/w", "MULTI30K=/m", "M30K_SHOT=100")
    assert run.stdout.splitlines()[-1].strip() == (
        ".venv/bin/python -m comparisons.mclip.train_mclip --dataset multi30k_task2 --data-root /m --lang de "
        "--routine method3 --align-loss mse --pet adapter --text-checkpoint /w --tokenizer /w --n-shot 100 "
        "--image-features runs/features/multi30k-task2-clip-vitl14.pt "
        "--output-dir runs/mclip-multi30k_task2-100-de-method3-adapter"
    )
    grid = [l for l in make("-n", "pet-multi30k-task2-grid").stdout.splitlines() if "train_mclip" in l]
    assert [l.split("--lang ")[1].split()[0] for l in grid] == list(xtd_data.MULTI30K_TASK2_LANGS)


@pytest.mark.system
@pytest.mark.parametrize(
    "target,dataset,feats,out",
    [
        ("pet-clip-en-multi30k", "multi30k", "multi30k-clip-vitl14.pt", "mclip-clipen-multi30k0-de-baseline2"),
        (
            "pet-clip-en-multi30k-task2",
            "multi30k_task2",
            "multi30k-task2-clip-vitl14.pt",
            "mclip-clipen-multi30k_task2-0-de-baseline2",
        ),
    ],
)
def test_english_clip_multi30k_targets_print_the_reference_baseline_run(target, dataset, feats, out):
    """run_mono_task1.py / run_mono_task2.py: the whole test split (M30K_SHOT only names the group, as the M-CLIP
    runs it is compared with)."""
    res = make("-n", target, "LANG=de", "ROUTINE=baseline2", "CLIP_VISION=/c", "MULTI30K=/m")
    assert res.stdout.splitlines()[-1].strip() == (
        f".venv/bin/python -m comparisons.mclip.translate_test --dataset {dataset} --data-root /m --lang de "
        f"--routine baseline2 --n-shot 0 --clip /c --image-features runs/features/{feats} --output-dir runs/{out}"
    )


@pytest.mark.system
def test_multi30k_task2_targets_with_missing_inputs_fail_naming_them(tmp_path):
    for target in ("pet-multi30k-task2", "pet-clip-en-multi30k-task2", "pet-features-multi30k-task2"):
        out = make(target, f"MULTI30K={tmp_path}/m", f"OUT={tmp_path}/runs")
        assert out.returncode != 0 and f"{tmp_path}/m " in out.stderr and "comparisons.mclip" not in out.stdout


# ---------------------------------------------------------------- --tuning-head (run_XTD.py --tuning_head)


@pytest.fixture(scope="module")
def head_world(tmp_path_factory):
    """test_mclip's XTD10 world, plus a tiny text checkpoint: the head's starting weights are known."""
    root = tmp_path_factory.mktemp("head")
    images = write_xtd(root / "XTD10")
    texts = [l for p in (root / "XTD10").rglob("*.txt") for l in p.read_text().splitlines()]
    fixtures.make_tiny_tokenizer(texts * 3, root / "tok", vocab_size=60)
    torch.manual_seed(0)
    torch.save({"names": images, "features": torch.randn(len(images), 16)}, root / "feats.pt")
    torch.manual_seed(3)
    torch.save(M.build_text_model("tiny").state_dict(), root / "text.pt")
    return root


def head_cli(world: Path, out: Path, *extra: str) -> list[str]:
    argv = cli(world, out, *extra)
    i = argv.index("--random-init")
    return [*argv[:i], "--text-checkpoint", str(world / "text.pt"), *argv[i + 1 :]]


def checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoint_last.pt", weights_only=True)


def test_tuning_head_reference_trains_exactly_what_off_trains(head_world, tmp_path):
    """run_XTD.py sets requires_grad on the pooler and LinearTransformation modules, not their parameters: its head
    group (lr 3e-6) is empty, so every step's loss and every weight are those of the run without the flag."""
    off, ref = tmp_path / "off", tmp_path / "ref"
    M.main(head_cli(head_world, off))
    M.main(head_cli(head_world, ref, "--tuning-head", "reference"))
    assert [r["loss"] for r in lines(ref, "train")] == [r["loss"] for r in lines(off, "train")]
    assert [r["lr"] for r in lines(ref, "train")] == [r["lr"] for r in lines(off, "train")]
    assert len(lines(off, "train")) == 4
    for name in ("checkpoint_last.pt", "model_final.pt"):
        a, b = (torch.load(r / name, weights_only=True)["model"] for r in (off, ref))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert not any(k.startswith(M.HEAD_PREFIXES) for k in b)
    groups = checkpoint(ref)["optimizer"]["param_groups"]
    assert [len(g["params"]) for g in groups] == [0, len(checkpoint(off)["optimizer"]["param_groups"][0]["params"])]
    assert groups[0]["initial_lr"] == 3e-6 and groups[1]["initial_lr"] == 1e-2
    assert lines(ref, "test") == lines(off, "test")


def test_tuning_head_corrected_trains_the_projection_at_the_head_lr_and_nothing_else_differently(head_world, tmp_path):
    """One step (3 training images, batch 3): LinearTransformation moves by exactly Adam's first step at 3e-6 (from
    the optimizer's own moments), the pooler not at all (M-CLIP's mean pooling gives it no gradient), every PET
    parameter as without the option, bitwise."""
    one = ("--epochs", "1", "--batch-size", "3", "--eval-steps", "1")
    off, cor = tmp_path / "off", tmp_path / "cor"
    M.main(head_cli(head_world, off, *one))
    result = M.main(head_cli(head_world, cor, *one, "--tuning-head", "corrected"))
    start = torch.load(head_world / "text.pt", weights_only=True)
    ck, ck_off = checkpoint(cor), checkpoint(off)
    state = ck["model"]
    head = [k for k in state if k.startswith(M.HEAD_PREFIXES)]
    assert sorted(head) == sorted(k for k in start if k.startswith(M.HEAD_PREFIXES))
    assert ck_off["model"].keys() == set(state) - set(head)
    assert all(torch.equal(state[k], ck_off["model"][k]) for k in ck_off["model"])  # the PET group as before
    groups = ck["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == [3e-6, 1e-2] and len(groups[0]["params"]) == len(head)
    assert len(groups[1]["params"]) == len(ck_off["optimizer"]["param_groups"][0]["params"])
    opt_state = ck["optimizer"]["state"]
    beta1, beta2 = 0.9, 0.999
    for pid, name in zip(groups[0]["params"], head):
        if name.startswith("transformer.pooler."):
            assert pid not in opt_state and torch.equal(state[name], start[name])  # no gradient: Adam skips it
            continue
        m, v = opt_state[pid]["exp_avg"], opt_state[pid]["exp_avg_sq"]
        step = 3e-6 * (m / (1 - beta1)) / ((v / (1 - beta2)).sqrt() + 1e-8)
        torch.testing.assert_close(state[name], start[name] - step, rtol=0, atol=1e-7)
        moved = (state[name] - start[name]).abs()
        assert moved.max() <= 3e-6 * 1.01 and (moved > 1e-6).float().mean() > 0.9
    assert M.read_groups([str(cor)]).keys() == {"xtd/method3/lora/3/test:to_en/head:corrected"}
    head_size = sum(start[k].numel() for k in head)
    assert result["trainable"] == json.loads((off / "results.json").read_text())["trainable"] + head_size
    # the saved module holds the head: it reloads under --tuning-head corrected, and only there
    reload = ("--load-pet", str(cor / "model_final.pt"), "--eval-only")
    again = M.main(head_cli(head_world, tmp_path / "eval", *one, *reload, "--tuning-head", "corrected"))
    assert again["test"] == result["test"]
    with pytest.raises(SystemExit, match="trainable parameters differ from this --pet setting"):
        M.main(head_cli(head_world, tmp_path / "eval_off", *one, *reload))
    # four steps: the --lr group follows the same schedule as without the option
    M.main(head_cli(head_world, tmp_path / "off4"))
    M.main(head_cli(head_world, tmp_path / "cor4", "--tuning-head", "corrected"))
    assert [r["lr"] for r in lines(tmp_path / "cor4", "train")] == [r["lr"] for r in lines(tmp_path / "off4", "train")]


@pytest.mark.parametrize(
    "extra,match",
    [
        (("--pet", "none"), "--tuning-head corrected: --pet none trains nothing"),
        (("--pet", "full", "--policy", "suf"), "--tuning-head corrected with --policy suf: the policy sets"),
        (("--pet", "full"), "--tuning-head reference with --pet full: the pooler and LinearTransformation already"),
        (("--pet", "lora_cross"), "--tuning-head reference with --pet lora_cross: the pooler"),
        (("--head-lr", "-1"), "--head-lr -1 is out of range: must be >= 0"),
    ],
    ids=["pet_none", "policy_suf", "reference_full", "reference_lora_cross", "negative_head_lr"],
)
def test_tuning_head_where_it_cannot_apply_is_refused_before_anything_is_written(head_world, tmp_path, extra, match):
    mode = "reference" if "reference" in match else "corrected"
    with pytest.raises(SystemExit, match=match):
        M.main(head_cli(head_world, tmp_path / "run", "--tuning-head", mode, *extra))
    assert not (tmp_path / "run").exists()
