"""bench/run_cost.py's per-experiment GPU hours: the table in docs/reproducing.md is the one the bench wrote, and
the estimate adds up from its stated assumptions (data sizes, epochs, peak, 40% of it)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import run_cost  # noqa: E402

RESULT = json.loads((ROOT / "bench" / "results" / "run_cost.json").read_text())


def test_reproducing_page_shows_the_table_the_bench_wrote():
    table = run_cost.experiment_table(RESULT["experiments"])
    assert table in (ROOT / "docs" / "reproducing.md").read_text()


def test_experiment_hours_follow_from_the_stated_data_sizes_and_peak():
    assert RESULT["data"] == {
        "train": run_cost.TRAIN,
        "test": run_cost.TEST,
        "langs": run_cost.LANGS,
        "epochs": run_cost.EPOCHS,
        "k_test": run_cost.K_TEST,
    }
    for r in RESULT["experiments"]:
        task, speed = r["task"], {g: p * RESULT["mfu"] * 3600 for g, p in RESULT["peak"].items()}
        assert r["training_flops"] == pytest.approx(
            run_cost.TRAIN[task] * run_cost.EPOCHS[task] * r["train_flops_per_sample"]
        )
        for gpu, h in r["hours"].items():
            assert h["training"] == pytest.approx(r["training_flops"] / speed[gpu], rel=1e-12)
            assert h["evaluation_every_epoch"] == pytest.approx(run_cost.EPOCHS[task] * h["evaluation_at_the_end"])
            evaluations = run_cost.EPOCHS[task] if task != "xflickrco" else (run_cost.EPOCHS[task] - 1) / 8 + 1
            assert h["evaluation_make_target"] == pytest.approx(evaluations * h["evaluation_at_the_end"])
    uc2 = {r["task"]: r for r in RESULT["experiments"] if r["model"] == "uc2"}
    # all-pairs retrieval: 8 languages x 2,000 x 2,000 pairs, each a forward of a third of a 4-pair training sample
    pairs = 8 * 2_000 * 2_000
    per_pair = uc2["xflickrco"]["one_evaluation_flops"] / pairs
    assert 0.2 < per_pair / (uc2["xflickrco"]["train_flops_per_sample"] / 4) < 0.45
