"""From the command line (and the YAML file --config names) to a validated config: flags and YAML keys come from the
config's fields (schema.py), merged as defaults < YAML < CLI. What a run was given goes into its
training_args.json through lopt.runs.write_training_args."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from lopt.config.fields import flag_fields, value_type
from lopt.config.schema import DISTRIBUTED_HELP, FLAG_GROUPS, SFTConfig
from lopt.config.validate import validate
from lopt.errors import LoptError, did_you_mean


def build_parser(cls=SFTConfig, prog: str = "lopt sft", description: str = "") -> argparse.ArgumentParser:
    """An argparse parser with one flag per config field, in the sections of FLAG_GROUPS (a recipe's own flag may
    name its section in its field: `option(..., group=...)`, after the section's listed flags); unset flags stay
    absent (not defaulted)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, argument_default=argparse.SUPPRESS, allow_abbrev=False
    )
    fields = flag_fields(cls)
    titles = {
        f.name: f.metadata.get("group")
        or next((title for title, names in FLAG_GROUPS.items() if f.name in names), None)
        for f in fields
    }
    groups = {title: parser.add_argument_group(title) for title in FLAG_GROUPS if title in titles.values()}
    parser.add_argument_group("distributed", DISTRIBUTED_HELP)
    listed = [name for members in FLAG_GROUPS.values() for name in members]

    def position(f) -> int:  # as FLAG_GROUPS lists them; a flag in no section first (under "options")
        return listed.index(f.name) if f.name in listed else len(listed) if titles[f.name] else -1

    for f in sorted(fields, key=position):
        kind = value_type(f)
        help_text = f.metadata["help"]
        if "(default:" not in help_text:  # a help that explains its default says it once
            help_text += f" (default: {f.default})"
        section = groups[titles[f.name]] if titles[f.name] else parser
        if kind is bool:
            section.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, help=help_text)
        else:
            section.add_argument(f"--{f.name}", type=kind, choices=f.metadata.get("choices"), help=help_text)
    return parser


def _read_yaml(path: str, cls) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise LoptError(f"--config {path}: no such file. Pass the path of a YAML file whose keys are flag names.")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise LoptError(
            f"{where}: malformed YAML ({getattr(exc, 'problem', exc)}). Fix the file or remove --config."
        ) from exc
    if not isinstance(data, dict):
        raise LoptError(f"{path}: expected a mapping of flag names to values, got {type(data).__name__}.")
    names = [f.name for f in flag_fields(cls)]
    for key in data:
        if key not in names or key == "config":
            raise LoptError(
                f"{path}: unknown key {key!r}.{did_you_mean(key, names)} Valid keys are the flags of `{cls.__name__}` "
                "(see `lopt sft --help`)."
            )
    return data


def _coerce(cls, name: str, value: Any, source: str) -> Any:
    f = next(f for f in flag_fields(cls) if f.name == name)
    kind = value_type(f)
    if value is None:
        return None
    if kind is bool and not isinstance(value, bool):
        raise LoptError(f"{source}: {name} must be true or false, got {value!r}.")
    if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise LoptError(f"{source}: {name} must be a number, got {value!r}.")
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise LoptError(f"{source}: {name} must be an integer, got {value!r}.")
    return kind(value)


def parse_config(argv: list[str] | None, cls=SFTConfig, prog: str = "lopt sft", description: str = ""):
    """Parse flags (and the YAML named by --config) into a validated config of type `cls`."""
    parser = build_parser(cls, prog, description)
    cli, unknown = parser.parse_known_args(argv)
    if unknown:
        names = [f"--{f.name}" for f in flag_fields(cls)]
        flag = unknown[0].split("=")[0]
        parser.error(f"unrecognized argument {unknown[0]!r}.{did_you_mean(flag, names)}")
    cli = vars(cli)
    values: dict[str, Any] = {}
    if "config" in cli:
        for key, value in _read_yaml(cli["config"], cls).items():
            values[key] = _coerce(cls, key, value, cli["config"])
    values.update(cli)
    config = cls(**values, explicit=frozenset(values))
    validate(config)
    return config
