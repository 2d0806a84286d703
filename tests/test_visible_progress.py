"""What a run shows while it works: the whole run's ETA (training.progress.RunClock) in each epoch's bar and in
the epoch line, and a progress bar over the long retrieval scoring loops on rank 0 only."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from console import cli  # noqa: E402
import scoring.evaluate  # noqa: E402
from training import after_epoch, progress  # noqa: E402

_spec = importlib.util.spec_from_file_location("_toy_train", ROOT / "tests" / "_toy_train.py")
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)


class FakeTime:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def clock_for(epochs=4, eval_every=1, langs=None, eval_langs=None, evaluates=True, first_epoch=0):
    args = argparse.Namespace(epochs=epochs, eval_every=eval_every, langs=langs, eval_langs=eval_langs)
    now = FakeTime()
    due = (lambda e: after_epoch.evaluation_due(args, e)) if evaluates else (lambda e: False)
    return progress.RunClock(args, first_epoch, due, now=now), now


def one_epoch(clock, now, epoch, train_s, eval_s=None, n_langs=0, all_langs=True) -> str:
    desc = clock.epoch_desc(epoch)
    now.t += train_s
    clock.trained_epoch()
    if eval_s is not None:
        now.t += eval_s
        clock.evaluated(n_langs, all_langs)
    return desc


def test_run_eta_is_the_epochs_left_at_the_measured_pace_plus_the_evaluations_due():
    clock, now = clock_for(epochs=4)
    assert one_epoch(clock, now, 0, 100, eval_s=20, n_langs=5) == "epoch 1/4"  # nothing measured yet: no guess
    # 3 epochs x 100 s + 3 evaluations x 5 languages x 4 s
    assert clock.note(0) == "run ETA 6m00s"
    assert one_epoch(clock, now, 1, 140, eval_s=20, n_langs=5) == "epoch 2/4, run ETA 6m00s"
    assert clock.eta(1) == "4m40s"  # 2 x mean(100, 140) + 2 x 5 x 4 s


def test_run_eta_without_evaluations_counts_training_only():
    clock, now = clock_for(epochs=3, evaluates=False)
    one_epoch(clock, now, 0, 3600)
    assert clock.epoch_desc(1) == "epoch 2/3, run ETA 2h00m"


def test_run_eta_names_an_evaluation_it_cannot_size_yet():
    # per-epoch English only, the final one in every language: how many is unknown until --langs says
    clock, now = clock_for(epochs=3, eval_langs=["en"])
    one_epoch(clock, now, 0, 100, eval_s=10, n_langs=1, all_langs=False)
    assert clock.eta(0) == "3m30s + evaluations"  # 2 x 100 + one English evaluation x 10 s, then the final one
    sized, now = clock_for(epochs=3, eval_langs=["en"], langs=["en", "de", "fr", "ja"])
    one_epoch(sized, now, 0, 100, eval_s=10, n_langs=1, all_langs=False)
    assert sized.eta(0) == "4m10s"  # + the final evaluation: 4 languages x 10 s
    # only the last epoch evaluates (--eval-every 0): nothing timed before it
    late, now = clock_for(epochs=3, eval_every=0)
    one_epoch(late, now, 0, 60)
    assert late.eta(0) == "2m00s + evaluations"


def test_last_epoch_line_gives_the_run_time_and_a_resumed_run_none():
    clock, now = clock_for(epochs=2, evaluates=False)
    one_epoch(clock, now, 0, 30)
    one_epoch(clock, now, 1, 45)
    assert clock.note(1) == "run took 1m15s"
    resumed, now = clock_for(epochs=2, first_epoch=1, evaluates=False)
    one_epoch(resumed, now, 1, 45)
    assert resumed.note(1) == ""


def test_duration_reads_as_hours_minutes_or_seconds():
    assert [progress.duration(s) for s in (9.4, 61, 3599, 3600, 11100)] == ["9s", "1m01s", "59m59s", "1h00m", "3h05m"]


def test_epoch_line_with_the_run_eta_keeps_one_metric_per_language():
    results = {"en": {"accuracy": 55.191}, "de": {"accuracy": 30.1}}
    assert cli.epoch_line(results, 1, "test") == "epoch 2 test accuracy: en 55.19 de 30.10"
    line = cli.epoch_line(results, 1, "test", 5, "run ETA 1h12m")
    assert line == "epoch 2/5 (run ETA 1h12m) test accuracy: en 55.19 de 30.10"


def test_training_shows_the_run_eta_in_the_epoch_lines(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SUF_DEVICE", "cpu")
    args = ["--task", "xvnli", "--policy", "full", "--epochs", "3", "--batch-size", "12", "--num-workers", "0"]
    toy.main([*args, "--n-train", "24", "--eval-every", "1", "--output-dir", str(tmp_path / "run")])
    lines = [line for line in capsys.readouterr().out.splitlines() if " test accuracy: " in line]
    assert [line.split(" (")[0] for line in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert all(" (run ETA " in line for line in lines[:2]) and " (run took " in lines[2]


@pytest.mark.parametrize("rank, shown", [("0", True), ("1", False)])
def test_retrieval_scoring_bar_is_drawn_by_rank_0_only(monkeypatch, rank, shown):
    monkeypatch.setenv("RANK", rank)
    bar = scoring.evaluate.progress(range(3), "scoring", delay=2)  # what the retrieval protocols draw
    assert bar.disable is not shown and list(bar) == [0, 1, 2]
