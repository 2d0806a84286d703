"""UC2 checkpoint mapping against every released layout (manifests in tests/fixtures/uc2/*.keys.tsv).

Full-size layouts are checked on the meta device (no memory); loading real tensors is checked with
tiny files that follow the same manifests (all widths shrunk, key order kept).
"""

import pickle
import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _configs import UC2_TINY  # noqa: E402
import train_uc2 as U  # noqa: E402
from formats import volta as V  # noqa: E402
from formats import torch_files  # noqa: E402
from parity import assert_matches_reference  # noqa: E402

FIX = Path(__file__).resolve().parent / "fixtures" / "uc2"
# VOLTA's BertForVLTasks layouts per task (marvl: IGLUE's NLVR2 entry TASK12, VL-binary-classifier)
FT_MANIFEST = {
    "xgqa": "uc2_volta_ft_gqa",
    "xvnli": "uc2_volta_ft_xvnli",
    "xflickrco": "uc2_volta_ft_retrieval",
    "marvl": "uc2_volta_ft_nlvr2",
}


def manifest(name: str) -> dict[str, tuple]:
    out = {}
    for line in (FIX / f"{name}.keys.tsv").read_text().splitlines():
        key, shape, _dtype = line.split("\t")
        out[key] = tuple(-1 if d == "N_vis" else int(d) for d in shape.strip("[]").split(",") if d)
    return out


