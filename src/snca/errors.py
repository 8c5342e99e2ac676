"""The one exception type users see: its message is a single line that says what to do."""


class SncaError(Exception):
    """A user-facing error. The CLI prints ``str(err)`` on one line and exits with status 2."""
