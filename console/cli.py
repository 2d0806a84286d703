"""What a script says on the command line, apart from its results: the parser class (--help with each default,
a command-line error as one line from rank 0 only), main() decorated so that bad input ends as one "error: ..."
line, `about` (which input an error is about), the entry point that prints that line once, and the line a run
prints after each evaluation.

Not on the reading path: a reader of the method needs none of it; every script of the project uses it.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from contextlib import contextmanager
from typing import Callable


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help with each option's default (unless the help text already states it, or it is resolved later)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        hidden = any(action.default is v for v in (None, False, argparse.SUPPRESS)) or "default" in text.lower()
        return text if hidden or not action.option_strings else text + " (default: %(default)s)"


def is_rank0_process() -> bool:
    """True in a single process and in torchrun's rank 0 (usable before the process group exists)."""
    return os.environ.get("RANK", "0") == "0"


class ArgumentParser(argparse.ArgumentParser):
    """Our scripts' parser: --help with defaults (HelpFormatter), and command-line errors as one line printed by
    rank 0 only (torchrun starts the script once per rank: argparse would print the whole usage from every rank).
    Subcommand parsers are of this class too (argparse makes them with the parent's class)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        if is_rank0_process():
            print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr, flush=True)
        raise SystemExit(2)


def exits_on_bad_input(main: Callable) -> Callable:
    """Decorator for a script's main(argv): a ValueError (how this project reports bad input: BadInput,
    checkpoint, config and annotation errors) ends it as SystemExit("error: <first line>"), so main() reads top to
    bottom with no try/except. Lines after the first (a load plan's key-by-key report) go to stderr first, from
    rank 0. Where the message must say which input it is about, raise it inside `about(flag)`."""

    @functools.wraps(main)
    def one_line(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except ValueError as e:
            first, _, details = str(e).partition("\n")
            if details and is_rank0_process():
                print(details, file=sys.stderr, flush=True)
            raise SystemExit(f"error: {first}") from None

    return one_line


@contextmanager
def about(what: str, value: object = None):
    """ValueErrors raised inside say which input they are about: "what: value: message" ("what: message" when
    value is None or the message names it already), e.g. about("--checkpoint", args.checkpoint)."""
    try:
        yield
    except ValueError as e:
        named = "" if value is None or str(value) in str(e).partition("\n")[0] else f"{value}: "
        raise ValueError(f"{what}: {named}{e}") from None


def run_main(main: Callable[[], object]) -> None:
    """A script's entry point: an "error: ..." exit is printed once (rank 0), not by every torchrun rank;
    a closed stdout (`... | head`) ends the program quietly."""
    try:
        code = exit_quietly_on_broken_pipe(main)
    except SystemExit as e:
        if isinstance(e.code, str):
            if is_rank0_process():
                print(e.code, file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        raise
    if isinstance(code, int) and code:
        raise SystemExit(code)


# The console's per-epoch metric(s) of a task; everything else is in metrics.jsonl.
CONSOLE_METRICS = (("accuracy",), ("ir_r1", "tr_r1"))


def epoch_line(results: dict, epoch: int, split: str, epochs: int | None = None, note: str = "") -> str:
    """ "epoch 2/5 (run ETA 1h12m) test accuracy: en 55.19 de 30.12 ..." (the task's metric per language; the
    number of epochs and the note when given)."""
    first = next(iter(results.values()))
    names = next((m for m in CONSOLE_METRICS if all(k in first for k in m)), None)
    if names is None:  # an unknown task: its first float metric
        names = tuple(k for k, v in first.items() if isinstance(v, float))[:1]
    parts = [
        f"{name}: " + " ".join(f"{lang} {m.get(name, float('nan')):.2f}" for lang, m in results.items())
        for name in names
    ]
    head = f"epoch {epoch + 1}" + (f"/{epochs}" if epochs else "") + (f" ({note})" if note else "")
    return f"{head} {split} " + "; ".join(parts)


def exit_quietly_on_broken_pipe(main: Callable[[], object]) -> object:
    """main() for a command-line tool whose output may be cut short (`python -m checks.inventory --json | head`): the
    reader closing the pipe ends the program quietly (exit 141 = 128 + SIGPIPE, as a shell reports it)."""
    try:
        return main()
    except BrokenPipeError:
        # stdout points at devnull from here, so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141) from None
