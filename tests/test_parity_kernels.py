"""The parity tests pass under other CPU kernel sets than this machine's, so a test whose tolerance only
holds for one SIMD width fails here, on any machine, instead of on a user's CPU.

ATen picks its kernels once per process from ATEN_CPU_CAPABILITY, hence one subprocess per capability.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.system  # a pytest process per kernel set
ROOT = Path(__file__).resolve().parents[1]
PARITY_TESTS = [
    "tests/test_parity_uc2.py",
    "tests/test_parity_cclm.py",
    "tests/test_train_step_parity.py",
    "tests/test_recipe_losses.py::test_per_step_losses_match_the_pinned_values",
]
OTHER_CAPABILITIES = [c for c in ("default", "avx2") if c.upper() != torch.backends.cpu.get_cpu_capability()]


@pytest.mark.parametrize("capability", OTHER_CAPABILITIES)
def test_parity_holds_under_other_cpu_kernels(capability: str) -> None:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    got = probe.stdout.strip()
    if capability != "default" and got != capability.upper():
        # a CPU without AVX2 falls back to DEFAULT; the "default" case below still covers it
        assert got == "DEFAULT", f"ATEN_CPU_CAPABILITY={capability} gave {got}"
    else:
        assert got == capability.upper(), f"ATEN_CPU_CAPABILITY={capability} not honoured: {got}"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *PARITY_TESTS],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, (
        f"parity under ATEN_CPU_CAPABILITY={capability}:\n{run.stdout[-4000:]}{run.stderr[-2000:]}"
    )
