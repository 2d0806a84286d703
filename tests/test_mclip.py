"""comparisons/mclip/train_mclip.py: M-CLIP text tower parity with the reference MultilingualCLIP, the reference
loss and its gradients, mean pooling, PET (LoRA / adapter / soft and hard prompts) freezing and identities,
trainable shares on the real shapes, the loaders' errors, a tiny end-to-end run and bitwise resume."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _timeouts import scaled

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import data  # noqa: E402
from formats import tokenizer_check  # noqa: E402
from formats import readers  # noqa: E402
from comparisons.mclip import xtd_data  # noqa: E402
from synthetic import fixtures  # noqa: E402
from _make import run_make  # noqa: E402
import _faults  # noqa: E402
import _guard  # noqa: E402
import engine  # noqa: E402
from comparisons.mclip import train_mclip as M  # noqa: E402
from formats import run_folder  # noqa: E402
from parity import assert_matches_reference  # noqa: E402

FIX = ROOT / "tests" / "fixtures" / "mclip"
PET_ARGS = argparse.Namespace(
    lora_r=8,
    lora_alpha=16,
    adapter_dim=4,
    soft_prefix=None,
    soft_tokens=3,
    compacter_reduction=2,
    phm_dim=4,
    compacter_act="relu",
)


@pytest.fixture(scope="module")
def ref():
    inputs = json.loads((FIX / "inputs.json").read_text())
    model = M.build_text_model(inputs["text_config"]).eval()
    M.load_text_weights(model, load_file(str(FIX / "weights.safetensors")), "fixture")
    return (
        model,
        tokenizer_check.load_tokenizer(FIX / "tokenizer"),
        inputs["texts"],
        load_file(str(FIX / "outputs.safetensors")),
    )


def tiny_model(seed: int = 0, pet: str | None = None, tokenizer=None, **over) -> M.MCLIPText:
    torch.manual_seed(seed)
    model = M.build_text_model("tiny")
    if pet:
        M.apply_pet(model, pet, argparse.Namespace(**{**vars(PET_ARGS), **over}), tokenizer)
    return model


def ids(*rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    x = torch.full((len(rows), width), data.PAD_ID)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return x, mask


# ---------------------------------------------------------------- parity with the reference


def test_text_tower_matches_reference_multilingual_clip(ref):
    model, tok, texts, want = ref
    got_ids, got_mask = data.encode_texts(tok, texts)
    assert_matches_reference("input_ids", got_ids, want["input_ids"])
    assert_matches_reference("attention_mask", got_mask, want["attention_mask"])
    with torch.no_grad():
        assert_matches_reference("embeddings", M.encode(model, tok, texts, "cpu"), want["embeddings"])
        one = torch.cat([M.encode(model, tok, [t], "cpu") for t in texts])
    assert_matches_reference("embeddings_one_by_one", one, want["embeddings_one_by_one"])


def test_text_weights_of_another_layout_are_a_one_line_error(ref):
    model = ref[0]
    state = dict(model.state_dict())
    state["LinearTransformation.weight"] = state["LinearTransformation.weight"][:, :3]
    with pytest.raises(ValueError, match=r"w\.bin: LinearTransformation\.weight has shape"):
        M.load_text_weights(model, state, "w.bin")
    state.pop("LinearTransformation.bias")
    with pytest.raises(ValueError, match="missing .'LinearTransformation.bias'"):
        M.load_text_weights(model, state, "w.bin")


# ---------------------------------------------------------------- trainable shares on the real shapes


@pytest.mark.parametrize("pet,trainable,pct", [("lora", 884_736, 0.158), ("adapter", 2_507_904, 0.447)])
def test_trainable_share_on_real_xlmr_large_shapes(pet, trainable, pct):
    with torch.device("meta"):
        model = M.build_text_model("large")
        M.apply_pet(model, pet, argparse.Namespace(**{**vars(PET_ARGS), "adapter_dim": 24}))
    got, base = M.count_params(model)
    assert (got, base) == (trainable, 560_677_632)
    assert round(100 * got / base, 3) == pct


def test_lora_trains_query_value_and_output_layer_norms_only():
    names = [n for n, p in tiny_model(pet="lora").named_parameters() if p.requires_grad]
    kinds = {n.split("layer.")[1].split(".", 1)[1].replace(".default", "") for n in names}
    assert kinds == {
        "attention.self.query.lora_A.weight",
        "attention.self.query.lora_B.weight",
        "attention.self.value.lora_A.weight",
        "attention.self.value.lora_B.weight",
        "attention.output.LayerNorm.weight",
        "attention.output.LayerNorm.bias",
        "output.LayerNorm.weight",
        "output.LayerNorm.bias",
    }
    assert len(names) == 2 * len(kinds)  # both tiny layers; never the embeddings' LayerNorm or the projection


# ---------------------------------------------------------------- loss, metric


def test_symmetric_loss_on_hand_computed_case():
    image = torch.tensor([[3.0, 4.0], [0.0, 2.0]], dtype=torch.float64)  # normalised: [.6, .8], [0, 1]
    text = torch.tensor([[1.0, 0.0], [0.0, 5.0]], dtype=torch.float64)  # normalised: [1, 0], [0, 1]
    # logits = 100 * [[.6, .8], [0, 1]] = [[60, 80], [0, 100]]; rows: CE(60 | 60, 80), CE(100 | 0, 100);
    # columns: CE(60 | 60, 0), CE(100 | 80, 100)
    lse = lambda a, b: max(a, b) + math.log1p(math.exp(-abs(a - b)))  # noqa: E731
    rows = (lse(60, 80) - 60) + (lse(0, 100) - 100)
    cols = (lse(60, 0) - 60) + (lse(80, 100) - 100)
    want = (rows / 2 + cols / 2) / 2
    got = M.routine_loss(image, text, None, "mse", 1.0)
    assert got.item() == pytest.approx(want, rel=1e-12)
    partner = torch.tensor([[1.0, 1.0], [2.0, 3.0]], dtype=torch.float64)
    mse = ((1 - 1) ** 2 + (0 - 1) ** 2 + (0 - 2) ** 2 + (5 - 3) ** 2) / 4  # on the unnormalised embeddings
    assert M.routine_loss(image, text, partner, "mse", 0.5).item() == pytest.approx(want + 0.5 * mse, rel=1e-12)


def test_alignment_terms_send_gradient_to_the_branches_the_reference_does():
    torch.manual_seed(0)
    image, text, partner = (torch.randn(4, 6, dtype=torch.float64, requires_grad=True) for _ in range(3))
    M.routine_loss(image, text, partner, "mse", 2.0).backward()
    # MSE: the English (partner) branch is not detached, its gradient is exactly d(2 * mean((t - p)^2)) / dp
    assert torch.allclose(partner.grad, 2.0 * 2 * (partner - text).detach() / text.numel(), rtol=0, atol=1e-15)
    # contrastive (partner vs text) and contrastive_with_image (image vs partner): the partner's gradient is that of
    # its own term alone
    terms = {
        "contrastive": lambda p: M.symmetric_ce(M.l2_normalise(p), M.l2_normalise(text.detach())),
        "contrastive_with_image": lambda p: M.symmetric_ce(M.l2_normalise(image.detach()), M.l2_normalise(p)),
    }
    for align, term in terms.items():
        p, p2 = (partner.detach().clone().requires_grad_() for _ in range(2))
        M.routine_loss(image.detach(), text.detach(), p, align, 1.0).backward()
        term(p2).backward()
        assert p.grad.abs().sum() > 0 and torch.allclose(p.grad, p2.grad, rtol=1e-12, atol=1e-15)
    baseline = M.routine_loss(image, text, None, "mse", 1.0)  # baselines: the image-text term only
    assert torch.equal(baseline, M.symmetric_ce(M.l2_normalise(image), M.l2_normalise(text)))


def test_image_features_get_no_gradient_through_the_loss_in_training(tmp_path):
    model = tiny_model(pet="adapter")
    split = xtd_data.RetrievalSplit(
        ["a.jpg", "b.jpg"], {"native": {"en": ["a b", "c d"], "de": ["e f", "g h"]}, "to_en": {"de": ["a c", "b d"]}}
    )
    tok = fixtures.make_tiny_tokenizer(["a b c d e f g h"] * 5, tmp_path / "tok", vocab_size=40)
    feats = {n: torch.randn(16, requires_grad=True) for n in split.images}
    args = argparse.Namespace(routine="method3", lang="de", hard_prompt=None, align_loss="mse", align_ratio=1.0)
    M.train_step(model, tok, split, [0, 1], feats, args, "cpu").backward()
    assert all(f.grad is None for f in feats.values())
    assert any(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_recall_at_1_and_disparity_on_hand_cases():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    text = torch.tensor([[1.0, 0.1], [1.0, 0.0], [0.9, 1.0]])
    # cosines: image0 [.995, 1, .669], image1 [.0995, 0, .743], image2 [.774, .707, .999] (rows: texts 0-2)
    # i2t: image0 -> text1 miss, image1 -> text2 miss, image2 -> text2 hit; t2i: text0 -> image0 hit,
    # text1 -> image0 miss, text2 -> image2 hit
    got = M.recall_at_1(image, text)
    assert got["i2t_r1"] == pytest.approx(100 / 3) and got["t2i_r1"] == pytest.approx(200 / 3)
    assert got["mean_r1"] == pytest.approx(50.0)
    d = M.disparity({"en": 50.0, "de": 40.0, "ja": 30.0})
    assert d == pytest.approx({"avg": 40.0, "range": 20.0, "std": math.sqrt(200 / 3)})


# ---------------------------------------------------------------- pooling, PET identities and freezing


def test_mean_pooling_ignores_padding():
    model = tiny_model().eval()
    x, mask = ids([0, 7, 8, 2], [0, 9, 10, 11, 12, 13, 2])
    with torch.no_grad():
        batch = model(x, mask)
        alone = model(*ids([0, 7, 8, 2]))
        hidden = torch.randn(2, 7, 5)
        garbage = hidden.clone()
        garbage[0, 4:] = 1e6
    assert_matches_reference("padded row", batch[:1], alone)
    assert torch.equal(M.mean_pool(hidden, mask), M.mean_pool(garbage, mask))


def _train_a_little(model: M.MCLIPText, steps: int = 3) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, mask = ids([0, 5, 6, 7, 2], [0, 8, 9, 2])
    for _ in range(steps):
        model(x, mask).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("pet", ["lora", "adapter", "compacter", "prompt"])
def test_pet_freezes_everything_else_bitwise(pet):
    model = tiny_model(pet=pet)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = M.trainable_state(model)
    assert "LinearTransformation.weight" in frozen and trained
    _train_a_little(model)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    changed = [n for n, p in model.named_parameters() if n in trained and not torch.equal(p, trained[n])]
    assert changed, "no trainable parameter moved"


def test_lora_with_zero_B_equals_base_bitwise_and_merged_equals_unmerged():
    from peft.tuners.lora import LoraLayer

    base = tiny_model(seed=1).eval()
    lora = tiny_model(seed=1, pet="lora").eval()
    x, mask = ids([0, 5, 6, 7, 2], [0, 8, 2])
    with torch.no_grad():
        assert torch.equal(lora(x, mask), base(x, mask))
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
        unmerged = lora(x, mask)
        assert not torch.allclose(unmerged, base(x, mask))
        for m in lora.modules():
            if isinstance(m, LoraLayer):
                m.merge()
        assert_matches_reference("merged LoRA", lora(x, mask), unmerged)


def test_adapter_with_zero_up_projection_equals_base_bitwise():
    base = tiny_model(seed=2).eval()
    adapted = tiny_model(seed=2, pet="adapter").eval()
    x, mask = ids([0, 5, 6, 7, 2], [0, 8, 2])
    with torch.no_grad():
        assert not torch.equal(adapted(x, mask), base(x, mask))  # N(0, 0.01) up-projection: a real change
        for n, p in adapted.named_parameters():
            if "up_proj" in n:
                p.zero_()
        assert torch.equal(adapted(x, mask), base(x, mask))


def test_soft_prompt_goes_after_bos_and_extends_the_mask():
    prompt = M.SoftPrompt(torch.full((2, 3), 7.0))
    embeds = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    out, out_mask = prompt(embeds, mask)
    assert torch.equal(out[:, 0], embeds[:, 0]) and torch.equal(out[:, 3:], embeds[:, 1:])
    assert (out[:, 1:3] == 7.0).all()
    assert out_mask.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]


def test_soft_prompt_from_prefix_equals_the_hard_prompt_on_unpadded_input(tmp_path):
    tok = fixtures.make_tiny_tokenizer(["a photo of a dog on the beach"] * 5, tmp_path / "tok", vocab_size=40)
    prefix_ids = data.encode_texts(tok, ["a photo of"])[0][0, 1:-1].tolist()
    text_ids = data.encode_texts(tok, ["a dog"])[0][0].tolist()
    base = tiny_model(seed=3).eval()
    soft = tiny_model(seed=3, pet="prompt", tokenizer=tok, soft_prefix="a photo of").eval()
    assert soft.prompt.embeds.shape[0] == len(prefix_ids)
    with torch.no_grad():
        hard = base(*ids(text_ids[:1] + prefix_ids + text_ids[1:]))
        assert_matches_reference("soft prompt = hard prompt ids", soft(*ids(text_ids)), hard)


def test_clip_image_tower_is_the_same_in_train_and_eval_mode(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=12,
    )
    vision = CLIPVisionModelWithProjection(cfg)
    paths = fixtures.write_synthetic_images(tmp_path, ["a.jpg", "b.png"], size=(50, 40))
    with torch.no_grad():
        vision.train()
        train = M.encode_images(vision, paths)
        vision.eval()
        assert torch.equal(M.encode_images(vision, paths), train)
    assert train.shape == (2, 12)
    assert M.clip_preprocess(readers.load_image(paths[0]), 32).shape == (3, 32, 32)


# ---------------------------------------------------------------- data

LANG_WORDS = {"en": "dog cat red blue runs sits on grass", "de": "hund katze rot blau läuft sitzt auf gras"}


def write_xtd(root: Path, n: int = 12) -> list[str]:
    names = [f"COCO_val2014_{i:012d}.jpg" for i in range(n)]
    (root / "all").mkdir(parents=True)
    (root / "all" / "test_image_names.txt").write_text("\n".join(names) + "\n")
    for kind, pattern in [
        ("native", "all/test_1kcaptions_{}.txt"),
        ("from_en", "translated_from_en/{}.txt"),
        ("to_en", "translated_to_en/{}.txt"),
    ]:
        for lang, words in LANG_WORDS.items():
            w = words.split()
            lines = [" ".join(w[(i * k) % len(w)] for k in range(1, 5)) + f" {kind[:2]}" for i in range(n)]
            path = root / pattern.format(lang)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(lines) + "\n")
    return [xtd_data.xtd_image_path(x) for x in names]


def test_xtd_loader_reads_pectvlm_layout_and_splits_like_run_xtd(tmp_path):
    images = write_xtd(tmp_path)
    full = xtd_data.load_xtd(tmp_path, ["de", "en"])
    assert full.images == images and images[0] == "val2014/COCO_val2014_000000000000.jpg"
    splits = xtd_data.xtd_splits(full, 3, 42)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(42)).tolist()
    assert splits["train"].images == [images[i] for i in perm[:3]]
    assert [len(s.images) for s in splits.values()] == [3, 3, 6]
    assert splits["test"].captions("to_en", "de")[0] == full.texts["to_en"]["de"][perm[6]]
    assert splits["val"].captions("en", "de") == [full.texts["native"]["en"][i] for i in perm[3:6]]


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda p: p.write_text("a\nb\n"), r"test_1kcaptions_de\.txt: 2 lines, expected 12"),
        (lambda p: p.write_text("a\n\nb\n" + "c\n" * 9), r"test_1kcaptions_de\.txt:2: empty line"),
        (lambda p: p.write_bytes(b"a\n\xff\xfe\n" * 6), r"test_1kcaptions_de\.txt:2: not UTF-8"),
        (lambda p: p.unlink(), r"test_1kcaptions_de\.txt: file not found"),
    ],
)
def test_bad_xtd_caption_file_is_a_one_line_error_naming_it(tmp_path, damage, match):
    write_xtd(tmp_path)
    damage(tmp_path / "all" / "test_1kcaptions_de.txt")
    with pytest.raises(ValueError, match=match):
        xtd_data.load_xtd(tmp_path, ["de", "en"])


def test_xtd_image_name_that_is_not_a_coco_file_name_is_an_error_naming_its_line(tmp_path):
    write_xtd(tmp_path)
    names = tmp_path / "all" / "test_image_names.txt"
    names.write_text(names.read_text().replace("COCO_val2014_000000000002.jpg", "dog.jpg"))
    with pytest.raises(ValueError, match=r"test_image_names\.txt:3: XTD10 image name 'dog\.jpg' is not a COCO 2014"):
        xtd_data.load_xtd(tmp_path, ["de", "en"])


def test_multi30k_loader_reads_task1_layout(tmp_path):
    base = tmp_path / "data" / "task1"
    for split, name in xtd_data.MULTI30K_SPLITS.items():
        (base / "image_splits").mkdir(parents=True, exist_ok=True)
        (base / "image_splits" / f"{name}.txt").write_text("1.jpg\n2.jpg\n")
        for d in ("raw", "translated_from_en", "translated_to_en"):
            (base / d).mkdir(exist_ok=True)
            for lang in ("en", "cs"):
                (base / d / f"{name}.{lang}").write_text(f"{d} {lang} one\n{d} {lang} two\n")
    splits = xtd_data.multi30k_splits(tmp_path, ["cs", "en"], None, 42)
    assert splits["test"].images == ["flickr30k-images/1.jpg", "flickr30k-images/2.jpg"]
    assert splits["val"].captions("to_en", "cs") == ["translated_to_en cs one", "translated_to_en cs two"]
    assert len(xtd_data.multi30k_splits(tmp_path, ["cs", "en"], 1, 42)["train"].images) == 1


# ---------------------------------------------------------------- end to end, resume


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("xtd")
    images = write_xtd(root / "XTD10")
    texts = [l for p in (root / "XTD10").rglob("*.txt") for l in p.read_text().splitlines()]
    fixtures.make_tiny_tokenizer(texts * 3 + ["a photo of"], root / "tok", vocab_size=60)
    torch.manual_seed(0)
    torch.save({"names": images, "features": torch.randn(len(images), 16)}, root / "feats.pt")
    return root


def cli(world: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--dataset",
        "xtd",
        "--data-root",
        str(world / "XTD10"),
        "--lang",
        "de",
        "--routine",
        "method3",
        "--pet",
        "lora",
        "--n-shot",
        "3",
        "--text-config",
        "tiny",
        "--random-init",
        "--tokenizer",
        str(world / "tok"),
        "--image-features",
        str(world / "feats.pt"),
        "--epochs",
        "2",
        "--batch-size",
        "2",
        "--eval-steps",
        "2",
        "--lr",
        "1e-2",
        "--seed",
        "0",
        "--output-dir",
        str(out),
        *extra,
    ]


def lines(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / run_folder.METRICS).read_text().splitlines()) if r["type"] == kind]


def test_tiny_run_trains_validates_and_tests_the_best_state(world, tmp_path):
    result = M.main(cli(world, tmp_path / "run"))
    run = tmp_path / "run"
    train, val = lines(run, "train"), lines(run, "val")
    assert len(train) == 4 and [v["step"] for v in val] == [2, 4]  # 2 epochs x ceil(3 / 2) steps
    assert train[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine to zero, no warm-up
    final = torch.load(run / run_folder.FINAL, weights_only=True)
    assert all(".lora_" in k or "LayerNorm" in k for k in final["model"])  # the language's PET module only
    # the tested state is the best validation one (ties: the latest), a trained one (LoRA B starts at zero)
    last = torch.load(run / run_folder.CHECKPOINT, weights_only=True)["model"]
    best_is_last = val[-1]["mean_r1"] >= max(v["mean_r1"] for v in val)
    assert all(torch.equal(final["model"][k], last[k]) for k in last) == best_is_last
    assert any(v.any() for k, v in final["model"].items() if "lora_B" in k)
    test = {k: v for k, v in lines(run, "test")[0].items() if k != "type"}
    assert result["test"] == test and set(test) == {"i2t_r1", "t2i_r1", "mean_r1"}
    assert json.loads((run / "results.json").read_text())["lang"] == "de"
    with pytest.raises(SystemExit, match="already holds a run"):
        M.main(cli(world, run))


def test_compacter_that_does_not_fit_the_width_is_a_one_line_error(world, tmp_path):
    with pytest.raises(SystemExit, match=r"error: PHMLinear 32 -> 2: both must be multiples of phm_dim 4"):
        M.main(cli(world, tmp_path / "run", "--pet", "compacter"))


def test_zero_shot_with_a_hard_prompt_trains_nothing(world, tmp_path):
    result = M.main(cli(world, tmp_path / "zs", "--pet", "none", "--hard-prompt", "a photo of"))
    assert lines(tmp_path / "zs", "train") == [] and result["trainable"] == 0


@pytest.mark.parametrize("fault", ["raise:epoch_end:2", "raise:step:6"])  # after a checkpoint; mid-epoch 3
def test_resume_after_a_failure_is_bitwise_exact(world, tmp_path, monkeypatch, fault):
    M.main(cli(world, tmp_path / "whole", "--epochs", "3"))
    undo_fault = _faults.install(fault, _faults.MCLIP, monkeypatch=monkeypatch)
    with pytest.raises(RuntimeError, match="injected failure"):
        M.main(cli(world, tmp_path / "cut", "--epochs", "3"))
    undo_fault()
    M.main(cli(world, tmp_path / "cut", "--epochs", "3", "--resume"))
    a = torch.load(tmp_path / "whole" / run_folder.FINAL, weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / run_folder.FINAL, weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "whole" / run_folder.METRICS).read_text() == (tmp_path / "cut" / run_folder.METRICS).read_text()


def test_missing_image_features_are_named_before_training(world, tmp_path):
    torch.save({"names": ["val2014/x.jpg"], "features": torch.zeros(1, 16)}, tmp_path / "f.pt")
    with pytest.raises(SystemExit, match=r"f\.pt: no features for 12 image\(s\), e\.g\. 'val2014/COCO_val2014_"):
        M.main(cli(world, tmp_path / "run", "--image-features", str(tmp_path / "f.pt")))


def test_features_command_reads_openai_clip_release_layout_and_feeds_a_run(world, tmp_path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config={
            "vocab_size": 50,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 20,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    clip = CLIPModel(cfg).eval()
    clip.save_pretrained(tmp_path / "clip")  # the layout of openai/clip-vit-large-patch14: the whole CLIPModel
    names = xtd_data.load_xtd(world / "XTD10", ["en"]).images
    paths = fixtures.write_synthetic_images(tmp_path / "coco", names, size=(40, 36))
    M.main(
        [
            "features",
            "--dataset",
            "xtd",
            "--data-root",
            str(world / "XTD10"),
            "--images",
            str(tmp_path / "coco"),
            "--clip-vision",
            str(tmp_path / "clip"),
            "--out",
            str(tmp_path / "f.pt"),
        ]
    )
    table = M.read_image_features(tmp_path / "f.pt")
    with torch.no_grad():
        pix = torch.stack([M.clip_preprocess(readers.load_image(p), 32) for p in paths[:2]])
        want = clip.get_image_features(pixel_values=pix)
    want = getattr(want, "pooler_output", want)
    assert_matches_reference("CLIP image embeddings", torch.stack([table[n] for n in names[:2]]), want)
    result = M.main(cli(world, tmp_path / "run", "--image-features", str(tmp_path / "f.pt"), "--epochs", "1"))
    assert result["test"]["mean_r1"] >= 0
    with pytest.raises(SystemExit, match="exists"):
        M.main(
            [
                "features",
                "--dataset",
                "xtd",
                "--data-root",
                str(world / "XTD10"),
                "--images",
                "x",
                "--clip-vision",
                "y",
                "--out",
                str(tmp_path / "f.pt"),
            ]
        )
    cfg_file = tmp_path / "clip" / "config.json"
    cfg_file.write_text(cfg_file.read_text().replace('"projection_dim": 16', '"projection_dim": 8'))
    with pytest.raises(ValueError, match=r"clip: visual_projection\.weight has shape \(16, 16\), the config \(8, 16\)"):
        M.load_clip_vision(tmp_path / "clip")


# ---------------------------------------------------------------- make targets


def make(*args: str, env_lang: str = "C.UTF-8"):
    return run_make(*args, env={"LANG": env_lang})


@pytest.mark.system
def test_pet_xtd_target_prints_the_run_and_ignores_the_locale_lang():
    out = make("-n", "pet-xtd", "LANG=fr", "ROUTINE=method1", "PET=adapter", "MCLIP=/m", "XTD=/x")
    assert out.stdout.splitlines()[-1].strip() == (
        ".venv/bin/python -m comparisons.mclip.train_mclip --dataset xtd --data-root /x --lang fr --routine method1 "
        "--align-loss mse "
        "--pet adapter --text-checkpoint /m --tokenizer /m --n-shot 50 "
        "--image-features runs/features/xtd-clip-vitl14.pt --output-dir runs/mclip-xtd50-fr-method1-adapter"
    )
    assert "--lang de " in make("-n", "pet-xtd", env_lang="fr_FR.UTF-8").stdout  # the locale is not a language
    grid = [l for l in make("-n", "pet-xtd-grid").stdout.splitlines() if "comparisons.mclip.train_mclip" in l]
    assert [l.split("--lang ")[1].split()[0] for l in grid] == list(xtd_data.XTD_LANGS)


@pytest.mark.system
def test_pet_table_target_passes_a_named_baseline(tmp_path):
    (tmp_path / "runs").mkdir()
    plain = make("-n", "pet-table", f"OUT={tmp_path}/runs").stdout.splitlines()[-1].rstrip()
    assert plain.endswith(f"-m comparisons.mclip.train_mclip table {tmp_path}/runs/mclip-*/")
    named = make("-n", "pet-table", f"OUT={tmp_path}/runs", "BASELINE=xtd/baseline1/none/50").stdout.splitlines()[-1]
    assert named.endswith(
        f"-m comparisons.mclip.train_mclip table {tmp_path}/runs/mclip-*/ --baseline xtd/baseline1/none/50"
    )


@pytest.mark.system
def test_pet_target_with_missing_inputs_fails_naming_them(tmp_path):
    out = make("pet-multi30k", f"MULTI30K={tmp_path}/m", f"OUT={tmp_path}/runs")
    assert out.returncode != 0 and f"{tmp_path}/m " in out.stderr and "comparisons.mclip.train_mclip" not in out.stdout


# ---------------------------------------------------------------- Compacter


def test_phm_weight_is_the_sum_of_kronecker_products():
    torch.manual_seed(0)
    phm = M.PHMLinear(8, 12, n=4)
    w = torch.bmm(phm.W_left, phm.W_right)
    want = sum(torch.kron(phm.phm_rule[i], w[i]) for i in range(4))
    assert phm.weight().shape == (8, 12)
    assert_matches_reference("PHM weight", phm.weight(), want)
    x = torch.randn(3, 8)
    assert_matches_reference("PHM forward", phm(x), x @ want + phm.b)


def test_compacter_with_zero_up_rule_equals_base_bitwise():
    over = {"compacter_reduction": 2, "phm_dim": 4}
    base = tiny_model(seed=4).eval()
    comp = tiny_model(seed=4, pet="compacter", **over).eval()
    x, mask = ids([0, 5, 6, 7, 2], [0, 8, 2])
    with torch.no_grad():
        assert not torch.equal(comp(x, mask), base(x, mask))
        for n, p in comp.named_parameters():
            if "up_sampler.phm_rule" in n:
                p.zero_()
        assert torch.equal(comp(x, mask), base(x, mask))


def test_compacter_share_on_real_shapes():
    # the reference's settings (reduction 16, n 4, rank 1, biases): per layer pair down 1024->64 (64 + 1024 + 64 + 64)
    # and up 64->1024 (64 + 64 + 1024 + 1024) = 3,392 x 48 = 162,816, + 98,304 LayerNorm = 261,120 (the paper's 0.05%)
    with torch.device("meta"):
        model = M.build_text_model("large")
        M.apply_pet(
            model, "compacter", argparse.Namespace(**{**vars(PET_ARGS), "compacter_reduction": 16, "phm_dim": 4})
        )
    got, base = M.count_params(model)
    assert (got, base) == (261_120, 560_677_632) and round(100 * got / base, 3) == 0.047


# ---------------------------------------------------------------- freeze policies on the text tower


def test_suf_on_the_text_tower_keeps_lower_layers_frozen_in_the_first_stage(world, tmp_path):
    M.main(cli(world, tmp_path / "suf", "--pet", "full", "--policy", "suf", "--suf-k", "1", "--epochs", "1"))
    best = torch.load(tmp_path / "suf" / run_folder.FINAL, weights_only=True)["model"]
    engine.seed_everything(0)
    init = M.build_text_model("tiny").state_dict()
    assert best.keys() == dict(M.build_text_model("tiny").named_parameters()).keys()  # --pet full: the whole tower
    same = lambda prefix: all(torch.equal(best[k], init[k]) for k in best if k.startswith(prefix))  # noqa: E731
    assert same("transformer.encoder.layer.0.")  # stage 0 trains the top k = 1 of 2 layers only
    assert not same("transformer.encoder.layer.1.") and not same("transformer.embeddings.")
    assert not same("LinearTransformation.")


def test_a_freeze_policy_needs_full_tuning(world, tmp_path):
    with pytest.raises(SystemExit, match="--policy suf schedules the whole text tower: it needs --pet full"):
        M.main(cli(world, tmp_path / "run", "--policy", "suf"))


def test_resume_with_a_changed_argument_is_refused(world, tmp_path, monkeypatch):
    undo_fault = _faults.install("raise:epoch_end:1", _faults.MCLIP, monkeypatch=monkeypatch)
    with pytest.raises(RuntimeError, match="injected failure"):
        M.main(cli(world, tmp_path / "cut"))
    undo_fault()
    with pytest.raises(SystemExit, match=r"--resume: --lr is 0\.02 but the run in .*args\.json used 0\.01"):
        M.main(cli(world, tmp_path / "cut", "--resume", "--lr", "0.02"))


def test_a_saved_language_module_reloads_and_reproduces_its_test_score(world, tmp_path):
    trained = M.main(cli(world, tmp_path / "a"))
    again = M.main(cli(world, tmp_path / "b", "--eval-only", "--load-pet", str(tmp_path / "a" / run_folder.FINAL)))
    assert again["test"] == trained["test"]
    a, b = (torch.load(tmp_path / r / run_folder.FINAL, weights_only=True)["model"] for r in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit, match=r"--load-pet .*model_final\.pt: not a train_mclip\.py --pet adapter module"):
        M.main(cli(world, tmp_path / "c", "--pet", "adapter", "--load-pet", str(tmp_path / "a" / run_folder.FINAL)))


def test_image_features_file_that_pickles_an_object_is_refused_unrun(world, tmp_path):
    torch.save(
        {"names": ["val2014/x.jpg"], "features": torch.zeros(1, 16), "extra": argparse.Namespace(a=1)},
        tmp_path / "evil.pt",
    )
    with pytest.raises(SystemExit, match=r"evil\.pt: refused to load: .*nothing in this file was run"):
        M.main(cli(world, tmp_path / "run", "--image-features", str(tmp_path / "evil.pt")))


@pytest.mark.parametrize("size", [(50, 40), (37, 61), (32, 32), (225, 224)])
def test_clip_preprocess_equals_openai_clips_torchvision_transform(tmp_path, size):
    from torchvision import transforms as T

    openai = T.Compose(
        [
            T.Resize(32, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(32),
            T.ToTensor(),
            T.Normalize(data.CLIP_MEAN, data.CLIP_STD),
        ]
    )  # clip/clip.py _transform(n_px), RGB input
    img = readers.load_image(fixtures.write_synthetic_images(tmp_path, ["a.png"], size=size)[0])
    assert torch.equal(M.clip_preprocess(img, 32), openai(img))


def test_image_features_of_another_width_are_refused_before_training(world, tmp_path):
    names = xtd_data.load_xtd(world / "XTD10", ["en"]).images
    torch.save({"names": names, "features": torch.zeros(len(names), 12)}, tmp_path / "f.pt")
    with pytest.raises(SystemExit, match="image features are 12-d, the text tower's output 16-d"):
        M.main(cli(world, tmp_path / "run", "--image-features", str(tmp_path / "f.pt")))
    assert not (tmp_path / "run" / run_folder.METRICS).exists()


@pytest.mark.parametrize(
    "routine,main,partner",
    [
        ("baseline1", "native-de", None),
        ("method1", "native-de", "native-en"),
        ("method2", "native-de", "from_en-de"),
        ("baseline2", "to_en-de", None),
        ("method3", "to_en-de", "native-en"),
    ],
)
def test_each_routine_trains_on_its_text_and_aligns_with_its_partner(routine, main, partner, monkeypatch):
    kinds = {"native": ("en", "de"), "from_en": ("de",), "to_en": ("de",)}
    split = xtd_data.RetrievalSplit(
        ["a", "b", "c"], {k: {l: [f"{k}-{l}-{i}" for i in range(3)] for l in ls} for k, ls in kinds.items()}
    )
    seen = []
    fake_encode = lambda model, tok, texts, device: seen.append(list(texts)) or torch.randn(2, 4)  # noqa: E731
    monkeypatch.setattr(M, "encode", fake_encode)
    args = argparse.Namespace(routine=routine, lang="de", hard_prompt=None, align_loss="mse", align_ratio=1.0)
    M.train_step(None, None, split, [2, 0], {n: torch.randn(4) for n in "abc"}, args, "cpu")
    assert seen == [[f"{main}-2", f"{main}-0"]] + ([[f"{partner}-2", f"{partner}-0"]] if partner else [])


@pytest.mark.parametrize(
    "routine,extra,kinds_seen",
    [
        ("method2", [], ["native", "native"]),
        ("method3", [], ["to_en", "to_en"]),
        ("method3", ["--test-text", "run_cross"], ["to_en", "native"]),  # PECTVLM run_cross.py's test text
        ("baseline1", ["--test-text", "run_cross"], ["native", "to_en"]),
    ],
)
def test_validation_and_test_use_the_text_the_routine_trains_on(
    world, tmp_path, monkeypatch, routine, extra, kinds_seen
):
    kinds, evaluate = [], M.evaluate

    def spy(model, tok, split, images, k, lang, args, device, dist=None):
        kinds.append((k, lang))
        return evaluate(model, tok, split, images, k, lang, args, device, dist)

    monkeypatch.setattr(M, "evaluate", spy)
    M.main(cli(world, tmp_path / "run", "--routine", routine, "--epochs", "1", *extra))
    assert kinds == [(k, "de") for k in kinds_seen]  # one validation (step 2), then the test


def test_table_prints_per_language_scores_with_disparity_and_the_xtd_caveat(tmp_path, capsys):
    for lang, score in [("en", 60.0), ("de", 50.0), ("ja", 40.0)]:
        (tmp_path / lang).mkdir()
        (tmp_path / lang / "results.json").write_text(
            json.dumps(
                {
                    "dataset": "xtd",
                    "routine": "method3",
                    "pet": "lora",
                    "n_shot": 50,
                    "lang": lang,
                    "test": {"mean_r1": score},
                }
            )
        )
    out = M.main(["table", *(str(tmp_path / l) for l in ("en", "de", "ja"))])
    row = out["xtd/method3/lora/50"]
    assert row["avg"] == pytest.approx(50.0) and row["range"] == pytest.approx(20.0)
    assert row["std"] == pytest.approx(math.sqrt(200 / 3))
    printed = capsys.readouterr().out
    assert "de=50.0 en=60.0 ja=40.0 | avg 50.00 range 20.00 std 8.16" in printed and "COCO train" in printed
    with pytest.raises(SystemExit, match="no results"):
        M.main(["table", str(tmp_path)])


def _write_results(folder: Path, routine: str, scores: dict[str, float]) -> list[str]:
    runs = []
    for lang, score in scores.items():
        run = folder / f"{routine}-{lang}"
        run.mkdir(parents=True)
        (run / "results.json").write_text(
            json.dumps(
                {
                    "dataset": "xtd",
                    "routine": routine,
                    "pet": "lora",
                    "n_shot": 50,
                    "test_text": "to_en",
                    "lang": lang,
                    "test": {"mean_r1": score},
                }
            )
        )
        runs.append(str(run))
    return runs


def test_table_keeps_runs_of_another_freeze_policy_in_a_group_of_their_own(tmp_path):
    runs = []
    for policy, score in (("full", 50.0), ("suf", 47.0), (None, 45.0)):  # None: a results.json without the key
        run = tmp_path / f"{policy}-de"
        run.mkdir()
        result = {"dataset": "xtd", "routine": "method1", "pet": "full", "n_shot": 50, "lang": "de"}
        result.update({"test": {"mean_r1": score}, **({"policy": policy} if policy else {})})
        (run / "results.json").write_text(json.dumps(result))
        runs.append(str(run))
    out = M.main(["table", runs[0], runs[1]])
    assert out["xtd/method1/full/50"]["de"] == 50.0 and out["xtd/method1/full/50/policy:suf"]["de"] == 47.0
    with pytest.raises(SystemExit, match="a second de run of group xtd/method1/full/50$"):
        M.main(["table", runs[0], runs[2]])  # no policy recorded = full


def test_table_prints_the_reported_drops_and_each_groups_change_against_a_named_baseline(tmp_path, capsys):
    base = _write_results(tmp_path, "baseline2", {"en": 60.0, "de": 40.0, "fr": 50.0})  # range 20, std 8.165
    ours = _write_results(tmp_path, "method3", {"en": 60.0, "de": 52.0, "fr": 56.0})  # range 8, std 3.266
    small = _write_results(tmp_path, "method1", {"en": 60.0, "de": 44.0, "fr": 52.0})  # range 16, std 6.532
    out = M.main(["table", *base, *ours, *small, "--baseline", "xtd/baseline2/lora/50/test:to_en"])
    vs = out["xtd/method3/lora/50/test:to_en"]["vs_baseline"]
    assert vs["range_change"] == pytest.approx(-12.0)
    assert vs["std_change"] == pytest.approx(math.sqrt(32 / 3) - math.sqrt(200 / 3))
    assert vs["range_drop_exceeds_reported"] and vs["std_drop_exceeds_reported"]
    weak = out["xtd/method1/lora/50/test:to_en"]["vs_baseline"]  # range -4 (not > 5), std -1.633 (> 1.5)
    assert (weak["range_drop_exceeds_reported"], weak["std_drop_exceeds_reported"]) == (False, True)
    assert "vs_baseline" not in out["xtd/baseline2/lora/50/test:to_en"]
    printed = capsys.readouterr().out
    assert printed.startswith("paper (arXiv 2305.03510") and "no per-language numbers" in printed
    assert (
        "  vs xtd/baseline2/lora/50/test:to_en: range -12.00 (exceeds the reported drop of 5), "
        "std -4.90 (exceeds the reported drop of 1.5)"
    ) in printed
    assert "range -4.00 (does not exceed the reported drop of 5)" in printed
    with pytest.raises(SystemExit, match="--baseline xtd/x: no such group among the runs"):
        M.main(["table", *ours, "--baseline", "xtd/x"])
    two_langs = _write_results(tmp_path / "b", "baseline2", {"en": 60.0, "de": 40.0})
    out = M.main(["table", *two_langs, *ours, "--baseline", "xtd/baseline2/lora/50/test:to_en"])
    assert out["xtd/method3/lora/50/test:to_en"]["vs_baseline"]["error"] == "languages differ (de,en,fr vs de,en)"
    with pytest.raises(SystemExit, match="a second de run of group xtd/method3"):
        M.main(["table", *ours, *_write_results(tmp_path / "again", "method3", {"de": 1.0})])


def test_a_run_that_would_never_validate_is_refused_before_training(world, tmp_path):
    with pytest.raises(
        SystemExit,
        match=r"2 optimizer steps \(3 training examples, --batch-size 2, --epochs 1\) "
        r"never reach --eval-steps 5",
    ):
        M.main(cli(world, tmp_path / "run", "--epochs", "1", "--eval-steps", "5"))


@pytest.mark.parametrize(
    "extra,key",
    [
        (["--pet", "adapter", "--adapter-dim", "4"], "transformer.encoder.layer.1.output.dense.adapter.up_proj.weight"),
        (
            ["--pet", "compacter", "--compacter-reduction", "2"],
            "transformer.encoder.layer.0.output.dense.adapter.up_sampler.b",
        ),
        (["--pet", "prompt", "--soft-prefix", "dog cat"], "prompt.embeds"),
        (["--pet", "full", "--policy", "llrd"], "transformer.embeddings.word_embeddings.weight"),
        (["--pet", "full", "--policy", "top", "--top-layers", "1"], "LinearTransformation.weight"),
    ],
)
def test_every_tuning_method_runs_end_to_end_and_saves_its_module(world, tmp_path, extra, key):
    M.main(cli(world, tmp_path / "run", "--epochs", "1", *extra))
    saved = torch.load(tmp_path / "run" / run_folder.FINAL, weights_only=True)
    assert key in saved["model"] and saved["meta"]["pet"] == extra[1]


def test_run_cross_lora_variant_trains_its_modules_and_share_on_real_shapes():
    names = [n for n, p in tiny_model(pet="lora_cross").named_parameters() if p.requires_grad]
    lora = {n.split(".lora_A")[0].split("layer.")[1].split(".", 1)[1] for n in names if ".lora_A." in n}
    assert lora == {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"}
    assert "LinearTransformation.weight" in names and "transformer.pooler.dense.weight" in names
    with torch.device("meta"):
        model = M.build_text_model("large")
        M.apply_pet(model, "lora_cross", argparse.Namespace(**{**vars(PET_ARGS), "lora_r": 1}))
    # r 1 on 4 x 24 projections of 1024 x 1024 (2,048 each) + LayerNorms 98,304 + pooler 1,049,600 + projection 787,200
    assert M.count_params(model) == (196_608 + 98_304 + 1_049_600 + 787_200, 560_677_632)


@pytest.mark.system
def test_torchrun_two_processes_take_the_one_process_steps(world, tmp_path):
    """2 gloo ranks, --dropout 0, a global batch of 3 (shards of 2 + 1, then a last batch of 1: 1 + an empty one),
    method3 (text and English partner both gathered), run_cross's LoRA (its pooler gets no gradient on any rank):
    the weights after every step equal one process's within tests/parity.py's tolerance; rank 0 alone writes."""
    import os
    import subprocess

    common = (
        "--n-shot",
        "4",
        "--batch-size",
        "3",
        "--eval-steps",
        "2",
        "--dropout",
        "0",
        "--pet",
        "lora_cross",
        "--lora-r",
        "2",
    )
    one = M.main(cli(world, tmp_path / "one", *common))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "comparisons.mclip.train_mclip",
            *cli(world, tmp_path / "two", *common),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=scaled(300),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"mean_r1"') == 1  # one result line: rank 0's
    for name in (run_folder.CHECKPOINT, run_folder.FINAL):  # the last state and the best validated one
        a, b = (torch.load(tmp_path / r / name, weights_only=True)["model"] for r in ("one", "two"))
        assert a.keys() == b.keys() and any(".lora_B" in k for k in a)
        for k in a:
            assert_matches_reference(f"{name} {k}", b[k], a[k])
    start = tiny_model(seed=0, pet="lora_cross", lora_r=2).state_dict()
    last = torch.load(tmp_path / "one" / run_folder.CHECKPOINT, weights_only=True)
    pooler = "transformer.pooler.dense.weight"  # unused by the loss: no gradient on any rank, as in one process
    assert torch.equal(last["model"][pooler], start[pooler])
    assert [r["step"] for r in lines(tmp_path / "two", "train")] == [1, 2, 3, 4]
    for kind in ("val", "test"):
        assert lines(tmp_path / "two", kind) == lines(tmp_path / "one", kind)
    losses = [[r["loss"] for r in lines(tmp_path / r, "train")] for r in ("one", "two")]
    assert losses[1] == pytest.approx(losses[0], rel=RTOL_LOSS)
    state = torch.load(tmp_path / "two" / run_folder.CHECKPOINT, weights_only=True)
    assert state["world"] == 2 and len(state["rng"]) == 2 and len(last["rng"]) == 1
    assert json.loads((tmp_path / "two" / "results.json").read_text())["test"] == one["test"]


@pytest.mark.system
def test_torchrun_resume_with_dropout_is_bitwise_exact(world, tmp_path):
    """2 gloo ranks with dropout on (each rank its own masks): a run cut after its first epoch and resumed ends
    bitwise equal to the uninterrupted one (every rank's RNG restored), metrics.jsonl included."""
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(ROOT / "tests" / "_mclip_resume_torchrun.py"),
            *cli(world, tmp_path, "--n-shot", "4", "--batch-size", "3", "--epochs", "3"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=scaled(300),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in (run_folder.CHECKPOINT, run_folder.FINAL):
        a, b = (torch.load(tmp_path / r / name, weights_only=True)["model"] for r in ("whole", "cut"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert (tmp_path / "whole" / run_folder.METRICS).read_text() == (tmp_path / "cut" / run_folder.METRICS).read_text()
    rng = torch.load(tmp_path / "cut" / run_folder.CHECKPOINT, weights_only=True)["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])  # two dropout streams


def test_features_command_under_torchrun_is_refused_before_anything_is_written(world, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="features runs in one process"):
        M.main(
            [
                "features",
                "--dataset",
                "xtd",
                "--data-root",
                str(world / "XTD10"),
                "--images",
                "x",
                "--clip-vision",
                "y",
                "--out",
                str(tmp_path / "f.pt"),
            ]
        )
    assert not (tmp_path / "f.pt").exists()


RTOL_LOSS = 1e-5  # a float32 loss summed in another order (shards padded to their own longest caption)


def test_resume_with_another_world_size_is_refused_and_the_older_rng_format_resumes(world, tmp_path, monkeypatch):
    undo_fault = _faults.install("raise:epoch_end:1", _faults.MCLIP, monkeypatch=monkeypatch)
    with pytest.raises(RuntimeError, match="injected failure"):
        M.main(cli(world, tmp_path / "cut"))
    undo_fault()
    state = torch.load(tmp_path / "cut" / run_folder.CHECKPOINT, weights_only=True)
    run_folder.save_checkpoint(tmp_path / "cut" / run_folder.CHECKPOINT, {**state, "world": 2, "rng": state["rng"] * 2})
    with pytest.raises(SystemExit, match=r"checkpoint_last\.pt: saved by 2 process\(es\), resumed with 1"):
        M.main(cli(world, tmp_path / "cut", "--resume"))
    older = {k: v for k, v in state.items() if k != "world"}  # this trainer's format before torchrun: one RNG state
    run_folder.save_checkpoint(tmp_path / "cut" / run_folder.CHECKPOINT, {**older, "rng": state["rng"][0]})
    M.main(cli(world, tmp_path / "cut", "--resume"))
    M.main(cli(world, tmp_path / "whole"))
    a, b = (torch.load(tmp_path / r / run_folder.FINAL, weights_only=True)["model"] for r in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_of_the_counters_before_engine_progress_resumes_bitwise(world, tmp_path, monkeypatch):
    """Checkpoints written before this trainer used training.progress.Progress held the best score and step among the
    counters (and metrics_size for engine's metrics_offset): they resume to the uninterrupted run's state."""
    undo_fault = _faults.install("raise:epoch_end:1", _faults.MCLIP, monkeypatch=monkeypatch)
    with pytest.raises(RuntimeError, match="injected failure"):
        M.main(cli(world, tmp_path / "cut"))
    undo_fault()
    state = torch.load(tmp_path / "cut" / run_folder.CHECKPOINT, weights_only=True)
    new = state["progress"]
    old = {k: new[k] for k in ("epoch", "step", "nonfinite_steps", "amp_skipped_steps")}
    old.update(best=state["best"]["r1"], best_step=state["best"]["step"], metrics_size=new["metrics_offset"])
    older = {k: v for k, v in state.items() if k != "best"}
    run_folder.save_checkpoint(tmp_path / "cut" / run_folder.CHECKPOINT, {**older, "progress": old})
    M.main(cli(world, tmp_path / "cut", "--resume"))
    M.main(cli(world, tmp_path / "whole"))
    a, b = (torch.load(tmp_path / r / run_folder.FINAL, weights_only=True)["model"] for r in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "whole" / run_folder.METRICS).read_text() == (tmp_path / "cut" / run_folder.METRICS).read_text()


def test_released_mclip_folder_layout_loads(tmp_path, ref):
    """M-CLIP's release: a folder with pytorch_model.bin (saved by transformers 4, with the position_ids buffer)."""
    model, tok, texts, want = ref
    state = dict(load_file(str(FIX / "weights.safetensors")))
    state["transformer.embeddings.position_ids"] = torch.arange(80)[None]
    (tmp_path / "mclip").mkdir()
    torch.save(state, tmp_path / "mclip" / "pytorch_model.bin")
    fresh = M.build_text_model(json.loads((FIX / "inputs.json").read_text())["text_config"]).eval()
    M.load_text_weights(fresh, M.read_state_dict(tmp_path / "mclip"), "mclip")
    with torch.no_grad():
        assert_matches_reference("released layout", M.encode(fresh, tok, texts, "cpu"), want["embeddings"])
    with pytest.raises(ValueError, match="holds neither model.safetensors nor pytorch_model.bin"):
        M.read_state_dict(tmp_path)


@pytest.mark.parametrize(
    "case",
    ["epochs_0", "negative_lr", "nan_align_ratio", "eval_steps_0", "negative_dropout", "lora_r_0"],
)
def test_every_numeric_flag_is_range_checked_naming_it(world, tmp_path, case):
    """engine.check_arg_ranges with M-CLIP's rules, right after parsing: the flag at fault is named (--lr -1 was
    refused as a --resume error, --epochs 0 and --align-ratio nan accepted)."""
    flag, value, rule = {
        "epochs_0": ("--epochs", "0", ">= 1"),
        "negative_lr": ("--lr", "-1", ">= 0"),
        "nan_align_ratio": ("--align-ratio", "nan", ">= 0"),
        "eval_steps_0": ("--eval-steps", "0", ">= 1"),
        "negative_dropout": ("--dropout", "-0.5", "in [0, 1)"),
        "lora_r_0": ("--lora-r", "0", ">= 1"),
    }[case]
    with pytest.raises(SystemExit) as e:
        M.main(cli(world, tmp_path / "run", flag, value))
    assert str(e.value) == f"error: {flag} {value} is out of range: must be {rule}"
    assert not (tmp_path / "run").exists()


def test_nan_image_features_are_refused_before_training(world, tmp_path):
    names = torch_names(world)
    torch.save({"names": names, "features": torch.full((len(names), 16), float("nan"))}, tmp_path / "nan.pt")
    with pytest.raises(SystemExit) as e:
        M.main(cli(world, tmp_path / "run", "--image-features", str(tmp_path / "nan.pt")))
    assert str(e.value) == (
        f"error: {tmp_path / 'nan.pt'}: the features of 12 image(s) hold NaN or inf, e.g. {sorted(names)[0]!r}"
    )
    assert not (tmp_path / "run" / run_folder.METRICS).exists()


def torch_names(world: Path) -> list[str]:
    return list(torch.load(world / "feats.pt", weights_only=True)["names"])


@pytest.mark.parametrize("case", ["validation", "test", "no_finite_step"])
def test_non_finite_run_writes_no_result(world, tmp_path, monkeypatch, capsys, case):
    """The trainers' guard: NaN scores at validation or test (all-NaN image features used to give test R@1 = 100),
    or a run none of whose steps was finite (--align-ratio nan used to give the untrained model's numbers), end as
    one line, exit status 1, with no model_final.pt, no results.json and no test record."""
    if case == "no_finite_step":
        monkeypatch.setattr(M, "routine_loss", lambda *a: torch.tensor(float("nan"), requires_grad=True))
    else:
        monkeypatch.setattr(M.MCLIPText, "forward", _guard.nan_output(M.MCLIPText.forward))
    run = tmp_path / "run"
    code, line = _guard.exit_line(M.main, cli(world, run, *(["--pet", "none"] if case == "test" else [])), capsys)
    assert code == 1, line
    assert (
        line
        == {
            "validation": "error: validation at step 2: non-finite image-text similarities (NaN or inf) for 3 of 3 "
            "examples of a batch; model_final.pt and results.json not written",
            "test": "error: test: non-finite image-text similarities (NaN or inf) for 6 of 6 examples of a batch; "
            "model_final.pt and results.json not written",
            "no_finite_step": "error: the run made no finite optimizer step (4 steps: 4 non-finite, 0 skipped by the "
            "fp16 scaler); model_final.pt not written (its weights would be the initial ones); check the data, --lr "
            "and --amp",
        }[case]
    )
    assert _guard.results_written(run) == [] and lines(run, "test") == []


def test_compacter_runs_relu_as_opendelta_applied_it_with_gelu_new_as_the_named_option():
    # OpenDelta's CompacterConfig default non_linearity 'relu' overrides CompacterModel's 'gelu_new'
    # (docs/reference_facts.md#F-opendelta-compacter-act)
    assert M.build_parser().get_default("compacter_act") == "relu"
    torch.manual_seed(0)
    comp = M.Compacter(8, reduction=2, n=4)
    y = torch.randn(3, 8)
    with torch.no_grad():
        want = y + comp.up_sampler(torch.relu(comp.down_sampler(y)))
        assert torch.equal(comp(y), want)
        comp.act = "gelu_new"
        gelu = y + comp.up_sampler(torch.nn.functional.gelu(comp.down_sampler(y), approximate="tanh"))
        assert torch.equal(comp(y), gelu) and not torch.equal(gelu, want)
    model = tiny_model(seed=1, pet="compacter", compacter_reduction=2, compacter_act="gelu_new")
    assert {m.act for m in model.modules() if isinstance(m, M.Compacter)} == {"gelu_new"}


def test_a_missing_text_checkpoint_is_refused_unless_random_init_is_given(world, tmp_path):
    argv = [a for a in cli(world, tmp_path / "run") if a != "--random-init"]
    with pytest.raises(SystemExit, match="^error: no --text-checkpoint: .* or --random-init"):
        M.main(argv)
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit, match="--random-init and --text-checkpoint"):
        M.main(cli(world, tmp_path / "run", "--text-checkpoint", str(tmp_path)))


@pytest.mark.parametrize("preset", sorted(M.PRESETS))
def test_each_preset_gives_its_published_scripts_settings_and_an_explicit_flag_wins(preset):
    base = ["--dataset", "xtd", "--data-root", "x", "--lang", "de", "--tokenizer", "t", "--output-dir", "o"]
    args = vars(M.parse_args([*base, "--preset", preset]))
    assert {k: args[k] for k in M.PRESETS[preset]} == M.PRESETS[preset]
    assert M.parse_args([*base, "--preset", preset, "--lr", "0.5"]).lr == 0.5
    plain = vars(M.parse_args(base))
    assert {k for k in M.PRESETS[preset] if plain[k] != args[k]}  # every preset differs from the mixed default


def test_presets_hold_the_published_scripts_values():
    # PECTVLM 22b7594: run_XTD.py:33,39-52; run_cross.py:29-44, 216-221; scripts/de.sh:3-19
    xtd, cross, de = M.PRESETS["run_xtd"], M.PRESETS["run_cross"], M.PRESETS["de_sh"]
    assert (xtd["lora_r"], xtd["batch_size"], xtd["eval_steps"], xtd["eval_batch_size"], xtd["lr"]) == (
        8,
        4,
        4,
        200,
        1e-3,
    )
    assert (xtd["align_ratio"], xtd["pet"], xtd["test_text"]) == (1.0, "lora", "routine")
    assert (cross["lora_r"], cross["lr"], cross["align_ratio"], cross["pet"]) == (1, 1e-3, 1.0, "lora_cross")
    assert (de["lora_r"], de["batch_size"], de["eval_steps"], de["eval_batch_size"], de["lr"]) == (1, 5, 5, 100, 1e-4)
    assert (de["align_ratio"], de["routine"], de["test_text"]) == (0.5, "method1", "run_cross")
    d = M.DEFAULTS  # the mixed default: run_XTD.py's LoRA with de.sh's numbers
    assert (d["lora_r"], d["lr"], d["align_ratio"], d["batch_size"], d["eval_steps"]) == (8, 1e-4, 0.5, 5, 5)


def test_a_compacter_run_from_before_compacter_act_resumes_only_with_the_gelu_new_it_ran(tmp_path):
    base = ["--dataset", "xtd", "--data-root", "x", "--lang", "de", "--tokenizer", "t", "--output-dir", "o"]
    args = M.parse_args([*base, "--pet", "compacter"])
    saved = {k: v for k, v in run_folder.json_safe(vars(args)).items() if k != "compacter_act"}
    (tmp_path / run_folder.ARGS).write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match="--compacter-act is 'relu' but the run in .* used 'gelu_new'"):
        M.check_resume_args(args, tmp_path)
    M.check_resume_args(M.parse_args([*base, "--pet", "compacter", "--compacter-act", "gelu_new"]), tmp_path)
