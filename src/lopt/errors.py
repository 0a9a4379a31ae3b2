"""The one exception type users see: a message that names what was wrong and how to fix it."""


class LoptError(Exception):
    """A user-facing error. The CLI prints its message without a traceback and exits with status 2."""


def unsupported_setting(setting: str, value: str, why: str, fix: str, see: str) -> LoptError:
    """An accelerate-config setting lopt refuses: what it is, why, the fix, and the shipped config to compare with."""
    return LoptError(f"{setting}: {value} in the accelerate config is not supported by lopt: {why} {fix} (see {see}).")
