"""How a config field becomes a flag: its help, its choices, and the type argparse and YAML coerce its value to.

Every field of a config dataclass is a command-line flag (`--name`) and a YAML key (`name:`), except the ones
marked internal; these helpers are shared by the schema (which declares the fields) and the parser.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field


def option(default, help: str, **extra):
    """A flag's field: its default and help (`extra`: `choices`; `secret` for a value never recorded; `group`, the
    section of `--help` a recipe's own flag goes in when FLAG_GROUPS does not list it)."""
    return field(default=default, metadata={"help": help, **extra})


def reference_default(cls, name: str, value):
    """Field ``name`` of ``cls`` with the reference implementation's default; its help and choices are kept."""
    return field(default=value, metadata=cls.__dataclass_fields__[name].metadata)


def flag_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def value_type(f: dataclasses.Field):
    text = str(f.type)
    for name, kind in (("bool", bool), ("int", int), ("float", float)):
        if text.startswith(name):
            return kind
    return str
