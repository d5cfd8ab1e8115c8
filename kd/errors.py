"""User-facing errors: one line that says what is wrong and what to do, printed without a traceback."""
from __future__ import annotations

import contextlib
import os
import sys


class UserError(Exception):
    """Bad input or environment. The scripts print `error: <message>` and exit with EXIT_USER_ERROR."""


EXIT_USER_ERROR = 2


@contextlib.contextmanager
def user_errors():
    """Every command's main: bad input ends the process with one line on stderr (from the first process only) and
    EXIT_USER_ERROR; a training run stopped by a signal exits with EXIT_STOPPED."""
    from kd.signals import EXIT_STOPPED, Stopped  # signals needs torch; UserError alone does not

    try:
        yield
    except UserError as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            # Raised in a DataLoader worker, the message carries the worker's traceback: keep its last line.
            message = str(exc).strip().splitlines()[-1].removeprefix(f"{UserError.__module__}.UserError: ")
            print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    except Stopped:
        sys.exit(EXIT_STOPPED)


def warn(message: str) -> None:
    """One line on stderr, from the first process only (the others would repeat it)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)
