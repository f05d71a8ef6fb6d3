"""What the entry points (train, eval, analyze) share: bad input stops with one line.

A bad flag or config value is the user's to fix, not a bug: it gets one line on stderr naming
the flag and the value, status 1, and no traceback.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from absl import flags


def fail(message: str, *, kind: str = "Flags parsing error", at_once: bool = False) -> NoReturn:
    """Stops the program with "FATAL <kind>: <message>" as one line on stderr and status 1.

    A message that carries a Python traceback (ml_collections puts the config file's in its
    error) keeps its text before the traceback and the traceback's last line, the error itself.
    `at_once` exits without the interpreter's shutdown (os._exit), after flushing stdout and
    stderr: for a caller that has already waited for what must finish, whose libraries' threads
    would print their own errors while the interpreter tears down.
    """
    head, traceback, rest = message.partition("Traceback (most recent call last):")
    if traceback:
        error = [line.strip() for line in rest.splitlines() if line.strip()][-1:]
        message = " ".join([head.strip(), *error])
    line = f"FATAL {kind}: " + " ".join(part.strip() for part in message.splitlines())
    if not at_once:
        sys.exit(line)
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
    os._exit(1)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with its error on one line (absl adds a hint line; a value it rejects
    reads "--flag=value: why"); pass it to `app.run(main, flags_parser=parse_flags)`."""
    try:
        return flags.FLAGS(argv)
    except flags.UnrecognizedFlagError as e:
        fail(f"{e.flagvalue}: {e}")
    except flags.Error as e:
        fail(str(e).removeprefix("flag "))