def original_to_volta_rows() -> list[tuple[str, str, str]]:
    rows = (FIX / "uc2_original_to_volta.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["volta_key", "shape", "original_key", "note"]
    return [tuple(r.split("\t")[i] for i in (0, 2, 3)) for r in rows[1:]]


def meta_model(task: str, config: str = "base") -> U.UC2:
    with torch.device("meta"):
        return U.build_model(task, U.CONFIGS[config])


def shapes(model) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def canonical(volta_key: str, task: str) -> str:
    kind, val = V.volta_key(volta_key, task)
    return V.volta_key(val, task)[1] if kind == "alias" else val


# ---------------------------------------------------------------- full-size layouts (meta device)


@pytest.mark.parametrize("task", U.TASKS)
def test_volta_pretrained_manifest(task):
    src, target = manifest("uc2_volta_pretrained"), shapes(meta_model(task))
    assert len(src) == 416
    plan = V.plan_load(src, target, task, name="uc2_checkpoint_200000.bin")
    assert plan.fmt == "volta" and plan.ok, plan.report()
    # README: 194 alias keys (193 v_*/image token-type twins + the MLM decoder = word embeddings),
    # 222 distinct tensors; the 14 cls.* keys (13 distinct tensors) are dropped
    assert len(plan.aliases) == 193 and len(plan.copy) == 222 - 13
    assert sorted(k for k, _ in plan.dropped) == sorted(k for k in src if k.startswith("cls."))
    assert {k for k, _ in plan.initialised} == {k for k in target if k.startswith("head.")}
    assert set(plan.copy) | {k for k, _ in plan.initialised} == set(target)
    # every VOLTA encoder sublayer pair (2k, 2k+1) lands in our layer k
    for dst, (s, _) in plan.copy.items():
        if dst.startswith("encoder.layer."):
            assert int(s.split(".")[3]) // 2 == int(dst.split(".")[2])
    assert (
        sum(torch.Size(target[k]).numel() for k in plan.copy)
        + sum(torch.Size(src[k]).numel() for k, _ in plan.dropped if k != "cls.predictions.decoder.weight")
        == 282_295_765
    )  # README: 282,295,765 parameters in the file (decoder = word embeddings, counted once)


@pytest.mark.parametrize("task", sorted(FT_MANIFEST))  # IGLUE's released fine-tuned files (marvl: below)
def test_volta_finetuned_manifest(task):
    src, target = manifest(FT_MANIFEST[task]), shapes(meta_model(task))
    plan = V.plan_load(src, target, task, name=FT_MANIFEST[task])
    assert plan.ok and not plan.dropped and not plan.initialised and not plan.notes, plan.report()
    assert set(plan.copy) == set(target) and len(plan.aliases) == 193
    assert {s for s, _ in plan.copy.values() if s.startswith("clfs_dict.")} == {
        k for k in src if k.startswith("clfs_dict.")
    }
    # a head of another task is an error naming the key, never silently dropped
    for other in U.TASKS:
        if other != task:
            bad = V.plan_load(src, shapes(meta_model(other)), other, name=FT_MANIFEST[task])
            assert not bad.ok
            with pytest.raises(ValueError, match="clfs_dict|head"):
                bad.raise_if_bad()


def test_original_manifest_matches_volta_converter():
    src = manifest("uc2_original_pretrained")
    assert len(src) == 238
    target = shapes(meta_model("xgqa"))
    # N_vis keys are dropped before any shape matters; give them a size for the plan
    plan = V.plan_load({k: tuple(7 if d == -1 else d for d in s) for k, s in src.items()}, target, "xgqa")
    assert plan.fmt == "original" and plan.ok, plan.report()
    dropped = dict(plan.dropped)
    expected_sources = {}
    for volta, original, note in original_to_volta_rows():
        if volta == "-":
            assert original in dropped, f"{original} should be dropped ({note})"
            continue
        kind, ours = V.volta_key(volta, "xgqa")
        if kind == "drop":  # VOLTA pre-training heads: the task model drops them
            continue
        ours = canonical(volta, "xgqa")
        if original == "-":  # VOLTA key with no UC2 source: stays at construction value
            assert ours in plan.constant, f"{ours} ({volta}) should be a constant: {note}"
            assert plan.constant[ours] == (1.0 if ours.endswith("weight") else 0.0)
            continue
        expected_sources.setdefault(ours, original)
        assert expected_sources[ours] == original, f"{volta}: aliases disagree"
    got = {dst: s for dst, (s, _) in plan.copy.items()}
    assert got == expected_sources
    # the documented collision: VOLTA's text-embedding LN comes from UC2's image-embedding LN
    assert got["embeddings.LayerNorm.weight"] == "roberta.img_embeddings.LayerNorm.weight"
    assert (
        "roberta.embeddings.LayerNorm.weight" in dropped
        and "overwritten" in dropped["roberta.embeddings.LayerNorm.weight"]
    )
    assert {k for k, _ in plan.initialised} == {k for k in target if k.startswith("head.")} | {
        "embeddings.v_LayerNorm.weight",
        "embeddings.v_LayerNorm.bias",
    }
    assert any("collision" in n for n in plan.notes)


def test_missing_and_unexpected_are_errors():
    src, target = manifest("uc2_volta_ft_xvnli"), shapes(meta_model("xvnli"))
    del src["bert.encoder.layer.5.output.dense.weight"]
    with pytest.raises(ValueError, match="encoder.layer.2.output.dense.weight"):
        V.plan_load(src, target, "xvnli").raise_if_bad()
    src = manifest("uc2_volta_ft_xvnli")
    src["bert.encoder.layer.3.extra.weight"] = (4,)
    with pytest.raises(ValueError, match="bert.encoder.layer.3.extra.weight"):
        V.plan_load(src, target, "xvnli").raise_if_bad()
    src = manifest("uc2_volta_ft_xvnli")
    src["bert.embeddings.position_embeddings.weight"] = (512, 768)
    with pytest.raises(ValueError, match="position_embeddings"):
        V.plan_load(src, target, "xvnli").raise_if_bad()


# ---------------------------------------------------------------- real tensors, tiny widths

TINY = U.resolve_config(UC2_TINY)
SHRINK = {768: TINY["hidden_size"], 3072: TINY["intermediate_size"], 250002: TINY["vocab_size"], -1: 7}


def tiny_tensors(name: str, dtype=torch.float32, seed=0) -> dict[str, torch.Tensor]:
    """A file laid out like manifest `name` at tiny widths; VOLTA aliases share one tensor, as saved."""
    g = torch.Generator().manual_seed(seed)
    src = manifest(name)
    out = {}
    for k, s in src.items():
        kind, of = V.volta_key(k, "xgqa") if k.startswith(("bert.", "cls.")) else ("", "")
        if kind == "alias":
            out[k] = out[of]
        elif k == "cls.predictions.decoder.weight":
            out[k] = out["bert.embeddings.word_embeddings.weight"]
        else:
            out[k] = torch.randn([SHRINK.get(d, d) for d in s], generator=g).to(dtype)
    return out


def test_load_original_fp16_file(tmp_path):
    sd = tiny_tensors("uc2_original_pretrained", torch.float16)
    path = tmp_path / "model_step_200000.pt"
    torch.save(sd, path)
    model = U.build_model("xgqa", TINY)
    plan = V.load_into(model, str(path))
    assert plan.ok
    ours = model.state_dict()
    assert all(v.dtype == torch.float32 for v in ours.values())
    for dst, (src, _) in plan.copy.items():
        assert torch.equal(ours[dst], sd[src].float()), dst
    assert torch.equal(ours["embeddings.LayerNorm.bias"], sd["roberta.img_embeddings.LayerNorm.bias"].float())
    assert torch.equal(ours["embeddings.v_LayerNorm.weight"], torch.ones(TINY["hidden_size"]))
    assert torch.equal(ours["embeddings.v_LayerNorm.bias"], torch.zeros(TINY["hidden_size"]))
    assert torch.equal(
        ours["encoder.layer.11.output.dense.weight"], sd["roberta.encoder.layer.11.output.dense.weight"].float()
    )


def test_original_and_volta_files_give_the_same_model(tmp_path):
    """Loading model_step_200000.pt directly == loading the VOLTA file convert_uc2.py makes of it."""
    orig = tiny_tensors("uc2_original_pretrained", torch.float16, seed=1)
    volta = {}
    sources = {v: o for v, o, _ in original_to_volta_rows() if v != "-"}
    for k, t in tiny_tensors("uc2_volta_pretrained").items():
        o = sources[k]
        volta[k] = (
            orig[o].float()
            if o != "-"
            else (
                torch.ones_like(t)
                if k.endswith("LayerNorm.weight")
                else torch.zeros_like(t)
                if "v_LayerNorm" in k
                else t
            )
        )
    a, b = U.build_model("xvnli", TINY), U.build_model("xvnli", TINY)
    V.load_into(a, orig)
    V.load_into(b, volta)
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        if not k.startswith("head."):
            assert torch.equal(sa[k], sb[k]), k


def test_load_volta_files_and_iglue_tar_without_volta(tmp_path):
    sd = tiny_tensors("uc2_volta_ft_gqa")
    torch.save(sd, tmp_path / "pytorch_model_best.bin")
    # pytorch_ckpt_latest.tar holds a pickled volta.train_utils.tbLogger: make one, then hide the module
    mod = types.ModuleType("volta.train_utils")

    class tbLogger:  # noqa: N801  (VOLTA's name)
        def __init__(self):
            self.task_ids, self.epochId = ["TASK15"], 3

        def __getstate__(self):
            return dict(self.__dict__)

    tbLogger.__module__, tbLogger.__qualname__ = "volta.train_utils", "tbLogger"
    mod.tbLogger = tbLogger
    sys.modules["volta"], sys.modules["volta.train_utils"] = types.ModuleType("volta"), mod
    try:
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
        torch.save(
            {
                "model_state_dict": sd,
                "optimizer_state_dict": opt.state_dict(),
                "scheduler_state_dict": {},
                "global_step": 10,
                "epoch_id": 3,
                "tb_logger": tbLogger(),
                "score": 0.5,
            },
            tmp_path / "pytorch_ckpt_latest.tar",
        )
    finally:
        del sys.modules["volta"], sys.modules["volta.train_utils"]
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "pytorch_ckpt_latest.tar", weights_only=True)
    state, extra = V.read_checkpoint(str(tmp_path / "pytorch_ckpt_latest.tar"))
    assert extra["epoch_id"] == 3 and extra["tb_logger"].state["epochId"] == 3
    assert type(extra["tb_logger"]) is torch_files.VoltaTbLogger  # an inert stand-in: no VOLTA code exists to run
    for name in ("pytorch_model_best.bin", "pytorch_ckpt_latest.tar"):
        model = U.build_model("xgqa", TINY)
        plan = V.load_into(model, str(tmp_path / name))
        assert plan.ok and not plan.initialised
        ours = model.state_dict()
        assert torch.equal(ours["head.3.weight"], sd["clfs_dict.TASK15.logit_fc.3.weight"])
        assert torch.equal(
            ours["encoder.layer.4.attention.self.key.bias"], sd["bert.encoder.layer.8.attention_self.key.bias"]
        )
        assert torch.equal(
            ours["embeddings.token_type_embeddings.weight"], sd["bert.embeddings.new_token_type_embeddings.weight"]
        )
    # aliases must really be aliases
    sd["bert.encoder.layer.0.attention_self.v_query.weight"] = (
        sd["bert.encoder.layer.0.attention_self.v_query.weight"] + 1
    )
    with pytest.raises(ValueError, match="v_query"):
        V.load_into(U.build_model("xgqa", TINY), sd)


