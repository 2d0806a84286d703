"""eval_zeroshot: metrics as IGLUE defines them, retrieval protocols (UC2 all pairs, CCLM k-prefilter),
distributed exactness, [CLS] similarity, figures, tables, the evaluate CLI on the shipped sample, few-shot."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _timeouts import scaled

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _configs import CCLM_TINY, UC2_TINY  # noqa: E402
from formats import run_folder, torch_files  # noqa: E402
import data  # noqa: E402
from formats import tokenizer_check  # noqa: E402
import eval_zeroshot as E  # noqa: E402
from report import cli as report_cli  # noqa: E402
import report.figures  # noqa: E402
import report.runs  # noqa: E402
import report.tables  # noqa: E402
import scoring.evaluate  # noqa: E402
import scoring.metrics  # noqa: E402
import scoring.results  # noqa: E402
import train_cclm  # noqa: E402
from bench.call_counter import CallCounter  # noqa: E402
from formats import volta  # noqa: E402
from scoring import retrieval_protocols  # noqa: E402
from formats import iglue  # noqa: E402
from formats import iglue_layout  # noqa: E402
from synthetic import fixtures  # noqa: E402
from parity import assert_matches_reference  # noqa: E402

FIX = ROOT / "tests" / "fixtures"
UC2_PARITY = FIX / "uc2" / "parity_a"
CCLM_PARITY = FIX / "cclm" / "parity_a"


# ------------------------------------------------------------------ metrics


def test_accuracy_per_type_adds_up_and_oov_counts_wrong():
    rng = random.Random(0)
    n = 257
    labels = [rng.choice([-1, 0, 1, 2, 3]) for _ in range(n)]
    preds = [l if rng.random() < 0.5 and l >= 0 else rng.choice([0, 1, 2, 3]) for l in labels]
    preds[labels.index(-1)] = -1  # even a "-1 prediction" never matches an OOV gold answer
    qtypes = [rng.choice(scoring.metrics.QTYPES) for _ in range(n)]
    m = scoring.metrics.classification_metrics(preds, labels, qtypes)
    correct = sum(p == l and l >= 0 for p, l in zip(preds, labels))
    assert m["n"] == n and m["accuracy"] == pytest.approx(100 * correct / n, abs=1e-12)
    assert sum(m[f"n_{t}"] for t in scoring.metrics.QTYPES) == n
    weighted = sum(m[f"n_{t}"] * m[f"accuracy_{t}"] for t in scoring.metrics.QTYPES) / n
    assert weighted == pytest.approx(m["accuracy"], abs=1e-9)
    assert scoring.metrics.classification_metrics([0, 1], [-1, -1])["accuracy"] == 0.0


def test_recall_at_k_hand_made():
    # 3 images, 4 captions (image 0 has two captions); rows of S = captions, columns = images
    S = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # cap0 -> img0 rank 0
            [0.2, 0.8, 0.1],  # cap1 -> img0 rank 1
            [0.3, 0.1, 0.2],  # cap2 -> img1 rank 2
            [0.0, 0.5, 0.4],
        ]
    )  # cap3 -> img2 rank 1
    txt2img = [0, 0, 1, 2]
    m = scoring.metrics.recall_metrics(S.t(), S, txt2img)
    tr, ir = scoring.metrics.retrieval_ranks(S.t(), S, txt2img)
    assert ir.tolist() == [0, 1, 2, 1]
    # img0: captions sorted 0.9 (cap0) ...: best caption rank 0; img1: 0.8 cap1, 0.5 cap3, then the tie at 0.1:
    # VOLTA's np.argsort(-s) = [1, 3, 0, 2] puts cap2 4th (rank 3); X2-VLM's argsort(s)[::-1] = [1, 3, 2, 0]: rank 2
    assert tr.tolist() == [0, 3, 0]
    assert scoring.metrics.retrieval_ranks(S.t(), S, txt2img, ties="x2vlm")[0].tolist() == [0, 2, 0]
    assert m["ir_r1"] == pytest.approx(25.0) and m["ir_r5"] == 100.0
    assert m["tr_r1"] == pytest.approx(200 / 3) and m["tr_r10"] == 100.0
    assert m["ir_medr"] == 2.0 and m["ir_meanr"] == pytest.approx(2.0)  # floor(median [0,1,1,2])+1, mean+1
    # unscored (-100) gold entries rank after every scored candidate
    i2t = torch.tensor([[-100.0, 1.0], [2.0, -100.0]])
    t2i = torch.tensor([[-100.0, 3.0], [4.0, -100.0]])
    tr, ir = scoring.metrics.retrieval_ranks(i2t, t2i, [0, 1])
    assert tr.tolist() == [1, 1] and ir.tolist() == [1, 1]


# The references' own scoring, run with numpy's SIMD sort dispatch switched off (the portable introsort the
# references ran on; numpy >= 1.25 orders ties differently per CPU otherwise). VOLTA: eval_retrieval.py's rank
# formulas; X2-VLM: itm_eval's. Reads <dir>/cases.npz, writes <dir>/ranks.json.
_REFERENCE_SCORING = """
import json, sys
import numpy as np
d = sys.argv[1]
cases = np.load(d + "/cases.npz")
out = {"argsort": [np.argsort(cases[k]).tolist() for k in sorted(cases) if k.startswith("sort")]}
for name in sorted(k[4:] for k in cases if k.startswith("t2i_")):
    t2i, i2t, txt2img = cases["t2i_" + name], cases["i2t_" + name], cases["txt2img_" + name]
    score_matrix = t2i.astype(np.float64)            # VOLTA: captions x images, float64
    ir = [int(np.where(np.argsort(-score_matrix[c]) == txt2img[c])[0][0]) for c in range(len(txt2img))]
    tr = [min(int(np.where(np.argsort(-score_matrix[:, i]) == c)[0][0]) for c in np.where(txt2img == i)[0])
          for i in range(score_matrix.shape[1])]
    x_ir = [int(np.where(np.argsort(t2i[c])[::-1] == txt2img[c])[0][0]) for c in range(len(txt2img))]
    x_tr = [min(int(np.where(np.argsort(i2t[i])[::-1] == c)[0][0]) for c in np.where(txt2img == i)[0])
            for i in range(i2t.shape[0])]
    out[name] = {"volta": [tr, ir], "x2vlm": [x_tr, x_ir]}
