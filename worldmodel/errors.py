"""Bad input: the one exception type of every entry point, and the one line a script prints for it.

Whatever reads an input (a dataset file, a checkpoint, a reward predictor, a number from the command
line) checks it where it reads it and raises ``InputError`` (or one of its subclasses) with a message of
one line: ``<what was wrong>; <how to fix it>``. Library callers (the Gymnasium envs, ``WindowDataset``)
get that exception; the scripts catch it at their top level (``run_script``) and print
``error: <message>`` on stderr with exit code 2, never a traceback. Because ``InputError`` is a
``ValueError`` (and ``MissingInputError`` also a ``FileNotFoundError``), callers that catch those keep
working.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

EXIT_BAD_INPUT = 2
EXIT_CLOSED_OUTPUT = 141  # 128 + SIGPIPE: what a shell tool exits with when the reader of its output goes away
DETAIL_CHARS = 200  # a foreign library's message quoted in ours is cut to this length


class InputError(ValueError):
    """An input an entry point cannot use: a damaged or foreign file, too little data, a dataset and a
    checkpoint that do not belong together, an out-of-range number. The message is one line saying what
    was wrong and how to fix it."""


class MissingInputError(InputError, FileNotFoundError):
    """A file or folder an entry point needs is not there; the message says how to make it."""


def detail(error: BaseException) -> str:
    """A foreign error (h5py, torch.load, ...) as a short one-line phrase to quote inside our message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= DETAIL_CHARS else text[: DETAIL_CHARS - 3] + "..."


def one_line(message: str) -> str:
    """The message with any line breaks folded into spaces."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def report(error: Exception) -> int:
    """Print ``error: <message>`` on stderr (an InputError, or a parser's ValueError); returns the exit code
    for bad input."""
    print(f"error: {one_line(str(error))}", file=sys.stderr)
    return EXIT_BAD_INPUT


def closed_output() -> int:
    """The reader of our stdout went away (``script --help | head -3``): stop quietly, as Unix tools do, instead
    of a traceback. stdout goes to /dev/null first, or Python reports the pipe again when it flushes at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return EXIT_CLOSED_OUTPUT


def run_script(main: Callable[[], int | None]) -> int:
    """Run a script's main; bad input ends in one line on stderr and exit code 2 instead of a traceback, a closed
    output pipe quietly (``closed_output``)."""
    try:
        return main() or 0
    except InputError as error:
        return report(error)
    except BrokenPipeError:
        return closed_output()


def check_options(options: object, minimum: float, *names: str) -> None:
    """InputError for the first of the command-line dataclass's fields ``names`` below ``minimum``, named as
    its flag: ``--num-envs must be positive, got 0`` (minimum 1) or ``--seed must be >= 0, got -1``."""
    for name in names:
        value = getattr(options, name)
        if value < minimum:
            rule = "positive" if minimum == 1 else f">= {minimum}"
            raise InputError(f"--{name.replace('_', '-')} must be {rule}, got {value}")


def run_cli(args_type: type, main: Callable[..., object], argv: list[str] | None, description: str | None) -> int:
    """A tyro entry point: parse ``argv`` into ``args_type`` (``--help`` from its field docstrings), run
    ``main`` on it through ``run_script``."""
    import tyro  # only the scripts need it

    def run() -> None:
        main(tyro.cli(args_type, args=argv, description=description))

    return run_script(run)
