"""What the command-line tools at every layer share (engine.run_main, python -m checks.inventory,
python -m comparisons.mclip.xtd_data): a reader closing stdout (`... --json | head`) ends the tool quietly.

Not on the reading path: engine.run_main makes the one call.
"""

from __future__ import annotations

import os
import sys
from typing import Callable


def exit_quietly_on_broken_pipe(main: Callable[[], object]) -> object:
    """main() for a command-line tool whose output may be cut short (`python -m checks.inventory --json | head`): the
    reader closing the pipe ends the program quietly (exit 141 = 128 + SIGPIPE, as a shell reports it)."""
    try:
        return main()
    except BrokenPipeError:
        # stdout points at devnull from here, so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141) from None