json.dump(out, open(d + "/ranks.json", "w"))
"""


def _reference_scoring(tmp_path, **cases) -> dict:
    import numpy as np

    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_dispatch__
    np.savez(tmp_path / "cases.npz", **cases)
    env = {**os.environ, "NPY_DISABLE_CPU_FEATURES": " ".join(__cpu_dispatch__)}
    subprocess.run([sys.executable, "-c", _REFERENCE_SCORING, str(tmp_path)], check=True, env=env)
    return json.loads((tmp_path / "ranks.json").read_text())


def test_numpy_argsort_is_numpys_portable_introsort(tmp_path):
    import numpy as np

    rng = np.random.default_rng(3)
    arrays = [
        rng.integers(0, int(rng.integers(1, 40)), size=int(n)).astype(dt)
        for n in rng.integers(1, 700, size=60)
        for dt in (np.float32, np.float64)
    ]
    arrays[5][::7] = np.nan
    arrays += [np.zeros(100), np.arange(300, 0, -1.0), np.tile([2.0, 1.0, 1.0], 90)]
    # McIlroy's adversary against median-of-3 quicksort: drives a partition below the depth limit (heapsort path)
    arrays.append(_median_of_3_killer(1024))
    cases = {f"sort{i:03d}": a for i, a in enumerate(arrays)}
    got = [scoring.metrics.numpy_argsort(cases[k]) for k in sorted(cases)]
    assert got == _reference_scoring(tmp_path, **cases)["argsort"]


def _median_of_3_killer(n: int):
    """Values on which the introsort's quicksort degrades (McIlroy, "A killer adversary for quicksort"): the
    comparisons are answered lazily while scoring.metrics.numpy_argsort runs, freezing values only when needed."""
    import numpy as np

    gas = n
    val = [gas] * n
    nsolid = [0]
    candidate = [0]
    calls = {"heap": 0}

    def less(a, b):
        x, y = a, b
        if val[x] == gas and val[y] == gas:
            if x == candidate[0]:
                val[x] = nsolid[0]
                nsolid[0] += 1
            else:
                val[y] = nsolid[0]
                nsolid[0] += 1
        if val[x] == gas:
            candidate[0] = x
        elif val[y] == gas:
            candidate[0] = y
        return val[x] < val[y]

    real_less, real_heap = scoring.metrics._less, scoring.metrics._heapsort
    idx = list(range(n))

    def heap(v, a, pl, pr):
        calls["heap"] += 1
        return real_heap(v, a, pl, pr)

    scoring.metrics._less, scoring.metrics._heapsort = (lambda p, q: less(int(p), int(q))), heap
    try:
        scoring.metrics.numpy_argsort(idx)
    finally:
        scoring.metrics._less, scoring.metrics._heapsort = real_less, real_heap
    assert calls["heap"] > 0  # the heapsort branch is exercised
    out = np.array(val, dtype=np.float64)
    out[out == gas] = gas  # never compared: the largest
    return out


def _real_retrieval_cases():
    """Synthetic scores over IGLUE's real xFlickrCo test captions (tests/fixtures/iglue): a model that scores the
    caption text gives duplicate captions equal scores; coarse score levels add ties across captions."""
    import numpy as np
    import data

    rng = np.random.default_rng(11)
    cases = {}
    for lang in ("en", "de", "ja"):
        exs = data.load_split(FIX / "iglue", "xflickrco", "test", lang)
        exs = exs + exs[:9]  # repeat captions of 9 images as captions of further images: duplicate texts
        txt2img = np.array([ex.label for ex in exs[:40]] + list(range(40, 49)))
        texts = [ex.text for ex in exs]
        level = {t: rng.integers(0, 4, size=49) for t in dict.fromkeys(texts)}
        t2i = np.stack([level[t] for t in texts]).astype(np.float32)  # [captions, images]
        cases[f"t2i_{lang}"], cases[f"i2t_{lang}"], cases[f"txt2img_{lang}"] = t2i, t2i.T.copy(), txt2img
        pre = t2i.copy()  # CCLM: k=20 prefilter, the rest UNSCORED (-100), scored independently per direction
        i2t = t2i.T.copy() + 0.5
        for m in (pre, i2t):
            cut = np.argsort(-m, axis=1, kind="stable")[:, 20:]
            np.put_along_axis(m, cut, train_cclm.UNSCORED, axis=1)
        cases[f"t2i_{lang}k"], cases[f"i2t_{lang}k"], cases[f"txt2img_{lang}k"] = pre, i2t, txt2img
    return cases


def test_retrieval_ties_are_ranked_as_each_reference_ranks_them(tmp_path):
    import numpy as np

    cases = _real_retrieval_cases()
    ref = _reference_scoring(tmp_path, **cases)
    differ = 0
    for name in sorted(k[4:] for k in cases if k.startswith("t2i_")):
        t2i, i2t = torch.from_numpy(cases["t2i_" + name]), torch.from_numpy(cases["i2t_" + name])
        txt2img = cases["txt2img_" + name].tolist()
        unscored = train_cclm.UNSCORED if name.endswith("k") else None
        # VOLTA has one caption x image matrix (both directions read it); CCLM's prefiltered pair is X2-VLM's only
        for ties in scoring.metrics.TIE_ORDERS if unscored is None else ["x2vlm"]:
            tr, ir = scoring.metrics.retrieval_ranks(i2t, t2i, txt2img, unscored=unscored, ties=ties)
            want_tr, want_ir = ref[name][ties]
            if unscored is None:
                assert tr.tolist() == want_tr and ir.tolist() == want_ir, (name, ties)
            else:  # golds the prefilter dropped rank behind their ties (ours), anywhere among them (X2-VLM)
                gold_ir = t2i[torch.arange(len(txt2img)), torch.tensor(txt2img)]
                kept = gold_ir != train_cclm.UNSCORED
                assert ir[kept].tolist() == np.asarray(want_ir)[kept.numpy()].tolist(), (name, ties)
                gold_tr = i2t[torch.tensor(txt2img), torch.arange(len(txt2img))]
                kept = [
                    i
                    for i in range(len(tr))
                    if all(gold_tr[c] != train_cclm.UNSCORED for c in range(len(txt2img)) if txt2img[c] == i)
                ]
                assert len(kept) > 5 and [tr[i].item() for i in kept] == [want_tr[i] for i in kept], (name, ties)
                m = scoring.metrics.recall_metrics(i2t, t2i, txt2img, unscored=unscored, ties=ties)
                for k in scoring.metrics.RECALL_KS:  # k_test = 20 >= 10: every recall is the reference's
                    assert m[f"ir_r{k}"] == pytest.approx(100 * np.mean(np.asarray(want_ir) < k), abs=1e-9)
                    assert m[f"tr_r{k}"] == pytest.approx(100 * np.mean(np.asarray(want_tr) < k), abs=1e-9)
        differ += ref[name]["volta"] != ref[name]["x2vlm"]
    assert differ  # the two references' tie orders differ on these cases: the choice of order matters


def test_gold_outside_the_top_k_prefilter_is_never_retrieved():
    """CCLM with k_test < 10: a gold the prefilter did not keep must not count for R@5/R@10 by winning
    its ties with the other unscored entries."""
    n, k = 20, 3
    S = torch.full((n, n), train_cclm.UNSCORED)
    for i in range(n):  # the k kept candidates of every caption / image are never its gold
        for j in range(k):
            S[i, (i + 1 + j) % n] = 1.0 + j
    m = scoring.metrics.recall_metrics(S.t(), S, list(range(n)), unscored=train_cclm.UNSCORED)
    assert all(m[f"{side}_r{r}"] == 0.0 for side in ("tr", "ir") for r in scoring.metrics.RECALL_KS)
    tr, ir = scoring.metrics.retrieval_ranks(S.t(), S, list(range(n)), unscored=train_cclm.UNSCORED)
    assert ir.tolist() == [n - 1] * n and tr.tolist() == [n - 1] * n
    S[0, 0] = 5.0  # a kept gold scored above the others: rank 0 as before
    assert scoring.metrics.retrieval_ranks(S.t(), S, list(range(n)), unscored=train_cclm.UNSCORED)[1][0] == 0


def _uc2_parity_model():
    import train_uc2

    cfg = volta.config_from_volta(json.loads((UC2_PARITY / "volta_config.json").read_text()), train_uc2.CONFIGS["base"])
    model = train_uc2.build_model("xflickrco", cfg).eval()
    volta.load_into(model, str(UC2_PARITY / "retrieval" / "pytorch_model.bin"))
    return model


def test_uc2_all_pairs_matches_volta_eval_retrieval():
    """Our batched all-pairs scoring + R@K on the UC2 parity model = IGLUE's eval_retrieval.py output."""
    model = _uc2_parity_model()
    inp = torch.load(UC2_PARITY / "retrieval" / "inputs.pt", weights_only=True)
    out = torch.load(UC2_PARITY / "retrieval" / "outputs.pt", weights_only=True)
    imgs = {k: inp["eval_images"][k] for k in ("features", "spatials", "image_mask")}
    caps = {k: inp["eval_captions"][k] for k in ("input_ids", "attention_mask")}
    for pair_batch in (1, 4, 1024):  # batching must not matter
        S = retrieval_protocols.score_all_pairs(model, imgs, caps, pair_batch=pair_batch)
        assert_matches_reference(f"score matrix (pair_batch {pair_batch})", S, out["eval_score_matrix"])
    ref = json.loads((UC2_PARITY / "retrieval" / "eval_retrieval_metrics.json").read_text())
    tr, ir = scoring.metrics.retrieval_ranks(S.t(), S, [0, 1, 2])
    assert ir.tolist() == ref["ir_ranks_from_matrix"] and tr.tolist() == ref["tr_ranks_from_matrix"]
    m = scoring.metrics.recall_metrics(S.t(), S, [0, 1, 2])
    for side, prefix in (("image_retrieval", "ir"), ("text_retrieval", "tr")):
        for key, val in ref[side].items():
            assert m[f"{prefix}_{key}"] == pytest.approx(val, abs=1e-3), (side, key)


def _cclm_parity_model():
    sys.path.insert(0, str(ROOT / "tests"))
    import test_parity_cclm  # the CCLM owner's fixture loader (config from model_config.json)

    model, inputs, outputs = test_parity_cclm.load(CCLM_PARITY, "xflickrco")
    return model, inputs, outputs


@pytest.mark.parametrize("k", [3, 2, 10])
def test_cclm_prefilter_rerank_matches_reference(k):
    """X2-VLM's xFlickrCO.evaluation on the parity model: same -100/ITM matrices, each image / caption encoded
    once (k = 10 > 3 images / 6 captions: capped at the candidate count, every pair scored), each image's
    cross-attention keys/values computed once for both directions and each distinct pair scored once."""
    model, x, out = _cclm_parity_model()
    counted = CallCounter(model.eval())
    imgs = [{"images": x["images"][:2]}, {"images": x["images"][2:]}]
    txts = [{"text_ids": x["text_ids"][i : i + 4], "text_atts": x["text_atts"][i : i + 4]} for i in (0, 4)]
    i2t, t2i = retrieval_protocols.rerank_scores(model, imgs, txts, 0, 3, 6, k=k, itm_batch=5)
    want_i2t = out[f"eval_k{k}_score_matrix_i2t"] if k < 10 else out["itm_score_all_pairs"]
    want_t2i = out[f"eval_k{k}_score_matrix_t2i"] if k < 10 else out["itm_score_all_pairs"].t()
    assert_matches_reference("i2t", i2t, want_i2t)
    assert_matches_reference("t2i", t2i, want_t2i)
    per_query = min(k, 6) * 3 + min(k, 3) * 6
    distinct = int(((i2t != train_cclm.UNSCORED) | (t2i.t() != train_cclm.UNSCORED)).sum())
    assert distinct < per_query  # the two directions' candidates overlap
    assert counted.rows == {
        "encode_images": 3,
        "encode_texts": 6,
        "itm_scores": 0,
        "pair_scores": 0,
        "encode_embedded": 0,
        "itm_image_kv": 3,
        "itm_scores_with_image_kv": distinct,
    }
    assert counted.calls["itm_image_kv"] == 3  # once per image, both directions together


