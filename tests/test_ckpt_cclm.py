"""CCLM checkpoint layout and mapping: the full-size models (built on the meta device, nothing
allocated) against the reference manifests, and the pretrained -> fine-tuning mapping on small models."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _configs import CCLM_TINY  # noqa: E402
import freeze  # noqa: E402
import train_cclm  # noqa: E402
from formats import x2vlm  # noqa: E402

FIX = Path(__file__).resolve().parent / "fixtures" / "cclm"
TASKS = ("xgqa", "xvnli", "xflickrco")
# full-size layouts observed by running the reference (ft_<task>.keys.tsv / .init_from_pretrain.tsv): MaRVL too
REFERENCE_LAYOUTS = TASKS + ("marvl",)


def read_keys(name: str) -> dict[str, tuple[tuple[int, ...], str]]:
    out = {}
    for line in (FIX / name).read_text().splitlines():
        key, shape, dtype = line.split("\t")
        out[key] = (tuple(int(s) for s in shape.strip("[]").split(",") if s), dtype)
    return out


def meta_model(task: str):
    with torch.device("meta"):
        return train_cclm.build_model(task, train_cclm.CONFIGS["base"])


def layout_of(model) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("task", REFERENCE_LAYOUTS)
def test_base_layout_equals_reference(task: str) -> None:
    model = meta_model(task)
    assert layout_of(model) == read_keys(f"ft_{task}.keys.tsv")
    if task == "xgqa":  # tied exactly like the reference's BertLMHeadModel
        dec = model.text_decoder
        assert dec.cls.predictions.decoder.weight is dec.bert.embeddings.word_embeddings.weight
        assert dec.cls.predictions.decoder.bias is dec.cls.predictions.bias


@pytest.mark.parametrize("task", REFERENCE_LAYOUTS)
def test_pretrained_mapping_equals_reference(task: str) -> None:
    model = meta_model(task)
    pre = {k: s for k, (s, _) in read_keys("pretrain_cclm_x2vlm_base.keys.tsv").items()}
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    buffers = {n for n, _ in model.named_buffers() if n in own}
    plan = x2vlm.pretrained_load_plan(pre, own, buffers, task)
    lines = (FIX / f"ft_{task}.init_from_pretrain.tsv").read_text().splitlines()
    want = [tuple(line.split("\t")) for line in lines[1:]]
    assert Counter(a for _, a, _ in plan) == Counter(a for _, a, _ in want)
    assert sorted(plan) == sorted(want)


def test_mapping_errors_name_the_key() -> None:
    model = meta_model("xvnli")
    pre = {k: s for k, (s, _) in read_keys("pretrain_cclm_x2vlm_base.keys.tsv").items()}
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="surprise.weight"):
        x2vlm.pretrained_load_plan({**pre, "surprise.weight": (3,)}, own, set(), "xvnli")
    missing = dict(pre)
    del missing["cross_encoder.encoder.layer.5.output.dense.bias"]
    with pytest.raises(ValueError, match=r"cross_encoder\.encoder\.layer\.5\.output\.dense\.bias"):
        x2vlm.pretrained_load_plan(missing, own, set(), "xvnli")
    bad = {**pre, "text_encoder.embeddings.word_embeddings.weight": (10, 768)}
    with pytest.raises(ValueError, match="word_embeddings"):
        x2vlm.pretrained_load_plan(bad, own, set(), "xvnli")


def small(image_res: int, vision_width: int = 32) -> dict:
    return {
        **train_cclm.resolve_config(CCLM_TINY),
        "image_res": image_res,
        "text_layers": 2,
        "cross_layers": 2,
        "dec_layers": 2,
        "vocab_size": 50,
        "vision_width": vision_width,
    }


def fake_pretraining_state(tmp_path: Path, vision_width: int = 32) -> tuple[Path, dict]:
    """A CrossViewLM-shaped state dict at a smaller image size (3x3 grid standing in for 224),
    wrapped like the pretraining script saves it."""
    torch.manual_seed(0)
    ret = train_cclm.build_model("xflickrco", small(48, vision_width))
    state = {k: v.clone() for k, v in ret.state_dict().items()}
    for k, v in state.items():
        if v.is_floating_point():
            v.normal_()
    h = small(48)["hidden_size"]
    state.update({"bbox_head.0.weight": torch.randn(2 * h, h), "mlm_head.predictions.bias": torch.randn(50)})
    path = tmp_path / "pre.th"
    torch.save({"model": state, "config": {"image_res": 48}}, path)
    return path, state


def test_cross_attention_reads_vision_width_and_decoder_reads_hidden() -> None:
    model = train_cclm.build_model("xgqa", small(32, vision_width=24))
    cross = model.cross_encoder.encoder.layer[0].crossattention.self
    dec = model.text_decoder.bert.encoder.layer[0].crossattention.self
    assert (cross.key.in_features, cross.value.in_features, cross.query.in_features) == (24, 24, 32)
    assert (dec.key.in_features, dec.value.in_features) == (32, 32)


@pytest.mark.parametrize("vision_width", [32, 24], ids=["vision_width_eq_hidden", "vision_width_ne_hidden"])
def test_load_pretrained_values(tmp_path: Path, vision_width: int) -> None:
    """With vision_width != hidden the reference does not copy the cross encoder's cross-attention
    key/value (vision-width inputs) into the decoder (hidden-width inputs): they keep their fresh init."""
    path, pre = fake_pretraining_state(tmp_path, vision_width)
    model = train_cclm.build_model("xgqa", small(64, vision_width))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = x2vlm.load_checkpoint(model, str(path))
    assert "interpolate_224_to_384 2" in report and "copy_renamed" in report and "bbox_head.0.weight" in report
    after = model.state_dict()
    fresh_kv = vision_width != small(64)["hidden_size"]
    assert f"new_random_init {12 + 8 * fresh_kv}" in report, report
    for k, v in after.items():
        if fresh_kv and x2vlm._is_decoder_cross_kv(k):
            assert torch.equal(v, before[k]), k
        elif k.startswith("text_decoder.bert.encoder."):
            assert torch.equal(v, pre["cross_encoder." + k[len("text_decoder.bert.") :]]), k
        elif "relative_position_bias_table" in k:
            assert v.shape[0] == 7 * 7 + 3
            assert torch.equal(v, x2vlm.resize_rel_pos_bias_table(pre[k], 4)), k
            assert torch.equal(v[-3:], pre[k][-3:])
        elif "relative_position_index" in k or k.startswith(("text_decoder.bert.embeddings.", "text_decoder.cls.")):
            assert torch.equal(v, before[k]), k  # the model's own buffer / fresh init
        else:
            assert torch.equal(v, pre[k]), k


def test_finetuned_roundtrip_and_errors(tmp_path: Path) -> None:
    torch.manual_seed(1)
    a = train_cclm.build_model("xvnli", small(32))
    torch.save({"model": a.state_dict(), "meta": {"model": "cclm"}}, tmp_path / "ft.pt")
    torch.save(a.state_dict(), tmp_path / "bare.pt")
    for name in ("ft.pt", "bare.pt"):
        torch.manual_seed(2)
        b = train_cclm.build_model("xvnli", small(32))
        x2vlm.load_checkpoint(b, str(tmp_path / name))
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    c = train_cclm.build_model("xflickrco", small(32))
    with pytest.raises(ValueError, match="missing key .temp. .11 missing, 6 unexpected"):
        x2vlm.load_checkpoint(c, str(tmp_path / "ft.pt"))
    with pytest.raises(ValueError, match="nope.pt"):
        x2vlm.load_checkpoint(c, str(tmp_path / "nope.pt"))


@pytest.mark.parametrize("task", TASKS + ("marvl",))
def test_layout_18_layers(task: str) -> None:
    model = meta_model(task)
    layout = train_cclm.layer_layout(task)
    assert layout.num_layers == 18
    per_layer, modules = Counter(), Counter()
    for name, p in model.named_parameters():
        layer = layout.layer_of(name)
        if layer is None:
            modules[layout.module_of(name)] += 1
        else:
            per_layer[layer] += 1
    assert [per_layer[i] for i in range(18)] == [16] * 12 + [26] * 6
    expected = {"embeddings", "vision_encoder", "answer_decoder" if task == "xgqa" else "head"}
    assert set(modules) == expected
    assert layout.module_of("text_decoder.cls.predictions.bias") == "answer_decoder"
    assert layout.module_of("vision_encoder.blocks.3.attn.qkv.weight") == "vision_encoder"


# ---------------------------------------------------------------- X2-VLM's optimizer groups on the released layout

# X2-VLM optim.create_optimizer, as written there: no weight decay when any of these strings occurs in the name;
# lr * lr_mult (2, the CCLM fine-tuning configs) for model.init_params; the ViT at the paper's 2e-5.
X2VLM_NO_DECAY = {
    "bias",
    "LayerNorm.bias",
    "LayerNorm.weight",
    "norm.bias",
    "norm.weight",
    "norm1.bias",
    "norm1.weight",
    "norm2.bias",
    "norm2.weight",
}
# The second name of each tied tensor (decoder weight/bias tied to the decoder's word embeddings /
# predictions.bias: docs/reference_facts.md#F-cclm-xgqa-decoder-tied); named_parameters() and so create_optimizer
# see the first only.
TIED_SECOND_NAMES = {"text_decoder.cls.predictions.decoder.weight", "text_decoder.cls.predictions.decoder.bias"}
LR, VISION_LR, WD, LR_MULT = 3e-5, 2e-5, 0.01, 2.0


def x2vlm_expected_groups(task: str) -> dict[str, tuple[float, float]]:
    """name -> (lr, weight decay) by X2-VLM's rules over the manifest's parameters. init_params = the keys
    its loader reports missing from the pretraining checkpoint (new_random_init) that are parameter names."""
    params = [
        k
        for k, (_, dtype) in read_keys(f"ft_{task}.keys.tsv").items()
        if dtype == "float32" and k not in TIED_SECOND_NAMES
    ]
    rows = [line.split("\t") for line in (FIX / f"ft_{task}.init_from_pretrain.tsv").read_text().splitlines()[1:]]
    init_params = {key for key, action, _ in rows if action == "new_random_init"} & set(params)
    out = {}
    for name in params:
        wd = 0.0 if any(s in name for s in X2VLM_NO_DECAY) else WD
        lr = VISION_LR if "vision_encoder" in name else LR * LR_MULT if name in init_params else LR
        out[name] = (lr, wd)
    return out


@pytest.mark.parametrize("task", REFERENCE_LAYOUTS)
def test_optimizer_groups_follow_x2vlm_rules_on_the_released_layout(task: str) -> None:
    model = meta_model(task)
    layout = train_cclm.layer_layout(task)
    groups = freeze.param_groups(
        model,
        layout,
        freeze.Schedule("full", layout.num_layers),
        LR,
        WD,
        {"vision_encoder": VISION_LR},
        no_decay=train_cclm.x2vlm_no_decay,
        lr_mult=train_cclm.lr_mult_rule(train_cclm.lr_mult_prefixes(task, True), LR_MULT),
    )
    names = {id(p): n for n, p in model.named_parameters()}
    got = {names[id(p)]: (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    want = x2vlm_expected_groups(task)
    assert got.keys() == want.keys()
    assert {n for n in got if got[n] != want[n]} == set()
    doubled = sum(lr == LR * LR_MULT for lr, _ in want.values())
    assert (
        doubled == {"xgqa": 10, "xvnli": 6, "xflickrco": 0, "marvl": 6}[task]
    )  # docs/reference_facts.md#F-cclm-load-pretrained
    # the four reversals of the former ndim rule, named
    assert got["vision_encoder.blocks.0.attn.relative_position_bias_table"][1] == 0.0
    assert got["vision_encoder.blocks.0.gamma_1"][1] == WD
    if task == "xflickrco":
        assert got["temp"][1] == WD and got["itm_head.1.weight"][1] == WD
    if task in ("xvnli", "marvl"):
        assert got["cls_head.1.weight"] == (LR * LR_MULT, WD)


def test_xgqa_from_a_finetuned_checkpoint_has_no_large_lr_parameters() -> None:
    """X2-VLM's xGQA init_params are the keys missing when loading: none from a fine-tuned checkpoint;
    XVNLI sets its cls_head when the model is built, whatever is loaded."""
    assert train_cclm.lr_mult_prefixes("xgqa", from_pretraining=False) == ()
    assert train_cclm.lr_mult_prefixes("xvnli", from_pretraining=False) == ("cls_head.",)
    assert train_cclm.lr_mult_prefixes("xflickrco", from_pretraining=True) == ()


@pytest.mark.parametrize("vision_width", [32, 24], ids=["vision_width_eq_hidden", "vision_width_ne_hidden"])
def test_lr_mult_covers_exactly_the_parameters_loading_leaves_fresh(vision_width: int) -> None:
    """X2-VLM's init_params (trained at lr * lr_mult) are the keys its loader leaves randomly initialised:
    with vision_width != hidden that includes the xGQA decoder's cross-attention key/value."""
    cfg = small(64, vision_width)
    with torch.device("meta"):
        model = train_cclm.build_model("xgqa", cfg)
        pre = train_cclm.build_model("xflickrco", small(48, vision_width))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    pre_shapes = {k: tuple(v.shape) for k, v in pre.state_dict().items()}
    buffers = {k for k, _ in model.named_buffers()}
    fresh = {
        k
        for k, action, _ in x2vlm.pretrained_load_plan(pre_shapes, shapes, buffers, "xgqa")
        if action == "new_random_init"
    }
    rule = train_cclm.lr_mult_rule(train_cclm.lr_mult_prefixes("xgqa", True, cfg), 2.0)
    params = {k for k, _ in model.named_parameters()}  # optimizer's view: no buffers, tied tensors once
    doubled = {k for k in params if rule(k) == 2.0}
    assert doubled == fresh & params
    assert any(x2vlm._is_decoder_cross_kv(k) for k in doubled) == (vision_width != cfg["hidden_size"])