def test_text_side_from_xlm_roberta_folder(tmp_path):
    from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM

    c = TINY
    torch.manual_seed(0)
    hf = XLMRobertaForMaskedLM(
        XLMRobertaConfig(
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            num_hidden_layers=c["num_layers"],
            num_attention_heads=c["num_heads"],
            intermediate_size=c["intermediate_size"],
            max_position_embeddings=c["max_position_embeddings"],
            type_vocab_size=1,
            layer_norm_eps=c["layer_norm_eps"],
        )
    ).eval()
    hf.save_pretrained(tmp_path / "xlm-roberta-base")
    model = U.build_model("xvnli", c).eval()
    plan = V.load_into(model, str(tmp_path / "xlm-roberta-base"))
    assert plan.fmt == "xlmr" and plan.ok, plan.report()
    assert any(k.startswith("embeddings.image_embeddings") for k, _ in plan.initialised)
    assert any(k.startswith("pooler.") for k, _ in plan.initialised)
    # with every region masked out, UC2's text stream is exactly XLM-R's encoder
    ids = torch.tensor([[0, 5, 17, 99, 2, 1, 1], [0, 8, 2, 1, 1, 1, 1]])
    mask = ids.ne(1).long()
    trace = {}
    with torch.no_grad():
        model.encode(
            ids, mask, torch.randn(2, 3, 2048), torch.rand(2, 3, 7), torch.zeros(2, 3, dtype=torch.long), trace=trace
        )
        ref = hf.roberta(input_ids=ids, attention_mask=mask).last_hidden_state
    got = trace["sublayer_outputs_t"][-1]
    assert_matches_reference("text stream vs XLM-R", got[mask.bool()], ref[mask.bool()])


