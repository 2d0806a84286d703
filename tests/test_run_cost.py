"""bench/run_cost.py's per-experiment GPU hours: the tables in docs/reproducing.md (Table 1's and MaRVL's) are the
ones the bench wrote, the estimate adds up from its stated assumptions (data sizes, epochs, peak, 40% of it), and
the MaRVL numbers the docs quote are the bench's."""

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_cclm  # noqa: E402
import train_uc2  # noqa: E402
from bench import run_cost  # noqa: E402

RESULT = json.loads((ROOT / "bench" / "results" / "run_cost.json").read_text())
REPRODUCING = (ROOT / "docs" / "reproducing.md").read_text()
MARVL_SECTION = REPRODUCING.split("\n## MaRVL\n", 1)[1].split("\n## ", 1)[0]


def _epochs(model: str, task: str) -> int:
    e = run_cost.EPOCHS[task]
    return e[model] if isinstance(e, dict) else e


def test_reproducing_page_shows_the_tables_the_bench_wrote():
    assert run_cost.experiment_table(RESULT["experiments"]) in REPRODUCING
    marvl = run_cost.experiment_table(RESULT["experiments"], ("marvl",))
    assert marvl in MARVL_SECTION
    assert marvl.count("make marvl-") == 2  # both models' rows, and none of Table 1's
    assert "marvl" not in run_cost.experiment_table(RESULT["experiments"])


def test_experiment_hours_follow_from_the_stated_data_sizes_and_peak():
    assert RESULT["data"] == {
        "train": run_cost.TRAIN,
        "test": run_cost.TEST,
        "langs": run_cost.LANGS,
        "epochs": run_cost.EPOCHS,
        "k_test": run_cost.K_TEST,
    }
    assert {(r["model"], r["task"]) for r in RESULT["experiments"]} == {
        (m, t) for m in ("uc2", "cclm") for t in ("xgqa", "xvnli", "xflickrco", "marvl")
    }
    for r in RESULT["experiments"]:
        task, speed = r["task"], {g: p * RESULT["mfu"] * 3600 for g, p in RESULT["peak"].items()}
        epochs = _epochs(r["model"], task)
        assert r["epochs"] == epochs
        assert r["training_flops"] == pytest.approx(run_cost.TRAIN[task] * epochs * r["train_flops_per_sample"])
        for gpu, h in r["hours"].items():
            assert h["training"] == pytest.approx(r["training_flops"] / speed[gpu], rel=1e-12)
            assert h["evaluation_at_the_end"] == pytest.approx(r["one_evaluation_flops"] / speed[gpu], rel=1e-12)
            assert h["evaluation_every_epoch"] == pytest.approx(epochs * h["evaluation_at_the_end"])
            evaluations = epochs if task != "xflickrco" else (epochs - 1) / 8 + 1
            assert h["evaluation_make_target"] == pytest.approx(evaluations * h["evaluation_at_the_end"])
    uc2 = {r["task"]: r for r in RESULT["experiments"] if r["model"] == "uc2"}
    # all-pairs retrieval: 8 languages x 2,000 x 2,000 pairs, each a forward of a third of a 4-pair training sample
    pairs = 8 * 2_000 * 2_000
    per_pair = uc2["xflickrco"]["one_evaluation_flops"] / pairs
    assert 0.2 < per_pair / (uc2["xflickrco"]["train_flops_per_sample"] / 4) < 0.45


def test_marvl_assumes_nlvr2_training_the_six_test_sets_and_the_trainers_epochs():
    assert run_cost.TRAIN["marvl"] == 86_373  # NLVR2 train (Suhr et al. 2019)
    assert run_cost.TEST["marvl"] == {"en": 6_967, "id": 1_128, "sw": 1_108, "ta": 1_242, "tr": 1_180, "zh": 1_012}
    assert run_cost.LANGS["marvl"] == 6
    assert run_cost.EPOCHS["marvl"] == {
        "uc2": train_uc2.DEFAULTS[("paper", "marvl")]["epochs"],
        "cclm": train_cclm.DEFAULTS[("paper", "marvl")]["epochs"],
    }


def test_a_marvl_pair_costs_two_single_image_samples_and_each_test_pair_is_evaluated_once():
    rows = {(r["model"], r["task"]): r for r in RESULT["experiments"]}
    test_pairs = sum(run_cost.TEST["marvl"].values())
    for model in ("uc2", "cclm"):
        marvl, single = rows[model, "marvl"], rows[model, "xvnli"]
        # every layer runs once per image (UC2: the caption repeated, VOLTA's nlvr layout; CCLM: the ViT over 2B
        # images, the text and cross encoders once per half); the heads differ (2 x 768 -> 2 against 768 -> 3)
        assert 1.95 < marvl["train_flops_per_sample"] / single["train_flops_per_sample"] < 2.05
        assert not marvl["lower_bound"]
        # one evaluation = every test pair of every language once, a forward pass: about a third of a training pair
        per_pair = marvl["one_evaluation_flops"] / test_pairs
        assert 0.3 < per_pair / marvl["train_flops_per_sample"] < 0.4
    estimates = {r["model"]: r for r in RESULT["estimates"]}
    assert estimates["UC2 MaRVL (a pair of images)"]["train_flops_per_sample"] == pytest.approx(
        rows["uc2", "marvl"]["train_flops_per_sample"]
    )
    assert estimates["CCLM MaRVL (a pair of images)"]["train_flops_per_sample"] == pytest.approx(
        rows["cclm", "marvl"]["train_flops_per_sample"]
    )


def test_docs_quote_the_marvl_numbers_the_bench_wrote():
    rows = {r["model"]: r for r in RESULT["experiments"] if r["task"] == "marvl"}
    gflop = {m: round(r["train_flops_per_sample"] / 1e9) for m, r in rows.items()}
    assert f"one training pair ~{gflop['uc2']} GFLOP (UC2) / ~{gflop['cclm']} GFLOP (CCLM)" in MARVL_SECTION
    a100 = {m: run_cost.hours(r["hours"]["A100"]["training"]) for m, r in rows.items()}
    readme = re.sub(r"\s+", " ", (ROOT / "README.md").read_text())
    assert f"MaRVL (`bench/run_cost.py`): ~{a100['uc2']} (UC2) / ~{a100['cclm']} (CCLM) A100-hours" in readme
