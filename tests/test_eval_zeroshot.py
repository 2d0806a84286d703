"""eval_zeroshot: metrics as IGLUE defines them, retrieval protocols (UC2 all pairs, CCLM k-prefilter),
distributed exactness, [CLS] similarity, figures, tables, the evaluate CLI on the shipped sample, few-shot."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import eval_zeroshot as E  # noqa: E402

FIX = ROOT / "tests" / "fixtures"
UC2_PARITY = FIX / "uc2" / "parity_a"
CCLM_PARITY = FIX / "cclm" / "parity_a"


# ------------------------------------------------------------------ metrics

def test_accuracy_per_type_adds_up_and_oov_counts_wrong():
    rng = random.Random(0)
    n = 257
    labels = [rng.choice([-1, 0, 1, 2, 3]) for _ in range(n)]
    preds = [l if rng.random() < 0.5 and l >= 0 else rng.choice([0, 1, 2, 3]) for l in labels]
    preds[labels.index(-1)] = -1       # even a "-1 prediction" never matches an OOV gold answer
    qtypes = [rng.choice(E.QTYPES) for _ in range(n)]
    m = E.classification_metrics(preds, labels, qtypes)
    correct = sum(p == l and l >= 0 for p, l in zip(preds, labels))
    assert m["n"] == n and m["accuracy"] == pytest.approx(100 * correct / n, abs=1e-12)
    assert sum(m[f"n_{t}"] for t in E.QTYPES) == n
    weighted = sum(m[f"n_{t}"] * m[f"accuracy_{t}"] for t in E.QTYPES) / n
    assert weighted == pytest.approx(m["accuracy"], abs=1e-9)
    assert E.classification_metrics([0, 1], [-1, -1])["accuracy"] == 0.0


def test_recall_at_k_hand_made():
    # 3 images, 4 captions (image 0 has two captions); rows of S = captions, columns = images
    S = torch.tensor([[0.9, 0.1, 0.0],    # cap0 -> img0 rank 0
                      [0.2, 0.8, 0.1],    # cap1 -> img0 rank 1
                      [0.3, 0.1, 0.2],    # cap2 -> img1 rank 2
                      [0.0, 0.5, 0.4]])   # cap3 -> img2 rank 1
    txt2img = [0, 0, 1, 2]
    m = E.recall_metrics(S.t(), S, txt2img)
    tr, ir = E.retrieval_ranks(S.t(), S, txt2img)
    assert ir.tolist() == [0, 1, 2, 1]
    # img0: captions sorted 0.9 (cap0) ...: best caption rank 0; img1: 0.8 cap1, 0.5 cap3, 0.1, 0.1 -> cap2 rank 2
    # (ties at 0.1 resolved in the gold's favour); img2: 0.4 cap3 best -> 0
    assert tr.tolist() == [0, 2, 0]
    assert m["ir_r1"] == pytest.approx(25.0) and m["ir_r5"] == 100.0
    assert m["tr_r1"] == pytest.approx(200 / 3) and m["tr_r10"] == 100.0
    assert m["ir_medr"] == 2.0 and m["ir_meanr"] == pytest.approx(2.0)   # floor(median [0,1,1,2])+1, mean+1
    # unscored (-100) gold entries rank after every scored candidate
    i2t = torch.tensor([[-100.0, 1.0], [2.0, -100.0]])
    t2i = torch.tensor([[-100.0, 3.0], [4.0, -100.0]])
    tr, ir = E.retrieval_ranks(i2t, t2i, [0, 1])
    assert tr.tolist() == [1, 1] and ir.tolist() == [1, 1]


def _uc2_parity_model():
    import train_uc2
    cfg = train_uc2.config_from_volta(json.loads((UC2_PARITY / "volta_config.json").read_text()))
    model = train_uc2.build_model("xflickrco", cfg).eval()
    train_uc2.load_into(model, str(UC2_PARITY / "retrieval" / "pytorch_model.bin"))
    return model


def test_uc2_all_pairs_matches_volta_eval_retrieval():
    """Our batched all-pairs scoring + R@K on the UC2 parity model = IGLUE's eval_retrieval.py output."""
    model = _uc2_parity_model()
    inp = torch.load(UC2_PARITY / "retrieval" / "inputs.pt")
    out = torch.load(UC2_PARITY / "retrieval" / "outputs.pt")
    imgs = {k: inp["eval_images"][k] for k in ("features", "spatials", "image_mask")}
    caps = {k: inp["eval_captions"][k] for k in ("input_ids", "attention_mask")}
    for pair_batch in (1, 4, 1024):   # batching must not matter
        S = E.uc2_score_matrix(model, imgs, caps, pair_batch=pair_batch)
        assert (S - out["eval_score_matrix"]).abs().max() < 1e-5
    ref = json.loads((UC2_PARITY / "retrieval" / "eval_retrieval_metrics.json").read_text())
    tr, ir = E.retrieval_ranks(S.t(), S, [0, 1, 2])
    assert ir.tolist() == ref["ir_ranks_from_matrix"] and tr.tolist() == ref["tr_ranks_from_matrix"]
    m = E.recall_metrics(S.t(), S, [0, 1, 2])
    for side, prefix in (("image_retrieval", "ir"), ("text_retrieval", "tr")):
        for key, val in ref[side].items():
            assert m[f"{prefix}_{key}"] == pytest.approx(val, abs=1e-3), (side, key)