# ------------------------------------------------------------------ [CLS] similarity


def test_cls_similarity_identical_inputs_all_ones_and_unpaired_exact():
    g = torch.Generator().manual_seed(0)
    base = {f"q{i}": torch.randn(8, generator=g) for i in range(7)}
    same = report.figures.cls_similarity({l: dict(base) for l in ("en", "de", "bn")})
    assert torch.allclose(torch.tensor(same["matrix"], dtype=torch.float64), torch.ones(3, 3, dtype=torch.float64))
    feats = {l: {i: torch.randn(8, generator=g) for i in base} for l in ("en", "de")}
    feats["de"].pop("q0")
    sim = report.figures.cls_similarity(feats)
    assert sim["langs"] == ["de", "en"] and sim["n_pairs"] == [[6, 6], [6, 7]]
    cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    pairs = [cos(feats["en"][i], feats["de"][i]) for i in feats["de"]]
    assert sim["matrix"][0][1] == sim["matrix"][1][0] == pytest.approx(sum(pairs) / len(pairs))
    allv = [(i, v) for l in feats for i, v in feats[l].items()]
    unpaired = [cos(a, b) for ia, a in allv for ib, b in allv if ia != ib]
    assert sim["unpaired"] == pytest.approx(sum(unpaired) / len(unpaired))


# ------------------------------------------------------------------ the shipped IGLUE sample, tiny real models

TASK_SPLIT = {"xgqa": "dev", "xvnli": "test", "xflickrco": "test", "marvl": "test"}  # no xGQA test.json in the sample
MT_EXTRA = {  # the sample ships translate-test files for XVNLI only; for the other tasks we add some in
    # IGLUE's layout (machine-translated to English = the English file, same ids)
    "xgqa": [("xGQA/annotations/few_shot/en/dev.json", "xGQA/annotations_machine-translate/few_shot/{}/dev.json")],
    "xflickrco": [("xFlickrCO/annotations/en/test.jsonl", "xFlickrCO/annotations_machine-translate/{}/test_gmt.jsonl")],
}


def _save_run(
    run: Path, model_name: str, task: str, config: dict, env: dict, seed: int = 0, policy: str = "full"
) -> Path:
    script = __import__(f"train_{model_name}")
    torch.manual_seed(seed)
    model = script.build_model(task, config)
    if model_name == "uc2" and task == "xgqa":  # a random model answers nothing right; make it say "yes"
        import data

        yes = data.load_answer_vocab(env["data_root"])[0]["yes"]
        with torch.no_grad():
            model.head[-1].bias[yes] = 10.0
    run.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": model_name,
        "task": task,
        "config": config,
        "policy": policy,
        "schedule": {"policy": policy, "suf_k": 3},
        "tokenizer": env["tokenizer"],
        "epoch": 1,
    }
    run_folder.save_checkpoint(run / "model_final.pt", {"model": model.state_dict(), "meta": meta})
    (run / "args.json").write_text(
        json.dumps(
            {
                "data_root": env["data_root"],
                "features": env["features"],
                "images": env["images"],
                "max_regions": env["max_regions"],
                "task": task,
                "policy": policy,
            }
        )
    )
    return run


TRIM = {"xgqa": 40, "xvnli": 44, "xflickrco": 20}  # examples kept per test file: sizes not divisible by 3


def _trim_sample(ds: Path) -> None:
    """Keep the first TRIM[task] examples of every dev/test file (all languages, same parallel ids): the
    sample's real files, made small enough for CPU tests on a busy machine."""
    for f in ds.glob("xGQA/annotations*/few_shot/*/dev.json"):
        d = json.loads(f.read_text())
        f.write_text(json.dumps({k: d[k] for k in list(d)[: TRIM["xgqa"]]}))
    for task, pattern in (
        ("xvnli", "XVNLI/annotations*/*/test*.jsonl"),
        ("xflickrco", "xFlickrCO/annotations*/*/test*.jsonl"),
    ):
        for f in ds.glob(pattern):
            f.write_text("".join(f.read_text().splitlines(keepends=True)[: TRIM[task]]))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("sample"))


def make_env(tmp: Path) -> dict:
    """Trimmed copy of the shipped sample (+ translate-test files), synthetic features/images, a tiny
    tokenizer, and one run folder per (model, task) holding a random tiny model (model_final.pt)."""
    import shutil
    import data
    import train_cclm
    import train_uc2

    root = tmp / "iglue"
    shutil.copytree(FIX / "iglue", root)
    ds = root / "datasets"
    for task, pairs in MT_EXTRA.items():
        for src, dst in pairs:
            for lang in ("de", "zh"):
                (ds / dst.format(lang)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ds / src, ds / dst.format(lang))
    _trim_sample(ds)
    keys, files, texts = set(), set(), []
    for task in data.TASKS:
        for split in iglue_layout.available_splits(root, task):
            for lang in iglue_layout.available_langs(root, task, split):
                for ex in data.load_split(root, task, split, lang):
                    keys |= {ex.image, ex.image2} - {""}  # marvl: the right image of the pair too
                    files |= {ex.image_file, ex.image2_file} - {""}
                    texts += [ex.text] if lang == "en" else []  # a 1000-id vocabulary cannot hold every script
    features = fixtures.write_synthetic_features(tmp / "features.lmdb", keys, num_boxes=6)
    fixtures.write_synthetic_images(tmp / "images", sorted(files), size=(40, 32))
    _, label2ans = data.load_answer_vocab(root)
    fixtures.make_tiny_tokenizer(texts + label2ans, tmp / "tokenizer", vocab_size=800)
    e = {
        "data_root": str(root),
        "features": str(features),
        "images": str(tmp / "images"),
        "tokenizer": str(tmp / "tokenizer"),
        "max_regions": 6,
        "tmp": tmp,
    }
    e["runs"] = {
        (m, t): _save_run(tmp / "runs" / f"{m}-{t}", m, t, s.resolve_config(path), e)
        for m, s, path in (("uc2", train_uc2, UC2_TINY), ("cclm", train_cclm, CCLM_TINY))
        for t in data.TASKS
    }
    return e


def _parse_printed(text: str) -> dict[str, dict[str, float]]:
    """Metric rows of the table `evaluate` prints -> {metric: {lang or avg: value}}."""
    lines = text.splitlines()
    head = next(i for i, l in enumerate(lines) if l.startswith("metric"))
    cols = lines[head].split()[1:]
    out = {}
    for line in lines[head + 1 :]:
        parts = line.split()
        if not parts or parts[0] == "n" or parts[0].startswith("avg"):
            break
        out[parts[0]] = dict(zip(cols, map(float, parts[1:])))
    return out


