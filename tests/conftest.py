"""Suite-wide settings: tiny models run fastest on one thread (2 shared cores: a second intra-op
thread makes tiny steps ~10x slower under contention), and subprocesses inherit it.

Tests that start our scripts as processes (torchrun, SIGKILL, make, a trainer's CLI) are marked `system`
(pyproject.toml): `pytest -m "not system"` runs the fast in-process tests alone, `pytest -m system` the rest.
Their time limits are tests/_timeouts.py's scaled(seconds) (SUF_TEST_TIMEOUT_SCALE, and the machine's load)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import _timeouts  # noqa: E402

torch.set_num_threads(1)


def pytest_report_header(config):
    return f"time limits x{_timeouts.factor():.1f} ({_timeouts.VARIABLE} x load per core above 1)"


@pytest.fixture(scope="session")
def system_tests_run(request) -> bool:
    """Whether this session runs any `system` test: a module fixture that starts the processes its system tests
    collect (and starts them early, to overlap with the in-process tests) starts none under -m "not system"."""
    return any(item.get_closest_marker("system") for item in request.session.items)