class CountingCCLM(torch.nn.Module):
    """Wraps a CCLM retrieval model, counting rows through each encoder and the ITM head."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, {"images": 0, "texts": 0, "itm": 0}

    def encode_images(self, images):
        self.calls["images"] += images.shape[0]
        return self.model.encode_images(images)

    def encode_texts(self, ids, atts):
        self.calls["texts"] += ids.shape[0]
        return self.model.encode_texts(ids, atts)

    def itm_scores(self, v, t, a):
        self.calls["itm"] += v.shape[0]
        return self.model.itm_scores(v, t, a)


def _cclm_parity_model():
    sys.path.insert(0, str(ROOT / "tests"))
    import test_parity_cclm   # the CCLM owner's fixture loader (config from model_config.json)
    model, inputs, outputs = test_parity_cclm.load(CCLM_PARITY, "xflickrco")
    return model, inputs, outputs


@pytest.mark.parametrize("k", [3, 2])
def test_cclm_prefilter_rerank_matches_reference(k):
    """X2-VLM's xFlickrCO.evaluation on the parity model: same -100/ITM matrices, and each image /
    caption encoded once, the ITM head run exactly k times per query in each direction."""
    model, x, out = _cclm_parity_model()
    counted = CountingCCLM(model).eval()
    imgs = [{"images": x["images"][:2]}, {"images": x["images"][2:]}]
    txts = [{"text_ids": x["text_ids"][i:i + 4], "text_atts": x["text_atts"][i:i + 4]} for i in (0, 4)]
    i2t, t2i = E.cclm_score_matrices(counted, imgs, txts, 0, 3, 6, k=k, itm_batch=5)
    assert (i2t - out[f"eval_k{k}_score_matrix_i2t"]).abs().max() < 1e-5
    assert (t2i - out[f"eval_k{k}_score_matrix_t2i"]).abs().max() < 1e-5
    assert counted.calls == {"images": 3, "texts": 6, "itm": k * (3 + 6)}


# ------------------------------------------------------------------ [CLS] similarity

def test_cls_similarity_identical_inputs_all_ones_and_unpaired_exact():
    g = torch.Generator().manual_seed(0)
    base = {f"q{i}": torch.randn(8, generator=g) for i in range(7)}
    same = E.cls_similarity({l: dict(base) for l in ("en", "de", "bn")})
    assert torch.allclose(torch.tensor(same["matrix"], dtype=torch.float64), torch.ones(3, 3, dtype=torch.float64))
    feats = {l: {i: torch.randn(8, generator=g) for i in base} for l in ("en", "de")}
    feats["de"].pop("q0")
    sim = E.cls_similarity(feats)
    assert sim["langs"] == ["de", "en"] and sim["n_pairs"] == [[6, 6], [6, 7]]
    cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    pairs = [cos(feats["en"][i], feats["de"][i]) for i in feats["de"]]
    assert sim["matrix"][0][1] == sim["matrix"][1][0] == pytest.approx(sum(pairs) / len(pairs))
    allv = [(i, v) for l in feats for i, v in feats[l].items()]
    unpaired = [cos(a, b) for ia, a in allv for ib, b in allv if ia != ib]
    assert sim["unpaired"] == pytest.approx(sum(unpaired) / len(unpaired))


# ------------------------------------------------------------------ the shipped IGLUE sample, tiny real models

TASK_SPLIT = {"xgqa": "dev", "xvnli": "test", "xflickrco": "test"}   # the sample has no xGQA test.json
MT_EXTRA = {  # the sample ships translate-test files for XVNLI only; for the other tasks we add some in
    # IGLUE's layout (machine-translated to English = the English file, same ids)
    "xgqa": [("xGQA/annotations/few_shot/en/dev.json", "xGQA/annotations_machine-translate/few_shot/{}/dev.json")],
    "xflickrco": [("xFlickrCO/annotations/en/test.jsonl", "xFlickrCO/annotations_machine-translate/{}/test_gmt.jsonl")],
}


def _save_run(run: Path, model_name: str, task: str, config: dict, env: dict, seed: int = 0, policy: str = "full") -> Path:
    import engine
    script = __import__(f"train_{model_name}")
    torch.manual_seed(seed)
    model = script.build_model(task, config)
    run.mkdir(parents=True, exist_ok=True)
    meta = {"model": model_name, "task": task, "config": config, "policy": policy,
            "schedule": {"policy": policy, "suf_k": 3}, "tokenizer": env["tokenizer"], "epoch": 1}
    engine.save_checkpoint(run / "model_final.pt", {"model": model.state_dict(), "meta": meta})
    (run / "args.json").write_text(json.dumps({"data_root": env["data_root"], "features": env["features"],
                                               "images": env["images"], "task": task, "policy": policy}))
    return run


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import shutil
    import data
    import train_cclm
    import train_uc2
    tmp = tmp_path_factory.mktemp("sample")
    root = tmp / "iglue"
    shutil.copytree(FIX / "iglue", root)
    ds = root / "datasets"
    for task, pairs in MT_EXTRA.items():
        for src, dst in pairs:
            for lang in ("de", "zh"):
                (ds / dst.format(lang)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ds / src, ds / dst.format(lang))
    keys, files, texts = set(), set(), []
    for task in E.TASKS:
        for split in data.available_splits(root, task):
            for lang in data.available_langs(root, task, split):
                for ex in data.load_split(root, task, split, lang):
                    keys.add(ex.image)
                    files.add(ex.image_file)
                    texts += [ex.text] if lang == "en" else []   # a 1000-id vocabulary cannot hold every script
    features = data.write_synthetic_features(tmp / "features.lmdb", keys, num_boxes=8)
    data.write_synthetic_images(tmp / "images", sorted(files), size=(40, 32))
    _, label2ans = data.load_answer_vocab(root)
    data.make_tiny_tokenizer(texts + label2ans, tmp / "tokenizer", vocab_size=800)
    e = {"data_root": str(root), "features": str(features), "images": str(tmp / "images"),
         "tokenizer": str(tmp / "tokenizer"), "tmp": tmp}
    e["runs"] = {(m, t): _save_run(tmp / "runs" / f"{m}-{t}", m, t, dict(s.CONFIGS["tiny"]), e)
                 for m, s in (("uc2", train_uc2), ("cclm", train_cclm)) for t in E.TASKS}
    return e


def _parse_printed(text: str) -> dict[str, dict[str, float]]:
    """Metric rows of the table `evaluate` prints -> {metric: {lang or avg: value}}."""
    lines = text.splitlines()
    head = next(i for i, l in enumerate(lines) if l.startswith("metric"))
    cols = lines[head].split()[1:]
    out = {}
    for line in lines[head + 1:]:
        parts = line.split()
        if not parts or parts[0] == "n" or parts[0].startswith("avg"):
            break
        out[parts[0]] = dict(zip(cols, map(float, parts[1:])))
    return out


@pytest.mark.parametrize("model_name", ["uc2", "cclm"])
@pytest.mark.parametrize("task", E.TASKS)
def test_evaluate_every_language_and_translate_test(env, model_name, task, capsys):
    import data
    run = env["runs"][(model_name, task)]
    split = TASK_SPLIT[task]
    for mt in (False, True):
        argv = ["--run", str(run), "--split", split, "--num-workers", "0", "--batch-size", "16"]
        assert E.main(argv + (["--translate-test"] if mt else [])) == 0
        printed = _parse_printed(capsys.readouterr().out)
        res = json.loads((run / "results.json").read_text())[split + (".mt" if mt else "")]
        langs = set(data.available_langs(env["data_root"], task, split, translate_test=mt)) | {"en"}
        assert set(res["langs"]) == langs and res["translate_test"] == mt
        if mt:
            assert all("annotations_machine-translate" in res["files"][l] for l in langs - {"en"})
        for metric, row in printed.items():   # the printed table shows exactly results.json's numbers
            for lang, value in row.items():
                want = E.zs_average(res["langs"], metric) if lang == "avg" else res["langs"][lang][metric]
                assert value == pytest.approx(want, abs=0.0051), (metric, lang)
        for m in E.MAIN_METRICS[task]:
            assert res["summary"][m]["avg"] == pytest.approx(E.zs_average(res["langs"], m))
            csv_file = run / E.csv_name(task, m, 0, mt)
            header, row = csv_file.read_text().splitlines()
            assert header.split(",") == ["model"] + E.ordered_langs(res["langs"]) + ["avg"]
            assert float(row.split(",")[-1]) == pytest.approx(E.zs_average(res["langs"], m))
        if task == "xgqa":
            for lm in res["langs"].values():
                assert sum(lm[f"n_{t}"] for t in E.QTYPES) + lm.get("n_other", 0) == lm["n"]
                total = sum(lm[f"n_{t}"] * lm[f"accuracy_{t}"] for t in E.QTYPES if lm[f"n_{t}"])
                assert total / lm["n"] == pytest.approx(lm["accuracy"], abs=1e-9)
    # the translate-test evaluation did not replace the plain one
    assert set(json.loads((run / "results.json").read_text())) == {split, split + ".mt"}
