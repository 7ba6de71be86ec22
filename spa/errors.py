"""The one exception type users see: a one-line message that says what to do."""


class SpaError(Exception):
    """A user-facing error; the CLI prints it as one line and exits non-zero."""
