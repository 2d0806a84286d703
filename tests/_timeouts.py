"""Every time limit in the tests (subprocess waits, the collective timeout given to torchrun runs) is
`scaled(seconds)`: the seconds an idle 2-core machine needs with room to spare, times SUF_TEST_TIMEOUT_SCALE
(default 1), times the load per core when the machine is busier than its cores (a loaded machine slows every
process the tests start, it does not make them wrong)."""

import os

VARIABLE = "SUF_TEST_TIMEOUT_SCALE"


def factor() -> float:
    """SUF_TEST_TIMEOUT_SCALE x max(1, 1-minute load average / cores), measured now."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return float(os.environ.get(VARIABLE, 1)) * max(1.0, load / (os.cpu_count() or 1))


def scaled(seconds: float) -> float:
    return seconds * factor()
