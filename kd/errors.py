"""User-facing errors: one line that says what is wrong and what to do, printed without a traceback."""


class UserError(Exception):
    """Bad input or environment. The scripts print `error: <message>` and exit with EXIT_USER_ERROR."""


EXIT_USER_ERROR = 2