# ---------------------------------------------------------------- MaRVL (X2-VLM's XVLMPlusForMARVL)


def marvl_head_layout(hidden: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """XVLMPlusForMARVL's cls_head = build_mlp(text_width * 2, 2): Linear(2h, 4h), LayerNorm, GELU, Linear(4h, 2)."""
    shapes = {"0.weight": (4 * hidden, 2 * hidden), "0.bias": (4 * hidden,), "1.weight": (4 * hidden,)}
    shapes |= {"1.bias": (4 * hidden,), "3.weight": (2, 4 * hidden), "3.bias": (2,)}
    return {f"cls_head.{k}": (v, "float32") for k, v in shapes.items()}


def test_marvl_layout_is_the_xvnli_trunk_with_a_pair_head() -> None:
    """XVLMPlusForMARVL and XVLMPlus4XVNLI share XVLMPlusBase's trunk (no matching/contrastive heads); only the
    classifier differs: it reads [left ; right] (2 x 768) and has 2 classes."""
    trunk = {k: v for k, v in read_keys("ft_xvnli.keys.tsv").items() if not k.startswith("cls_head.")}
    assert layout_of(meta_model("marvl")) == trunk | marvl_head_layout(768)


def test_marvl_from_pretraining_maps_as_xvnli_with_cls_head_new() -> None:
    """X2-VLM's load_pretrained is XVLMPlusBase's for both models: every trunk key is initialised as for XVNLI
    (its observed rows), and the six cls_head tensors are new_random_init, trained at lr x lr_mult."""
    model = meta_model("marvl")
    pre = {k: s for k, (s, _) in read_keys("pretrain_cclm_x2vlm_base.keys.tsv").items()}
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    plan = x2vlm.pretrained_load_plan(pre, own, {n for n, _ in model.named_buffers() if n in own}, "marvl")
    rows = [tuple(line.split("\t")) for line in (FIX / "ft_xvnli.init_from_pretrain.tsv").read_text().splitlines()[1:]]
    assert sorted(plan) == sorted(rows)  # same keys (cls_head's shapes differ, not its action)
    assert {k for k, a, _ in plan if a == "new_random_init"} == set(marvl_head_layout(768))
    prefixes = train_cclm.lr_mult_prefixes("marvl", from_pretraining=True)
    assert prefixes == train_cclm.lr_mult_prefixes("marvl", from_pretraining=False) == ("cls_head.",)
    rule = train_cclm.lr_mult_rule(prefixes, LR_MULT)
    assert {n for n, _ in model.named_parameters() if rule(n) == LR_MULT} == set(marvl_head_layout(768))


def test_marvl_finetuned_file_loads_as_is_and_an_xvnli_one_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(1)
    a = train_cclm.build_model("marvl", small(32))
    torch.save({"model": a.state_dict()}, tmp_path / "marvl.th")
    torch.manual_seed(2)
    b = train_cclm.build_model("marvl", small(32))
    assert "loaded fine-tuned marvl" in x2vlm.load_checkpoint(b, str(tmp_path / "marvl.th"))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    torch.save({"model": train_cclm.build_model("xvnli", small(32)).state_dict()}, tmp_path / "xvnli.th")
    with pytest.raises(ValueError, match="cls_head.0.weight"):
        x2vlm.load_checkpoint(b, str(tmp_path / "xvnli.th"))
