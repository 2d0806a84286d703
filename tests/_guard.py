"""The trainers' shared guard as the tests drive it (tests/test_train_uc2.py, test_train_cclm.py, test_mclip.py,
test_maml.py): a model method whose output turns NaN in eval or in train mode, a script's exit status with its
last stderr line, and the result files a refused run must not leave."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from console import cli  # noqa: E402

RESULT_FILES = ("model_final.pt", "results.json")


def nan_output(method, when: str = "evaluating"):
    """method, with its tensor output times NaN while the module evaluates (when="evaluating") or trains."""

    def patched(self, *args, **kwargs):
        out = method(self, *args, **kwargs)
        return out * float("nan") if self.training == (when == "training") else out

    return patched


def exit_line(main, argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, last stderr line) of main(argv) run as the scripts' entry point (console.cli.run_main)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run_main(lambda: main(argv))
    lines = capsys.readouterr().err.strip().splitlines()
    return e.value.code, lines[-1] if lines else ""


def results_written(run: Path) -> list[str]:
    """The result files (model_final.pt, results.json, IGLUE CSVs) in the run folder."""
    return [name for name in RESULT_FILES if (run / name).exists()] + sorted(p.name for p in run.glob("*.csv"))
