"""Under torchrun, for tests/test_mclip.py: in one process group, an uninterrupted train_mclip.py run into
<output-dir>/whole, a run into <output-dir>/cut that fails on every rank right after its first epoch's checkpoint
(tests/_faults.py raise:epoch_end:1), and that run's --resume. Arguments: train_mclip.py's (its --output-dir the
parent)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _faults  # noqa: E402
import engine  # noqa: E402
from comparisons.mclip import train_mclip as M  # noqa: E402
from formats import run_folder  # noqa: E402


def parsed(argv: list[str], out: Path, *extra: str):
    args = M.build_parser().parse_args([*argv, "--output-dir", str(out), *extra])
    M.check_args(args)
    return args


def main(argv: list[str]) -> None:
    base = Path(argv[argv.index("--output-dir") + 1])
    rest = argv[: argv.index("--output-dir")] + argv[argv.index("--output-dir") + 2 :]
    dist = engine.setup_distributed()
    try:
        M.run(parsed(rest, base / "whole"), dist)
        run_folder.release_run_dirs()
        with _faults.injected("raise:epoch_end:1", _faults.MCLIP):
            try:
                M.run(parsed(rest, base / "cut"), dist)
                raise SystemExit("the injected failure did not happen")
            except RuntimeError as e:
                if "injected failure" not in str(e):
                    raise
        run_folder.release_run_dirs()
        M.run(parsed(rest, base / "cut", "--resume"), dist)
    finally:
        engine.cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