def test_table_falls_back_only_to_epoch_metrics_of_the_same_split(env, tmp_path):
    run = tmp_path / "uc2-xvnli"
    run.mkdir()
    for name in ("args.json", "model_final.pt"):
        shutil.copy(env["runs"][("uc2", "xvnli")] / name, run / name)
    lines = [
        {"type": "eval", "epoch": 1, "step": 3, "lang": "de", "split": "dev", "accuracy": 80.0},
        {"type": "eval", "epoch": 2, "step": 6, "lang": "de", "split": "dev", "accuracy": 90.0},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert report.runs.run_results(run, "test") is None  # dev numbers never stand in for test numbers
    dev = report.runs.run_results(run, "dev")
    assert dev["langs"] == {"de": {"accuracy": 90.0}} and dev["source"] == "metrics.jsonl epoch 2 (dev)"
    with pytest.raises(SystemExit, match="none of the 1 run folder.s. has test results"):
        report_cli.main(["table", str(run)])  # an empty table is not a success
    assert report_cli.main(["table", "--split", "dev", str(run)]) == 0


@pytest.mark.parametrize(
    "command, flag",
    [
        ("similarity", "--translate-test"),
        ("similarity", "--k-test"),
        ("similarity", "--pair-batch"),
        ("similarity", "--itm-batch"),
        ("figures", "--itm-batch"),
        ("fewshot", "--langs"),
    ],
)
def test_commands_offer_no_flag_they_would_ignore(command, flag, capsys):
    parser = E.build_parser() if command == "fewshot" else report_cli.build_parser()
    helps = parser._subparsers._group_actions[0].choices[command].format_help()
    assert flag + " " not in helps and flag + "\n" not in helps
    assert "(default: 64)" in helps  # --batch-size: --help shows defaults


@pytest.mark.parametrize("command", ["table", "figures", "plot", "similarity"])
def test_report_commands_say_where_they_went(command, capsys):
    """The reports moved to `python -m report`: the old command prints one line saying so and exits 2."""
    assert E.main([command, "runs/a b"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"eval_zeroshot.py {command} moved: python -m report {command} 'runs/a b'"
    ]


def test_report_runs_as_a_module_and_the_old_entry_point_exits_2(tmp_path):
    def run(*argv):
        return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)

    help_ = run("-m", "report", "--help")
    assert help_.returncode == 0 and all(c in help_.stdout for c in ("table", "figures", "plot", "similarity"))
    old = run("eval_zeroshot.py", "table", "--per-language", str(tmp_path))
    assert old.returncode == 2
    assert old.stderr.strip() == f"eval_zeroshot.py table moved: python -m report table --per-language {tmp_path}"


def test_partial_and_dev_evaluations_keep_the_test_results(env, tmp_path):
    run = tmp_path / "uc2-xvnli"
    shutil.copytree(env["runs"][("uc2", "xvnli")], run)
    base = ["--run", str(run), "--num-workers", "0", "--batch-size", "16"]
    assert E.main(base + ["--split", "test"]) == 0
    full = json.loads((run / "results.json").read_text())["test"]
    csv = (run / "XVNLI_0.csv").read_text()
    assert len(full["langs"]) > 2
    assert E.main(base + ["--split", "test", "--langs", "ar"]) == 0  # one language again: the others stay
    again = json.loads((run / "results.json").read_text())["test"]
    assert again["langs"] == full["langs"] and again["summary"] == full["summary"]
    assert (run / "XVNLI_0.csv").read_text() == csv
    assert E.main(base + ["--split", "train_48", "--langs", "en"]) == 0  # another split: its own entry and CSV
    assert (run / "XVNLI_0.csv").read_text() == csv and (run / "XVNLI_0.train_48.csv").is_file()
    assert json.loads((run / "results.json").read_text())["test"]["langs"] == full["langs"]
    time.sleep(0.01)
    (run / "model_final.pt").write_bytes((run / "model_final.pt").read_bytes())  # "re-trained": another file
    assert E.main(base + ["--split", "test", "--langs", "ar"]) == 0  # numbers of another checkpoint are not mixed in
    assert set(json.loads((run / "results.json").read_text())["test"]["langs"]) == {"ar"}


@pytest.mark.parametrize("model_name", ["uc2", "cclm"])
@pytest.mark.parametrize("task", sorted(TASK_SPLIT))
def test_evaluate_every_language_and_translate_test(env, model_name, task, capsys):
    import data

    run = env["runs"][(model_name, task)]
    split = TASK_SPLIT[task]
    for mt in (False, True):
        argv = ["--run", str(run), "--split", split, "--num-workers", "0", "--batch-size", "16"]
        assert E.main(argv + (["--translate-test"] if mt else [])) == 0
        printed = _parse_printed(capsys.readouterr().out)
        res = json.loads((run / "results.json").read_text())[split + (".mt" if mt else "")]
        langs = set(iglue_layout.available_langs(env["data_root"], task, split, translate_test=mt)) | {"en"}
        assert set(res["langs"]) == langs and res["translate_test"] == mt
        if mt:
            assert all("annotations_machine-translate" in res["files"][l] for l in langs - {"en"})
        for metric, row in printed.items():  # the printed table shows exactly results.json's numbers
            for lang, value in row.items():
                want = scoring.metrics.zs_average(res["langs"], metric) if lang == "avg" else res["langs"][lang][metric]
                assert value == pytest.approx(want, abs=0.0051), (metric, lang)
        for m in scoring.metrics.MAIN_METRICS[task]:
            assert res["summary"][m]["avg"] == pytest.approx(scoring.metrics.zs_average(res["langs"], m))
            csv_file = run / iglue.csv_name(task, m, 0, mt, split)
            header, row, n_row = (line.split(",") for line in csv_file.read_text().splitlines())
            assert header == ["model"] + iglue.csv_langs(task) + ["avg"]  # IGLUE's columns, whatever was evaluated
            complete = set(iglue.TARGET_LANGS[task]) <= set(res["langs"])
            assert float(row[-1]) == (pytest.approx(scoring.metrics.zs_average(res["langs"], m)) if complete else -1.0)
            for lang, value, n in zip(header[1:-1], row[1:-1], n_row[1:-1]):
                want = res["langs"].get(lang)
                assert float(value) == (pytest.approx(want[m]) if want else -1.0)
                assert int(n) == (iglue.csv_n(task, want, m) if want else -1)
        if task != "xflickrco":  # per-example predictions, as VOLTA's eval_task.py writes them
            rec = {"split": split, "translate_test": mt, "shots": 0}
            names = scoring.results.label_names(model_name, task, env["data_root"])
            for lang in res["langs"]:
                rows = json.loads((run / iglue.predictions_name(rec, lang)).read_text())
                key, value = {"xgqa": ("questionId", "prediction"), "marvl": ("id", "prediction")}.get(
                    task, ("question_id", "answer")
                )
                exs = data.load_split(env["data_root"], task, split, lang, translate_test=mt and lang != "en")
                exs = [ex for ex in exs if model_name == "uc2" or ex.gold != data.XVNLI_NO_GOLD]  # X2-VLM drops "-"
                assert [r[key] for r in rows] == [ex.id for ex in exs]
                assert all(str(r[value]) in names for r in rows)  # marvl: VOLTA's class index 0 / 1
                if task == "marvl":  # VOLTA's VL-binary-classifier rows: the sentence and gold label beside each
                    assert [(r["sentence"], r["label"]) for r in rows] == [(ex.text, ex.label) for ex in exs]
                    score = 100 * sum(r["prediction"] == r["label"] for r in rows) / len(rows)
                    assert score == pytest.approx(res["langs"][lang]["accuracy"], abs=1e-9)
                if task == "xgqa":  # GQA_score.py's rule on its own inputs reproduces our accuracy
                    gold = {ex.id: ex.gold for ex in exs}
                    score = 100 * sum(r["prediction"] == gold[r["questionId"]] for r in rows) / len(rows)
                    assert score == pytest.approx(res["langs"][lang]["accuracy"], abs=1e-9)
        if task == "xgqa":
            for lm in res["langs"].values():
                assert sum(lm[f"n_{t}"] for t in scoring.metrics.QTYPES) + lm.get("n_other", 0) == lm["n"]
                total = sum(lm[f"n_{t}"] * lm[f"accuracy_{t}"] for t in scoring.metrics.QTYPES if lm[f"n_{t}"])
                assert total / lm["n"] == pytest.approx(lm["accuracy"], abs=1e-9)
    # the translate-test evaluation did not replace the plain one
    assert set(json.loads((run / "results.json").read_text())) == {split, split + ".mt"}


def test_xvnli_counts_every_pair_for_uc2_and_drops_unlabelled_pairs_for_cclm(env):
    """IGLUE's UC2 numbers are k / 1,164 (all pairs of a real test file, 14 labelled "-", counted wrong);
    X2-VLM scores the 1,150 labelled ones. The trimmed sample: 44 pairs per language, one labelled "-"."""
    import data

    n_dash = {
        lang: sum(ex.gold == data.XVNLI_NO_GOLD for ex in data.load_split(env["data_root"], "xvnli", "test", lang))
        for lang in ("en", "ar")
    }
    assert n_dash == {"en": 1, "ar": 1}
    for model_name, want in (("uc2", 44), ("cclm", 43)):
        run = env["runs"][(model_name, "xvnli")]
        assert E.main(["--run", str(run), "--langs", "en", "ar", "--num-workers", "0", "--batch-size", "16"]) == 0
        res = json.loads((run / "results.json").read_text())["test"]["langs"]
        assert res["en"]["n"] == res["ar"]["n"] == want
        n_row = (run / "XVNLI_0.csv").read_text().splitlines()[2].split(",")
        assert n_row[:3] == ["n", str(want), str(want)]  # columns en, ar


def test_failed_evaluation_keeps_the_good_result(env, tmp_path, capsys):
    """--checkpoint + --output-dir; a run that fails midway (feature file lacking an image) exits with one
    line naming the key and leaves the earlier results.json and CSV byte for byte."""
    import data

    ckpt = env["runs"][("uc2", "xvnli")] / "model_final.pt"
    out = tmp_path / "eval"
    out.mkdir()
    base = ["--checkpoint", str(ckpt), "--output-dir", str(out), "--langs", "en", "ar", "--num-workers", "0"]
    assert E.main(base) == 0
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    assert set(before) == {"results.json", "XVNLI_0.csv", "test_en_0_result.json", "test_ar_0_result.json"}
    keys = {ex.image for ex in data.load_split(env["data_root"], "xvnli", "test", "en")}
    partial = fixtures.write_synthetic_features(tmp_path / "partial.lmdb", sorted(keys)[:-1], num_boxes=6)
    with pytest.raises(SystemExit, match="not found in"):
        E.main(base + ["--features", str(partial)])
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


# ------------------------------------------------------------------ distributed exactness (torchrun, gloo)

# Languages whose captions the English-trained tiny tokenizer keeps apart: scripts it cannot encode
# become runs of <unk>, i.e. identical captions with exactly tied scores, ranked by float noise.
DIST_RUNS = [
    ("uc2", "xgqa", ["en", "ko"]),
    ("uc2", "xflickrco", ["en"]),
    ("cclm", "xflickrco", ["en", "de"]),
    ("cclm", "xvnli", ["ar"]),
]


def _evaluate_runs(env: dict, dist=None) -> dict:
    """The library path the trainers use: load, build the sets, evaluate_task; plus Figure 4 features."""

    out = {}
    for model_name, task, langs in DIST_RUNS:
        model, meta = E.load_model(env["runs"][(model_name, task)] / "model_final.pt")
        tok = tokenizer_check.load_tokenizer(env["tokenizer"])
        model.prepare_task(env["data_root"], tok)
        sets = scoring.evaluate.build_eval_sets(
            model_name,
            task,
            env["data_root"],
            tok,
            langs,
            TASK_SPLIT[task],
            features=env["features"],
            images=env["images"],
            max_regions=env["max_regions"],
            image_res=meta["config"].get("image_res", 384),
        )
        out[f"{model_name}-{task}"] = scoring.evaluate.evaluate_task(model, task, sets, dist, batch_size=5, k_test=7)
        if task == "xgqa":
            sets = scoring.evaluate.build_eval_sets(
                model_name,
                task,
                env["data_root"],
                tok,
                ["en", "de", "zh"],
                "dev",
                True,
                features=env["features"],
                max_regions=env["max_regions"],
            )
            out["similarity"] = report.figures.similarity_for(model, sets, dist, batch_size=5)
    return out


def _dist_worker(spec_file: str, out_file: str) -> None:
    import engine

    spec = json.loads(Path(spec_file).read_text())
    spec["runs"] = {tuple(k.split("|")): Path(v) for k, v in spec["runs"].items()}
    dist = engine.setup_distributed()
    res = _evaluate_runs(spec, dist)
    if dist.is_main:
        Path(out_file).write_text(json.dumps(res))
    engine.cleanup_distributed()


@pytest.mark.system
def test_three_process_gloo_evaluation_equals_single_process(env, tmp_path):
    """Uneven shards (40, 20, 44 examples over 3 ranks), classification, both retrieval protocols and the
    [CLS] features: torchrun -np 3 on gloo gives exactly the single-process numbers."""
    spec = {k: v for k, v in env.items() if k not in ("runs", "tmp")}
    spec["runs"] = {"|".join(k): str(v) for k, v in env["runs"].items()}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "3",
        __file__,
        "--dist-worker",
        str(tmp_path / "spec.json"),
        str(tmp_path / "out.json"),
    ]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=scaled(300),
        env={**os.environ, "SUF_DEVICE": "cpu", "OMP_NUM_THREADS": "1", "SUF_DIST_TIMEOUT": str(scaled(240))},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    multi = json.loads((tmp_path / "out.json").read_text())
    single = json.loads(json.dumps(_evaluate_runs(env)))
    for key in single:  # metrics exactly equal
        if key != "similarity":
            assert multi[key] == single[key], key
    # similarities are float means of features computed in other batches: equal to rounding
    assert torch.allclose(
        torch.tensor(multi["similarity"]["matrix"]), torch.tensor(single["similarity"]["matrix"]), atol=1e-9
    )
    assert multi["similarity"]["unpaired"] == pytest.approx(single["similarity"]["unpaired"], abs=1e-9)
    sim = single["similarity"]  # de/zh translate-test files = the English file: identical inputs
    assert sim["langs"] == ["de", "en", "zh"]
    assert torch.allclose(
        torch.tensor(sim["matrix"], dtype=torch.float64), torch.ones(3, 3, dtype=torch.float64), atol=1e-6
    )


