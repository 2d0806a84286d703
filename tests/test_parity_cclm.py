"""CCLM parity with the reference (X2-VLM run with random weights, fixtures/cclm/README.md): every float output within
tests/parity.py's tolerance, integers exact. Fixture folders: $PARITY_FIXTURES (os.pathsep-separated) or every
shipped tests/fixtures/cclm/parity_* set; all dimensions come from each folder's model_config.json."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import train_cclm  # noqa: E402
from formats import x2vlm  # noqa: E402
from parity import assert_matches_reference  # noqa: E402
from scoring import retrieval_protocols  # noqa: E402

HERE = Path(__file__).resolve().parent


def fixture_dirs() -> list[Path]:
    env = os.environ.get("PARITY_FIXTURES")
    # UC2 sets (VOLTA's config file) in the same list are tests/test_parity_uc2.py's; any other folder is ours.
    if not env:
        shipped = sorted(p for p in (HERE / "fixtures" / "cclm").glob("parity_*") if p.is_dir())
        assert shipped, "no tests/fixtures/cclm/parity_* fixture set"
        return shipped
    return [Path(p) for p in env.split(os.pathsep) if p and not (Path(p) / "volta_config.json").is_file()]


# marvl (two-image, X2-VLM's XVLMPlusForMARVL) only where the set has it: sets made before it are not parametrised
CASES = [(d, t) for d in fixture_dirs() for t in ("xvnli", "xflickrco", "xgqa", "preprocess", "relpos")]
CASES += [(d, "marvl") for d in fixture_dirs() if (d / "marvl").is_dir()]


def config_from_fixture(model_config: dict) -> dict:
    """Our config dict from a parity model_config.json (reference config + small HF config files)."""
    ref, dims, text, cross = (
        model_config["reference_config"],
        model_config["dims"],
        model_config["hf_text_config_json"],
        model_config["hf_cross_config_json"],
    )
    v = dims["vision"]
    return {
        **train_cclm.CONFIGS["base"],
        "image_res": v["image_res"],
        "patch_size": v["patch_size"],
        "vision_width": v["width"],
        "vision_depth": v["depth"],
        "vision_heads": v["heads"],
        "vision_mlp_ratio": v["mlp_hidden"] / v["width"],
        "vocab_size": text["vocab_size"],
        "hidden_size": text["hidden_size"],
        "pad_token_id": text["pad_token_id"],
        "text_layers": ref["text_num_hidden_layers"],
        "text_heads": text["num_attention_heads"],
        "text_intermediate": text["intermediate_size"],
        "text_max_positions": text["max_position_embeddings"],
        "text_type_vocab": text["type_vocab_size"],
        "text_ln_eps": text["layer_norm_eps"],
        "cross_layers": ref["cross_num_hidden_layers"],
        "cross_heads": cross["num_attention_heads"],
        "cross_intermediate": cross["intermediate_size"],
        "cross_ln_eps": cross["layer_norm_eps"],
        "dec_layers": ref.get("num_dec_layers", ref["cross_num_hidden_layers"]),
        "dec_max_positions": cross["max_position_embeddings"],
        "dec_type_vocab": cross["type_vocab_size"],
        "embed_dim": ref.get("embed_dim", 256),
        "temp": ref.get("temp", 0.07),
        "k_test": ref.get("k_test", 128),
        "num_labels": ref.get("num_labels", 3),
    }


def load(folder: Path, task: str):
    mc = json.loads((folder / task / "model_config.json").read_text())
    model = train_cclm.build_model(task, config_from_fixture(mc)).eval()
    print(x2vlm.load_checkpoint(model, str(folder / task / "checkpoint.th")))
    inputs = torch.load(folder / task / "inputs.pt", weights_only=True)
    outputs = torch.load(folder / task / "outputs.pt", weights_only=True)
    return model, inputs, outputs


close = assert_matches_reference  # the short name the checks below use


def check_xvnli(folder: Path) -> None:
    model, x, out = load(folder, "xvnli")
    batch = {"images": x["images"], "text_ids": x["text_ids"], "text_atts": x["text_atts"], "label": x["targets"]}
    close("vision_embeds", model.vision_encoder(x["images"]), out["vision_embeds"])
    close("cross_embeds", model.fuse(batch), out["cross_embeds"])
    check_classifier(model, batch, out)


def check_classifier(model, batch: dict, out: dict) -> None:
    """Logits, predictions, loss and the accuracy the reference's evaluate() prints: n_correct / (N + 1)
    (SmoothedValue's dummy first update; we report n_correct / N)."""
    close("logits", model.logits(batch), out["logits"])
    pred = model.predict(batch)
    close("pred", pred, out["pred"])
    close("loss", model.loss(batch), out["loss"])
    n, correct = len(pred), (pred == batch["label"]).sum().item()
    assert abs(correct / (n + 1) - out["accuracy"].item()) < 1e-6
    assert 0 <= correct / n <= 1


def check_marvl(folder: Path) -> None:
    """X2-VLM MARVL.py: images = [all left ; all right]; the cross encoder (text encoder inside) once per half;
    cls_head on [left CLS ; right CLS]; evaluate() prints n_correct / (B + 1) (SmoothedValue's dummy update)."""
    model, x, out = load(folder, "marvl")
    batch = {"images": x["images"], "text_ids": x["text_ids"], "text_atts": x["text_atts"], "label": x["targets"]}
    ids, atts = x["text_ids"], x["text_atts"]
    v = model.vision_encoder(x["images"])
    close("vision_embeds", v, out["vision_embeds"])
    left, right = torch.split(v, len(ids))
    close("cross_embeds_left", model.cross_embeds(left, model.text_encoder(ids, atts), atts), out["cross_embeds_left"])
    close(
        "cross_embeds_right", model.cross_embeds(right, model.text_encoder(ids, atts), atts), out["cross_embeds_right"]
    )
    close("output_cls", model.cls_features(batch), out["output_cls"])
    check_classifier(model, batch, out)


def check_xflickrco(folder: Path) -> None:
    model, x, out = load(folder, "xflickrco")
    close("temp", model.temp.detach(), out["temp"])
    v, image_feat = model.encode_images(x["images"])
    t, text_feat = model.encode_texts(x["text_ids"], x["text_atts"])
    close("vision_embeds", v, out["vision_embeds"])
    close("text_embeds", t, out["text_embeds"])
    close("image_feat", image_feat, out["image_feat"])
    close("text_feat", text_feat, out["text_feat"])
    n_img, n_txt = len(image_feat), len(text_feat)
    logits = torch.stack(
        [model.itm_logits(v[i : i + 1].expand(n_txt, -1, -1), t, x["text_atts"]) for i in range(n_img)]
    )
    close("itm_logits_all_pairs", logits, out["itm_logits_all_pairs"])
    scores = torch.stack(
        [model.itm_scores(v[i : i + 1].expand(n_txt, -1, -1), t, x["text_atts"]) for i in range(n_img)]
    )
    close("itm_score_all_pairs", scores, out["itm_score_all_pairs"])
    ks = [int(m.group(1)) for m in map(re.compile(r"eval_k(\d+)_score_matrix_i2t$").match, out) if m]
    assert ks, "fixture has no eval_k<k>_score_matrix_i2t output"
    close("sims_matrix", image_feat @ text_feat.t(), out["sims_matrix"])
    for k in ks:
        texts = [{"text_ids": x["text_ids"], "text_atts": x["text_atts"]}]
        i2t, t2i = retrieval_protocols.rerank_scores(model, [{"images": x["images"]}], texts, 0, n_img, n_txt, k=k)
        close(f"eval_k{k}_score_matrix_i2t", i2t, out[f"eval_k{k}_score_matrix_i2t"])
        close(f"eval_k{k}_score_matrix_t2i", t2i, out[f"eval_k{k}_score_matrix_t2i"])
    _, tr_img = model.encode_images(x["images"][x["train_image_index"]])
    _, tr_txt = model.encode_texts(x["train_text_ids"], x["train_text_atts"])
    close("train_loss_itc", model.contrastive_loss(tr_img, tr_txt, x["train_idx"]), out["train_loss_itc"])


def check_xgqa(folder: Path) -> None:
    model, x, out = load(folder, "xgqa")
    batch = {"images": x["images"], "text_ids": x["question_ids"], "text_atts": x["question_atts"]}
    close("vision_embeds", model.vision_encoder(x["images"]), out["vision_embeds"])
    states = model.question_states(batch)
    close("question_states", states, out["question_states"])
    k = int(x["k_test"])
    ranked, probs, d = model.rank_answers(
        states, x["question_atts"], x["answer_list_ids"], x["answer_list_atts"], k, details=True
    )
    close("topk_ids", ranked, out["topk_ids"])
    close("topk_probs", probs, out["topk_probs"])
    for name in ("first_token_logits", "prob_first_token_all", "topk_ids_before_rerank", "answer_loss_topk"):
        close(name, d[name], out[name])
    model.config["k_test"] = k
    model.set_answer_list(x["answer_list_ids"], x["answer_list_atts"])
    close("pred_index", model.predict(batch), out["pred_index"])
    model.RANK_SEQUENCES = k  # predict ranks one question at a time: same answers
    close("pred_index (one question per chunk)", model.predict(batch), out["pred_index"])
    n_all = len(x["answer_list_ids"])
    ranked_all, probs_all, d_all = model.rank_answers(
        states, x["question_atts"], x["answer_list_ids"], x["answer_list_atts"], n_all, details=True
    )
    close("kall_topk_ids", ranked_all, out["kall_topk_ids"])
    close("kall_topk_probs", probs_all, out["kall_topk_probs"])
    seq_all = torch.empty_like(out["seq_logprob_all"])
    seq_all.scatter_(1, d_all["topk_ids_before_rerank"], d_all["seq_logprob_topk"])
    close("seq_logprob_all", seq_all, out["seq_logprob_all"])
    train = {
        "images": x["train_images"],
        "text_ids": x["train_question_ids"],
        "text_atts": x["train_question_atts"],
        "answer_ids": x["train_answer_ids"],
        "answer_atts": x["train_answer_atts"],
        "weights": x["train_weights"],
        "k": x["train_k"].tolist(),
    }
    close("train_per_answer_loss", model.per_answer_loss(train), out["train_per_answer_loss"])
    close("train_loss", model.loss(train), out["train_loss"])


def check_preprocess(folder: Path) -> None:
    # data: the eval transform (PIL bicubic resize, ToTensor, CLIP Normalize)
    from PIL import Image

    d = torch.load(folder / "preprocess.pt", weights_only=True)
    res = int(d["image_res"])
    got = torch.stack(
        [data.eval_transform(Image.fromarray(img.numpy(), "RGB"), res) for img in d["raw_images_uint8_hwc"]]
    )
    close("mean", torch.tensor(data.CLIP_MEAN, dtype=torch.float64), d["mean"].double())
    close("std", torch.tensor(data.CLIP_STD, dtype=torch.float64), d["std"].double())
    close("images", got, d["images"])


def check_relpos(folder: Path) -> None:
    d = torch.load(folder / "relpos_resize_224_to_384.pt", weights_only=True)
    got = x2vlm.resize_rel_pos_bias_table(d["src_table_224"], int(d["dst_grid"]), int(d["num_extra_tokens"]))
    close("dst_table_384", got, d["dst_table_384"])


@pytest.mark.parametrize("folder,task", CASES, ids=[f"{d.name}-{t}" for d, t in CASES])
@torch.no_grad()
def test_parity_cclm(folder: Path, task: str) -> None:
    globals()[f"check_{task}"](folder)
