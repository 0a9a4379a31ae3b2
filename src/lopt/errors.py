"""The one exception type users see: a message that names what was wrong and how to fix it."""


class LoptError(Exception):
    """A user-facing error. The CLI prints its message without a traceback and exits with status 2."""