def test_our_checkpoint_roundtrip(tmp_path):
    model = U.build_model("xflickrco", TINY)
    torch.save(
        {"model": model.state_dict(), "meta": {"model": "uc2", "task": "xflickrco", "config": TINY}},
        tmp_path / "model_final.pt",
    )
    other = U.build_model("xflickrco", TINY)
    plan = V.load_into(other, str(tmp_path / "model_final.pt"))
    assert plan.fmt == "ours" and plan.ok and len(plan.copy) == len(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


def test_iglue_no_decay_rule_on_our_names():
    src, target = manifest("uc2_volta_ft_gqa"), shapes(meta_model("xgqa"))
    plan = V.plan_load(src, target, "xgqa")
    for ours, (volta, _) in plan.copy.items():
        volta_rule = any(s in volta for s in ("bias", "LayerNorm.bias", "LayerNorm.weight"))
        assert U.iglue_no_decay(ours) == volta_rule, (ours, volta)
    decayed_vectors = sorted(k for k in target if len(target[k]) == 1 and not U.iglue_no_decay(k))
    assert decayed_vectors == [
        "embeddings.image_layer_norm.weight",
        "embeddings.image_location_layer_norm.weight",
        "head.2.weight",
    ]


# ---------------------------------------------------------------- MaRVL: VOLTA's NLVR2 head (TASK12)


def nlvr2_head(pooler: int, hidden: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """VOLTA's VL-binary-classifier: SimpleClassifier(pooler_size * 2, clf_hidden_size, 2): logit_fc 0 (Linear),
    1 (GeLU), 2 (LayerNorm), 3 (Linear), under clfs_dict.TASK12 (IGLUE's NLVR2 task id). Built from VOLTA's
    definition (volta/encoders.py), not read from a released file."""
    shapes = {"0.weight": (hidden, 2 * pooler), "0.bias": (hidden,), "2.weight": (hidden,), "2.bias": (hidden,)}
    shapes |= {"3.weight": (2, hidden), "3.bias": (2,)}
    return {f"clfs_dict.TASK12.logit_fc.{k}": torch.randn(v, generator=g) for k, v in shapes.items()}


def test_marvl_head_is_new_from_the_pretrained_file_and_loaded_from_an_nlvr2_file():
    """From uc2_checkpoint_200000.bin the pair classifier (head.0/2/3: 2 x pooler inputs, 2 outputs) is reported
    new, VOLTA init; from a fine-tuned NLVR2 file (TASK12) every key is copied, the head included."""
    plan = V.plan_load(manifest("uc2_volta_pretrained"), shapes(meta_model("marvl")), "marvl")
    assert plan.ok and dict(plan.initialised) == {
        k: "task head, VOLTA init (N(0,0.02) weights, zero bias, LayerNorm 1/0)"
        for k in ("head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias", "head.3.weight", "head.3.bias")
    }
    assert shapes(meta_model("marvl"))["head.0.weight"] == (768, 2 * 768)
    assert "head.0.weight" in plan.report(verbose=True)
    sd = {k: v for k, v in tiny_tensors("uc2_volta_ft_gqa").items() if not k.startswith("clfs_dict.")}
    sd |= nlvr2_head(TINY["pooler_size"], TINY["clf_hidden_size"], torch.Generator().manual_seed(3))
    model = U.build_model("marvl", TINY)
    plan = V.load_into(model, sd)
    assert plan.ok and not plan.initialised and not plan.notes, plan.report()
    ours = model.state_dict()
    for i in ("0", "2", "3"):
        assert torch.equal(ours[f"head.{i}.weight"], sd[f"clfs_dict.TASK12.logit_fc.{i}.weight"])
    # an NLVR2 head is not an XVNLI or GQA head: loading it into those models fails, naming the key
    for other in ("xvnli", "xgqa"):
        bad = V.plan_load({k: tuple(v.shape) for k, v in sd.items()}, shapes(U.build_model(other, TINY)), other)
        with pytest.raises(ValueError, match="clfs_dict|head"):
            bad.raise_if_bad()
