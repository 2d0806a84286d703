"""The per-step training losses of tiny real runs (tests/_recipes.py: train_uc2 / train_cclm main(), 2 epochs
x 3 steps, SUF's trainable set changing at epoch 2) equal the values pinned in
tests/fixtures/recipes/expected_losses.json within tests/parity.py's tolerance, a 1% lr change leaves that
tolerance, and a run stopped mid-way and resumed logs the same losses bit for bit.

A loss that moves here moved for a reason: a change meant to keep behaviour must keep these numbers. When a
change of behaviour is intended, regenerate (tests/fixtures/recipes/README.md) and say so in the commit.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable

import pytest
import torch

import _faults
import _recipes as R
from parity import assert_matches_reference

PINS = json.loads(R.EXPECTED.read_text())
RESUMED = ["uc2_xgqa_suf", "cclm_xflickrco_suf"]  # a classification and a retrieval recipe, one per model


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipes")
    R.write_inputs(path)
    return path


@pytest.fixture(scope="module")
def uninterrupted(workdir: Path) -> Callable[[str], list[tuple[int, float]]]:
    """name -> the recipe's (step, loss) records; each recipe runs once per module, on first use."""
    return functools.cache(lambda name: R.run(name, workdir, workdir / name))


def assert_matches_pin(name: str, got: list[tuple[int, float]]) -> None:
    pin = PINS["recipes"][name]
    assert [step for step, _ in got] == [step for step, _ in pin["steps"]], f"{name}: logged steps differ"
    losses = [torch.tensor([loss for _, loss in steps], dtype=torch.float64) for steps in (got, pin["steps"])]
    assert_matches_reference(f"{name} per-step loss", *losses)


@pytest.mark.parametrize("name", sorted(R.RECIPES))
def test_per_step_losses_match_the_pinned_values(name: str, uninterrupted: Callable) -> None:
    pin = PINS["recipes"].get(name)
    assert (
        pin is not None
        and pin["flags"] == R.RECIPES[name][1]
        and PINS["common_flags"] == R.COMMON
        and PINS["model_configs"] == R.pinned_model_configs()
    ), f"{name}: the recipe differs from the one pinned: regenerate (tests/fixtures/recipes/README.md)"
    assert_matches_pin(name, uninterrupted(name))


@pytest.mark.parametrize("name", sorted(R.RECIPES))
def test_a_one_percent_lr_change_fails_the_pin(name: str, workdir: Path) -> None:
    """The tolerance is tight enough for these recipes to notice a small change of the optimisation."""
    flags = R.RECIPES[name][1]
    lr = float(flags[flags.index("--lr") + 1])
    got = R.run(name, workdir, workdir / f"{name}_lr", "--lr", repr(lr * 1.01))
    with pytest.raises(AssertionError, match="per-step loss: max abs error"):
        assert_matches_pin(name, got)


@pytest.mark.parametrize("name", RESUMED)
def test_resume_mid_run_logs_the_same_per_step_losses_bitwise(
    name: str, workdir: Path, uninterrupted: Callable, monkeypatch
) -> None:
    """Stopped after step 5 (mid epoch 2), resumed from the epoch-1 checkpoint: steps 4-6 are redone and every
    logged loss equals the uninterrupted run's exactly (dropout, sampled negatives and data order restored)."""
    cut = workdir / f"{name}_cut"
    undo_fault = _faults.install("raise:step:5", monkeypatch=monkeypatch)
    with pytest.raises(RuntimeError, match="SUF_FAULT"):
        R.run(name, workdir, cut)
    assert [step for step, _ in R.step_losses(cut)] == [1, 2, 3, 4]
    undo_fault()
    assert R.run(name, workdir, cut, "--resume") == uninterrupted(name)
