"""The one exception type users see, and the one way a wrong choice is reported.

A `LoptError` names what was wrong and how to fix it; the CLI prints its message without a
traceback and exits with status 2. Every "that is not one of the accepted values" error goes
through `unknown_choice`, so each names the closest accepted value and lists all of them.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping


class LoptError(Exception):
    """A user-facing error. The CLI prints its message without a traceback and exits with status 2."""


def did_you_mean(value: object, options: Iterable[str]) -> str:
    """ " Did you mean 'x'?" for the accepted option closest to `value`, or "" when none is close."""
    match = difflib.get_close_matches(str(value), list(options), n=1)
    return f" Did you mean {match[0]!r}?" if match else ""


def unknown_choice(what: str, value: object, options: Mapping[str, str] | Iterable[str], extra: str = "") -> LoptError:
    """`value` is not an accepted `what` (e.g. "--task"): the closest option, then every accepted one.

    With a mapping of option -> description the options are listed one per line with what each is;
    `extra` is said last (another way to pass the value, for example).
    """
    names = list(options)
    if isinstance(options, Mapping):
        listing = ":\n" + "\n".join(f"  {name}: {description}" for name, description in options.items())
    else:
        listing = f": {', '.join(names)}."
    tail = f"\n{extra}" if extra and isinstance(options, Mapping) else f" {extra}" if extra else ""
    return LoptError(f"unknown {what} {value!r}.{did_you_mean(value, names)} Choose one of{listing}{tail}")


def unsupported_setting(setting: str, value: str, why: str, fix: str, see: str) -> LoptError:
    """An accelerate-config setting lopt refuses: what it is, why, the fix, and the shipped config to compare with."""
    return LoptError(f"{setting}: {value} in the accelerate config is not supported by lopt: {why} {fix} (see {see}).")
