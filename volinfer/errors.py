"""User-facing errors: the CLI prints their message as one line and exits non-zero, without a traceback."""


class VolinferError(Exception):
    """Something about the user's input, model or options is wrong; the message says what and how to fix it."""


class Interrupted(VolinferError):
    """The run was interrupted (Ctrl-C, SIGTERM); the message says whether it can be resumed."""
