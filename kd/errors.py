"""User-facing errors: one line that says what is wrong and what to do, printed without a traceback."""


class UserError(Exception):
    """Bad input or environment. The scripts print `error: <message>` and exit with EXIT_USER_ERROR."""


EXIT_USER_ERROR = 2


def warn(message: str) -> None:
    """One line on stderr, from the first process only (the others would repeat it)."""
    import os
    import sys

    if int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)
