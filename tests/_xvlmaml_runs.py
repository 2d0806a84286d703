"""Runner for tests/test_maml.py under torchrun: several `xvlmaml.py train` runs in one process group
(engine's group is shared by nested users, so it outlives each run).

  python -m torch.distributed.run --nproc_per_node 2 tests/_xvlmaml_runs.py :: ARGS1 :: ARGS2 ...
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engine  # noqa: E402
import xvlmaml  # noqa: E402


def split_runs(argv: list[str]) -> list[list[str]]:
    runs: list[list[str]] = []
    for a in argv:
        if a == "::":
            runs.append([])
        else:
            runs[-1].append(a)
    return runs


if __name__ == "__main__":
    engine.setup_distributed()
    try:
        for run in split_runs(sys.argv[1:]):
            xvlmaml.main(run)
    finally:
        engine.cleanup_distributed()