def test_similarity_cli_writes_json_and_heatmap(env, capsys):
    run = env["runs"][("uc2", "xvnli")]
    assert report_cli.main(["similarity", "--run", str(run), "--num-workers", "0", "--batch-size", "16"]) == 0
    sim = json.loads((run / "fig4_cls_similarity.json").read_text())
    assert sim["langs"] == ["ar", "en", "es", "fr", "ru"] and (run / "fig4_cls_similarity.png").stat().st_size > 0
    assert all(abs(sim["matrix"][i][i] - 1) < 1e-6 for i in range(5)) and -1 <= sim["unpaired"] <= 1
    assert sim["n_pairs"][0][1] == TRIM["xvnli"]


# ------------------------------------------------------------------ figures 2/3 and tables from run folders


def _fake_run(
    folder: Path, model: str, task: str, policy: str, langs: list[str], epochs: int, seed: int, **extra
) -> Path:
    """A run folder as engine.train leaves it: args.json + metrics.jsonl (one eval line per epoch and language)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    (folder / "args.json").write_text(json.dumps({"task": task, "policy": policy, "model": model, **extra}))
    lines = [json.dumps({"type": "train", "epoch": 1, "step": 3, "loss": 1.0})]
    for e in range(1, epochs + 1):
        for lang in langs:
            if task == "xflickrco":
                m = {f"{d}_r{k}": rng.uniform(0, 100) for d in ("tr", "ir") for k in (1, 5, 10)}
            else:
                counts = {t: rng.randint(1, 30) for t in scoring.metrics.QTYPES}
                correct = {t: rng.randint(0, counts[t]) for t in scoring.metrics.QTYPES}
                n = sum(counts.values())
                m = {"accuracy": 100 * sum(correct.values()) / n, "n": n}
                if task == "xgqa":
                    m.update({f"accuracy_{t}": 100 * correct[t] / counts[t] for t in scoring.metrics.QTYPES})
                    m.update({f"n_{t}": counts[t] for t in scoring.metrics.QTYPES})
            lines.append(json.dumps({"type": "eval", "epoch": e, "step": 3 * e, "lang": lang, "split": "test", **m}))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


XGQA_LANGS = ["en", "bn", "de", "id", "ko", "pt", "ru", "zh"]


def test_plots_written_with_their_numbers(tmp_path, capsys):
    full = _fake_run(tmp_path / "cclm-xgqa-full", "cclm", "xgqa", "full", XGQA_LANGS, 5, 1)
    suf = _fake_run(tmp_path / "cclm-xgqa-suf", "cclm", "xgqa", "suf", XGQA_LANGS, 5, 2)
    ret = _fake_run(tmp_path / "uc2-xflickrco-suf", "uc2", "xflickrco", "suf", ["en", "de", "ja"], 3, 3)
    assert report_cli.main(["plot", str(full), str(suf), "--out", str(tmp_path / "fig")]) == 0
    for name in ("fig2_per_language", "fig3_per_qtype"):
        assert (tmp_path / "fig" / f"{name}.png").stat().st_size > 0
    numbers = json.loads((tmp_path / "fig" / "fig2_per_language.json").read_text())
    logged = E.read_epoch_metrics(suf)
    assert numbers[str(suf)]["series"]["accuracy"]["ko"] == [ev["ko"]["accuracy"] for _, ev in logged]
    assert numbers[str(suf)]["series"]["accuracy"]["avg"][-1] == pytest.approx(
        scoring.metrics.zs_average(logged[-1][1], "accuracy")
    )
    rows = (tmp_path / "fig" / "fig3_per_qtype.csv").read_text().splitlines()
    assert (
        rows[0] == "run,epoch,lang,metric,value" and len(rows) == 1 + 2 * 5 * 5 * 9
    )  # runs x types x epochs x (8 langs + avg)
    assert report_cli.main(["plot", str(ret)]) == 0  # retrieval: TR and IR rows, no question types
    assert (ret / "fig2_per_language.png").is_file() and not (ret / "fig3_per_qtype.png").exists()


def test_figures_skip_and_name_runs_without_evaluations(tmp_path, capsys):
    """`make figures` over OUT/*/: a --no-eval run (metrics.jsonl with training lines only) is named and skipped,
    the other runs still get their curves; `plot` of such runs alone is an error naming why."""
    evaluated = _fake_run(tmp_path / "uc2-xgqa-suf", "uc2", "xgqa", "suf", XGQA_LANGS, 2, 1)
    no_eval = _fake_run(tmp_path / "uc2-xgqa-full", "uc2", "xgqa", "full", XGQA_LANGS, 0, 2)
    assert report_cli.main(["figures", str(evaluated), str(no_eval), "--out", str(tmp_path / "fig")]) == 0
    err = capsys.readouterr().err
    assert f"note: {no_eval} has no evaluation in its metrics.jsonl (--no-eval?): no curves" in err
    assert str(evaluated) not in err.replace(f"Figure 4 skipped for {evaluated}", "")
    numbers = json.loads((tmp_path / "fig" / "fig2_per_language.json").read_text())
    assert list(numbers) == [str(evaluated)]
    assert report_cli.main(["figures", str(no_eval)]) == 0 and "no Figures 2-3" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="none of the folders given has per-epoch evaluations"):
        report_cli.main(["plot", str(no_eval)])


def test_real_training_run_curves_evaluation_and_table(env, tmp_path, capsys):
    """A real (tiny) SUF run of train_uc2.py logs per-epoch evaluations through evaluate-style metrics;
    plot turns them into Figures 2/3, evaluate + table read the same run folder."""
    import train_uc2

    run = tmp_path / "uc2-xgqa-suf"
    train_uc2.main(
        [
            "--task",
            "xgqa",
            "--policy",
            "suf",
            "--model-config",
            UC2_TINY,
            "--data-root",
            env["data_root"],
            "--features",
            env["features"],
            "--max-regions",
            str(env["max_regions"]),
            "--tokenizer",
            env["tokenizer"],
            "--train-split",
            "train_5",
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--max-steps-per-epoch",
            "1",
            "--eval-split",
            "dev",
            "--langs",
            "en,de,ko",
            "--output-dir",
            str(run),
            "--num-workers",
            "0",
            "--eval-every",
            "1",
        ]
    )
    logged = E.read_epoch_metrics(run)
    assert [e for e, _ in logged] == [1, 2] and set(logged[0][1]) == {"en", "de", "ko"}
    assert report_cli.main(["plot", str(run)]) == 0
    fig3 = json.loads((run / "fig3_per_qtype.json").read_text())[str(run)]
    assert fig3["series"]["accuracy_verify"]["de"] == [ev["de"]["accuracy_verify"] for _, ev in logged]
    assert (run / "fig2_per_language.png").is_file() and (run / "fig3_per_qtype.png").is_file()
    # `make eval RUN=`: no --split or --langs: the run's own (--eval-split dev, --langs en,de,ko from its args.json)
    assert E.main(["--run", str(run), "--num-workers", "0"]) == 0
    res = json.loads((run / "results.json").read_text())["dev"]
    assert res["policy"] == "suf" and res["epoch"] == 2 and set(res["langs"]) == {"en", "de", "ko"}
    for lang in ("en", "de", "ko"):  # the final checkpoint's evaluation = the trainer's last-epoch one
        assert res["langs"][lang]["accuracy"] == pytest.approx(logged[-1][1][lang]["accuracy"])
    t = report.tables.build_tables([run], split="dev")
    assert t["table1"][0]["setup"] == "UC2+SUF" and t["table1"][0]["cells"]["xgqa:accuracy"]["paper_avg"] == 41.3


def test_table_layout_with_paper_numbers(tmp_path, capsys):
    runs = [
        _fake_run(tmp_path / f"{m}-{t}-{p}", m, t, p, langs, 2, i)
        for i, (m, t, p, langs) in enumerate(
            [
                ("uc2", "xgqa", "full", XGQA_LANGS),
                ("uc2", "xgqa", "suf", XGQA_LANGS),
                ("cclm", "xvnli", "suf", ["en", "ar", "es", "fr", "ru"]),
                ("cclm", "xgqa", "top", XGQA_LANGS),
                ("cclm", "xflickrco", "full", ["en", "de", "es"]),
            ]
        )
    ]
    runs[3].joinpath("args.json").write_text(
        json.dumps({"task": "xgqa", "policy": "top", "model": "cclm", "top_layers": 6})
    )
    # a few-shot run (results.json as `fewshot` writes it) after UC2 + SUF
    fs = tmp_path / "uc2-xgqa-suf-fewshot48-de"
    fs.mkdir()
    (fs / "results.json").write_text(
        json.dumps(
            {
                "test": {
                    "model": "uc2",
                    "task": "xgqa",
                    "policy": "full",
                    "shots": "48",
                    "fewshot_lang": "de",
                    "init_policy": "suf",
                    "split": "test",
                    "translate_test": False,
                    "langs": {"de": {"accuracy": 47.0, "n": 10}},
                }
            }
        )
    )
    assert (
        report_cli.main(["table", *map(str, runs), str(fs), "--per-language", "--out", str(tmp_path / "t.json")]) == 0
    )
    out = capsys.readouterr().out
    t = json.loads((tmp_path / "t.json").read_text())
    row = {r["setup"]: r for r in t["table1"]}
    last = E.read_epoch_metrics(runs[1])[-1][1]
    cell = row["UC2+SUF"]["cells"]["xgqa:accuracy"]
    assert cell["avg"] == pytest.approx(scoring.metrics.zs_average(last, "accuracy")) and cell["paper_avg"] == 41.3
    assert row["CCLM"]["cells"]["xflickrco:ir_r1"]["paper_en"] == 78.0
    assert f"{cell['avg']:.1f} (41.3)" in out and "UC2+SUF" in out
    assert {r["setup"]: r["paper_avg"] for r in t["table2"]} == {"CCLM+top6": 49.7}
    t3 = {r["setup"]: r for r in t["table3"]}
    assert (
        t3["SUF"]["few_shot"] == 47.0 and t3["SUF"]["few_shot_langs"] == ["de"] and t3["SUF"]["paper_few_shot"] == 46.7
    )
    assert "Per language (xgqa:accuracy)" in out


def test_iglue_csv_keeps_iglues_columns_and_writes_minus_one_for_missing_languages():
    """IGLUE's results/get_<task>_zero.py: columns model,en,<LANGS>,avg; a language without a result is -1.0."""
    per_lang = {"en": {"accuracy": 60.0, "n": 1164}, "de": {"accuracy": 40.0, "n": 1164}}
    header, row, n_row = (line.split(",") for line in iglue.iglue_csv("xgqa", per_lang, "m", "accuracy").splitlines())
    assert header == ["model", "en", "bn", "de", "id", "ko", "pt", "ru", "zh", "avg"]  # get_xgqa_zero.py's LANGS
    assert row == ["m", "60.0", "-1.0", "40.0", "-1.0", "-1.0", "-1.0", "-1.0", "-1.0", "-1.0"]
    assert n_row == ["n", "1164", "-1", "1164", "-1", "-1", "-1", "-1", "-1", ""]
    full = {
        l: {"tr_r1": float(i), "ir_r1": 0.0, "n_images": 2000 - (l == "de"), "n_captions": 2000}
        for i, l in enumerate(iglue.csv_langs("xflickrco"))
    }
    header, row, n_row = (line.split(",") for line in iglue.iglue_csv("xflickrco", full, "m", "tr_r1").splitlines())
    assert header[1:-1] == ["en", "de", "es", "id", "ja", "ru", "tr", "zh"]  # get_xflickrco_zero.py's
    assert float(row[-1]) == pytest.approx(sum(range(1, 8)) / 7) and n_row[2] == "1999"
    few = iglue.iglue_csv("xvnli", {"fr": {"accuracy": 50.0, "n": 1164}}, "m", "accuracy", shots="48").splitlines()
    assert few[0] == "model,ar,es,fr,ru,avg" and few[1] == "m,-1.0,-1.0,50.0,-1.0,-1.0"  # get_xvnli_few.py's


def test_fewshot_runs_of_one_english_run_merge_into_one_iglue_row(tmp_path):
    runs = []
    for i, (init, lang, acc) in enumerate(
        [("uc2-xgqa-suf", "de", 47.0), ("uc2-xgqa-suf", "ko", 41.0), ("uc2-xgqa-full", "de", 45.0)]
    ):
        fs = tmp_path / f"{init}-fewshot48-{lang}"
        fs.mkdir()
        (fs / "fewshot.json").write_text(json.dumps({"init_checkpoint": str(tmp_path / init / "model_final.pt")}))
        (fs / "results.json").write_text(
            json.dumps(
                {
                    "test": {
                        "model": "uc2",
                        "task": "xgqa",
                        "policy": "full",
                        "shots": "48",
                        "fewshot_lang": lang,
                        "init_policy": init.split("-")[-1],
                        "split": "test",
                        "translate_test": False,
                        "langs": {lang: {"accuracy": acc, "n": 9666}},
                    }
                }
            )
        )
        runs.append(fs)
    zs = _fake_run(tmp_path / "uc2-xgqa-suf", "uc2", "xgqa", "suf", XGQA_LANGS, 2, 0)
    assert report_cli.main(["table", *map(str, runs + [zs]), "--iglue-csv", str(tmp_path / "csv")]) == 0
    lines = (tmp_path / "csv" / "xGQA_48.csv").read_text().splitlines()
    assert lines[0] == "model,bn,de,id,ko,pt,ru,zh,avg"
    assert lines[1] == "uc2-xgqa-suf,-1.0,47.0,-1.0,41.0,-1.0,-1.0,-1.0,-1.0"
    assert lines[2] == "n,-1,9666,-1,9666,-1,-1,-1,"
    assert lines[3] == "uc2-xgqa-full,-1.0,45.0,-1.0,-1.0,-1.0,-1.0,-1.0,-1.0" and len(lines) == 5
    zero = (tmp_path / "csv" / "xGQA_0.csv").read_text().splitlines()
    last = E.read_epoch_metrics(zs)[-1][1]
    assert zero[0].startswith("model,en,bn") and zero[1].split(",")[0] == "uc2-xgqa-suf"
    assert float(zero[1].split(",")[-1]) == pytest.approx(scoring.metrics.zs_average(last, "accuracy"))


def test_cclm_answer_candidates_in_x2vlms_order_predictions_are_label_ids(env):
    """X2-VLM's xgqa_dataset ranks list(json.load(trainval_ans2label.json).keys()); the key order (not the
    label2ans order) decides which candidates survive first-token ties at the top-k prune."""
    import data
    import train_cclm

    model = train_cclm.build_model("xgqa", train_cclm.resolve_config(CCLM_TINY))
    tok = tokenizer_check.load_tokenizer(env["tokenizer"])
    model.prepare_task(env["data_root"], tok)
    ans2label, label2ans = data.load_answer_vocab(env["data_root"])
    keys = json.loads((Path(env["data_root"]) / "datasets/gqa/annotations/trainval_ans2label.json").read_text())
    assert list(keys) != label2ans  # the two orders differ in the real files
    want_ids, _ = data.encode_texts(tok, list(keys), None)
    assert torch.equal(model.answer_ids, want_ids)
    assert model.answer_labels.tolist() == [ans2label[a] for a in keys]

    def first_candidate(states, atts, ids, att, k):  # rank position 0 of the list first for every question
        n = states.shape[0]
        return torch.zeros(n, k, dtype=torch.long), torch.eye(k)[0].repeat(n, 1)

    model.rank_answers = first_candidate
    batch = {
        "images": torch.zeros(2, 3, 32, 32),
        "text_ids": torch.tensor([[0, 5, 2], [0, 6, 2]]),
        "text_atts": torch.ones(2, 3, dtype=torch.long),
    }
    model.question_states = lambda b: torch.zeros(2, 3, model.config["hidden_size"])
    assert model.predict(batch).tolist() == [ans2label[next(iter(keys))]] * 2


# ------------------------------------------------------------------ few-shot (Table 3)


def test_fewshot_from_english_checkpoint(env, tmp_path, capsys):
    """Standard fine-tuning of the English run on German's IGLUE few-shot split, checkpoint selected on
    German dev, German results reported the usual way (results.json, IGLUE CSV, Table 3)."""

    init = env["runs"][("uc2", "xgqa")]
    out = tmp_path / "uc2-xgqa-full-fewshot5-de"
    argv = [
        "fewshot",
        "--run",
        str(init),
        "--lang",
        "de",
        "--shots",
        "5",
        "--output-dir",
        str(out),
        "--lrs",
        "1e-3",
        "--epochs",
        "2",
        "--fs-batch-size",
        "4",
        "--split",
        "dev",
        "--num-workers",
        "0",
        "--trainer-args",
        "--max-steps-per-epoch",
        "2",
        "--num-workers",
        "0",
        "--eval-batch-size",
        "16",
    ]
    assert E.main(argv) == 0
    info = json.loads((out / "fewshot.json").read_text())
    assert info["selection"] == {"split": "dev", "lang": "de", "metric": "accuracy"} and info["init_policy"] == "full"
    best = info["best"]
    assert Path(best["checkpoint"]).name == "model_best.pt" and best["epoch"] in (1, 2)
    logged = {e: ev["de"]["accuracy"] for e, ev in E.read_epoch_metrics(out / "lr0.001")}
    assert best["score"] == max(logged.values()) == logged[best["epoch"]]
    res = json.loads((out / "results.json").read_text())["dev"]
    assert set(res["langs"]) == {"de"} and res["shots"] == "5" and res["fewshot_lang"] == "de"
    assert res["langs"]["de"]["accuracy"] == pytest.approx(best["score"])  # selected on the same split here
    assert (out / "xGQA_5.dev.csv").is_file() and not (out / "xGQA_5.csv").exists()  # dev numbers, named so
    trained = torch_files.load_checkpoint(best["checkpoint"])["model"]
    start = torch_files.load_checkpoint(init / "model_final.pt")["model"]
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # it did train
    t3 = {r["setup"]: r for r in report.tables.build_tables([init, out], split="dev")["table3"]}
    assert t3["Standard"]["few_shot_langs"] == ["de"]


@pytest.mark.system
def test_fewshot_under_torchrun_matches_one_process(env, tmp_path):
    """`eval_zeroshot.py fewshot` under torchrun (2 gloo ranks): the trainings and the evaluation run in the one
    process group fewshot sets up (the trainer's main(dist=...) leaves it open); the result equals the one-process
    run's."""

    init = env["runs"][("uc2", "xgqa")]
    args = [
        "--run-dir",
        str(init),
        "--lang",
        "de",  # --run-dir: torchrun takes a bare --run for its --run-path
        "--shots",
        "5",
        "--lrs",
        "1e-3",
        "--epochs",
        "2",
        "--fs-batch-size",
        "4",
        "--split",
        "dev",
        "--num-workers",
        "0",
        "--trainer-args",
        "--max-steps-per-epoch",
        "2",
        "--num-workers",
        "0",
        "--eval-batch-size",
        "16",
        "--dropout",
        "0",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    assert E.main(["fewshot", *args[:10], "--output-dir", str(one), *args[10:]]) == 0
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(ROOT / "eval_zeroshot.py"),
            "fewshot",
            *args[:10],
            "--output-dir",
            str(two),
            *args[10:],
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=scaled(300),
        env={**os.environ, "SUF_DEVICE": "cpu", "OMP_NUM_THREADS": "1", "SUF_DIST_TIMEOUT": str(scaled(240))},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (json.loads((d / "fewshot.json").read_text()) for d in (one, two))
    assert [t["epoch"] for t in a["trials"]] == [t["epoch"] for t in b["trials"]]
    assert [t["score"] for t in a["trials"]] == pytest.approx([t["score"] for t in b["trials"]])
    wa, wb = (torch_files.load_checkpoint(x["best"]["checkpoint"])["model"] for x in (a, b))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-5, msg=k)
    ra, rb = (json.loads((d / "results.json").read_text())["dev"]["langs"] for d in (one, two))
    assert ra.keys() == rb.keys() == {"de"} and ra["de"]["accuracy"] == pytest.approx(rb["de"]["accuracy"])


if __name__ == "__main__" and sys.argv[1:2] == ["--dist-worker"]:
    _dist_worker(sys.argv[2], sys.argv[3])


def test_cclm_retrieval_encodes_shared_test_images_once_across_languages(env):
    """xFlickrCo's languages caption the same images: the second language reuses the first's image encodings
    and gets the numbers it gets when evaluated alone."""

    model, meta = E.load_model(env["runs"][("cclm", "xflickrco")] / "model_final.pt")
    tok = tokenizer_check.load_tokenizer(env["tokenizer"])
    model.prepare_task(env["data_root"], tok)
    sets = scoring.evaluate.build_eval_sets(
        "cclm",
        "xflickrco",
        env["data_root"],
        tok,
        ["en", "de"],
        "test",
        images=env["images"],
        image_res=meta["config"]["image_res"],
    )
    assert [e.image for e in sets["en"].images.items] == [e.image for e in sets["de"].images.items]
    counted = CallCounter(model.eval())
    both = scoring.evaluate.evaluate_task(model, "xflickrco", sets, batch_size=5, k_test=7)
    assert counted.rows["encode_images"] == len(sets["en"].images)  # once, not once per language
    alone = scoring.evaluate.evaluate_task(model, "xflickrco", {"de": sets["de"]}, batch_size=5, k_test=7)
    assert both["de"] == alone["de"]


def test_an_evaluation_with_k_test_below_10_gets_the_reports_k_test_footnote(env, tmp_path, capsys):
    """evaluate records --k-test in results.json, where the report's k_test < 10 footnote reads it: present for
    --k-test 5, absent for the default (the model config's 128)."""
    notes = {}
    for name, extra in (("k5", ["--k-test", "5"]), ("default", [])):
        run = tmp_path / name
        shutil.copytree(env["runs"][("cclm", "xflickrco")], run)
        argv = ["--run", str(run), "--split", "test", "--langs", "en", "--num-workers", "0", "--batch-size", "16"]
        assert E.main(argv + extra) == 0
        capsys.readouterr()
        assert json.loads((run / "results.json").read_text())["test"]["k_test"] == (5 if extra else None)
        notes[name] = [n for n in report.tables.build_tables([run])["footnotes"] if "k_test" in n]
    assert len(notes["k5"]) == 1 and "with k_test 5 < 10" in notes["k5"][0]
    assert notes["default"] == []


def test_released_uc2_checkpoint_evaluates_without_our_meta(env, tmp_path):
    """`make sanity`'s path: IGLUE's VOLTA-format fine-tuned UC2 xGQA file (here at tiny widths) is evaluated
    as it is; results.json records policy "released"."""
    sys.path.insert(0, str(ROOT / "tests"))
    import test_ckpt_uc2

    ckpt = tmp_path / "pytorch_model_best.bin"
    torch.save(test_ckpt_uc2.tiny_tensors("uc2_volta_ft_gqa"), ckpt)
    args = [
        "evaluate",
        "--checkpoint",
        str(ckpt),
        "--released-task",
        "xgqa",
        "--released-config",
        UC2_TINY,
        "--data-root",
        env["data_root"],
        "--features",
        env["features"],
        "--max-regions",
        str(env["max_regions"]),
        "--tokenizer",
        env["tokenizer"],
        "--split",
        "dev",
        "--langs",
        "en",
        "--num-workers",
        "0",
    ]
    assert E.main(args) == 0
    record = json.loads((tmp_path / "results.json").read_text())["dev"]
    assert record["policy"] == "released" and record["model"] == "uc2" and 0 <= record["langs"]["en"]["accuracy"] <= 100
    with pytest.raises(SystemExit, match=r"unexpected key 'clfs_dict.TASK15.* fine-tuned UC2 xvnli checkpoint\?\)$"):
        E.main([*args[:4], "xvnli", *args[5:]])


def test_trainer_per_epoch_evaluation_takes_eval_langs(env):
    """The trainers' evaluate_fn evaluates only the languages engine.train asks for (--eval-langs) and
    refuses, before training, a language outside --langs."""
    import argparse

    model, _ = E.load_model(env["runs"][("uc2", "xvnli")] / "model_final.pt")
    tok = tokenizer_check.load_tokenizer(env["tokenizer"])
    args = argparse.Namespace(
        task="xvnli",
        data_root=env["data_root"],
        langs=["en", "ar"],
        eval_split="test",
        eval_langs=["ar"],
        eval_batch_size=16,
        num_workers=0,
    )
    fn = scoring.evaluate.trainer_evaluate_fn(
        "uc2", args, tok, None, features=env["features"], max_regions=env["max_regions"]
    )
    assert list(fn(model, 1, langs=["ar"])) == ["ar"]
    assert list(fn(model, 1)) == ["en", "ar"]
    args.eval_langs = ["ko"]
    with pytest.raises(ValueError, match="--eval-langs ko: not among the evaluated languages"):
        scoring.evaluate.trainer_evaluate_fn(
            "uc2", args, tok, None, features=env["features"], max_regions=env["max_regions"]
        )


def test_table_without_the_papers_numbers_prints_ours_alone(tmp_path, capsys):
    """`report table --no-paper` (the demo's synthetic runs): no paper number in parentheses beside ours, in Table 1
    and the per-language tables; the default keeps them."""
    runs = [
        _fake_run(tmp_path / f"uc2-xgqa-{p}", "uc2", "xgqa", p, XGQA_LANGS, 2, i) for i, p in enumerate(("full", "suf"))
    ]
    assert report_cli.main(["table", *map(str, runs), "--per-language", "--no-paper"]) == 0
    bare = capsys.readouterr().out
    assert "Table 1: ours. " in bare and "Per language (xgqa:accuracy), ours:" in bare
    assert "(paper)" not in bare and "(41.3)" not in bare and "(31.9)" not in bare
    assert report_cli.main(["table", *map(str, runs), "--per-language"]) == 0
    full = capsys.readouterr().out
    assert "Table 1: ours (paper)." in full and "(41.3)" in full


# ---------------------------------------------------------------- MaRVL results in IGLUE's layout


def test_marvl_results_are_written_in_iglue_layout(tmp_path):
    """IGLUE's results/get_marvl_zero.py columns (model,en,id,sw,ta,tr,zh,avg: MaRVL_0.csv, MaRVL_0.mt.csv for
    translate-test) and get_marvl_few.py's (model,id,tr,zh,avg: MaRVL_<shots>.csv); avg over the target languages;
    per-example predictions as VOLTA's VL-binary-classifier results (sentence, prediction, label)."""
    langs = {
        l: {"accuracy": a, "n": 100 + i}
        for i, (l, a) in enumerate(zip(("en", "id", "sw", "ta", "tr", "zh"), range(50, 56)))
    }
    rec = {"task": "marvl", "split": "test", "translate_test": False, "langs": langs, "shots": 0}
    scoring.results.write_results(tmp_path, rec, "uc2-marvl-suf")
    header, row, n_row = (line.split(",") for line in (tmp_path / "MaRVL_0.csv").read_text().splitlines())
    assert header == ["model", "en", "id", "sw", "ta", "tr", "zh", "avg"]
    assert row == ["uc2-marvl-suf", "50.0", "51.0", "52.0", "53.0", "54.0", "55.0", "53.0"]
    assert n_row == ["n", "100", "101", "102", "103", "104", "105", ""]
    scoring.results.write_results(tmp_path, {**rec, "translate_test": True}, "uc2-marvl-suf")
    assert (tmp_path / "MaRVL_0.mt.csv").read_text().splitlines()[0] == "model,en,id,sw,ta,tr,zh,avg"
    few = {**rec, "shots": "10x2", "langs": {"tr": {"accuracy": 60.0, "n": 9}}}
    scoring.results.write_results(tmp_path / "fs", few, "uc2-marvl-full")
    header, row, _ = (line.split(",") for line in (tmp_path / "fs" / "MaRVL_10x2.csv").read_text().splitlines())
    assert header == ["model", "id", "tr", "zh", "avg"] and row == ["uc2-marvl-full", "-1.0", "60.0", "-1.0", "-1.0"]
    exs = [data.Example("marvl", "id", f"p{i}", "img", "img.png", f"caption {i}", label=i % 2) for i in range(3)]
    scoring.results.write_predictions(tmp_path, rec, {"id": [("p0", 1), ("p1", 1), ("p2", 0)]}, {"id": exs}, [])
    rows = json.loads((tmp_path / "test_id_0_result.json").read_text())
    assert rows == [
        {"id": "p0", "sentence": "caption 0", "prediction": 1, "label": 0},
        {"id": "p1", "sentence": "caption 1", "prediction": 1, "label": 1},
        {"id": "p2", "sentence": "caption 2", "prediction": 0, "label": 0},
    ]


def test_marvl_table_shows_ours_and_iglues_uc2_row_only_as_a_reference(tmp_path, capsys):
    """MaRVL runs get their own table (the paper has no MaRVL numbers: no paper cell); IGLUE's published UC2 row
    (57.28 zero-shot, 63.09 translate-test, 70.56 English) is printed under it, labelled a reference."""
    marvl_langs = ["en", "id", "sw", "ta", "tr", "zh"]
    runs = [
        _fake_run(tmp_path / f"uc2-marvl-{p}", "uc2", "marvl", p, marvl_langs, 2, i)
        for i, p in enumerate(("full", "suf"))
    ]
    runs.append(_fake_run(tmp_path / "cclm-marvl-suf", "cclm", "marvl", "suf", ["en", "id"], 1, 5))
    t = report.tables.build_tables(runs)
    rows = {r["setup"]: r for r in t["marvl"]}
    last = E.read_epoch_metrics(runs[1])[-1][1]
    assert rows["UC2+SUF"]["avg"] == pytest.approx(scoring.metrics.zs_average(last, "accuracy"))
    assert rows["UC2+SUF"]["en"] == last["en"]["accuracy"] and not rows["UC2+SUF"]["partial"]
    assert rows["CCLM+SUF"]["partial"] and set(rows) == {"UC2", "UC2+SUF", "CCLM+SUF"}
    out = report.tables.format_tables(t)
    assert "MaRVL (IGLUE's fourth task; the paper reports none): ours." in out
    assert "reference, not ours: IGLUE's UC2 (results/marvl): EN 70.56, ZS 57.28, translate-test ZS 63.09" in out
    assert f"{rows['UC2+SUF']['avg']:.1f}" in out and "(57.3)" not in out  # never a paper-style cell beside ours
