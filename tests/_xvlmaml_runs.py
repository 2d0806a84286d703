"""Runner for tests/test_maml.py under torchrun: several `comparisons/xvlmaml/xvlmaml.py` commands in ONE process
group (a second group on the same store can read the first one's addresses and fail to connect).

  python -m torch.distributed.run --nproc_per_node 2 tests/_xvlmaml_runs.py :: ARGS1 :: ARGS2 ...
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engine  # noqa: E402
from comparisons.xvlmaml import xvlmaml  # noqa: E402


def split_runs(argv: list[str]) -> list[list[str]]:
    runs: list[list[str]] = []
    for a in argv:
        if a == "::":
            runs.append([])
        else:
            runs[-1].append(a)
    return runs


if __name__ == "__main__":
    dist = engine.setup_distributed()
    try:
        for run in split_runs(sys.argv[1:]):
            xvlmaml.main(run, dist=dist)
    finally:
        engine.cleanup_distributed()
