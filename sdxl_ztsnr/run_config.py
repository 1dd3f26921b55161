"""The run config file: ``--config_file run.toml`` (kohya's spelling) or a run's ``training_config.json``.

Keys are the flag names of the script's parser, in any of their spellings; kohya's ``[section]`` tables are
flattened; the command line overrides the file. An unknown key or a value the flag would refuse is one line
naming the file, the key and (for a typo) the nearest flag. ``saved_options`` writes the file a run keeps, which
is accepted back as ``--config_file`` and reproduces the run.
"""

from __future__ import annotations

import argparse
import difflib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from sdxl_ztsnr.console import UserError, read_config_file

# What training_config.json leaves out: secrets.
NOT_SAVED = ("hub_token",)
CONFIG_FILE_FLAG = "--config_file"
# What training_config.json reports beside the flags (per-source counts of a --data_config run); read back, ignored.
DATA_SOURCES_KEY = "data_sources"


def saved_options(args: argparse.Namespace) -> dict:
    """The run's options as training_config.json keeps them: every flag's value, by the flag's name, and
    nothing else (no token, nothing derived), so the file is accepted back as --config_file."""
    flags = getattr(args, "_flag_names", None)
    names = flags if flags is not None else [k for k in vars(args) if not k.startswith("_")]
    return {name: getattr(args, name) for name in names if name not in NOT_SAVED}


def _read_config_file(path: Path) -> dict:
    """A TOML or JSON file as one flat {key: value}: TOML sections are flattened (kohya's layout)."""
    data = read_config_file(path, CONFIG_FILE_FLAG)
    if not isinstance(data, dict):
        raise UserError(f"{CONFIG_FILE_FLAG} {path}: must hold a table of options")
    flat: dict[str, tuple[str, object]] = {}  # key -> (where it was written, value)
    for key, value in data.items():
        if key == DATA_SOURCES_KEY and path.suffix.lower() == ".json":
            continue  # a report of the run, not an option
        if isinstance(value, dict):  # [section] of kohya's config files: the names inside are flags
            for inner, inner_value in value.items():
                if isinstance(inner_value, dict):
                    raise UserError(f"{path}: [{key}.{inner}]: options sit at most one table deep")
                flat[inner] = (f"[{key}] {inner}", inner_value)
        else:
            flat[key] = (key, value)
    return flat


def _convert(action: argparse.Action, value: object, where: str, path: Path) -> object:
    """A config file's value as the flag would have parsed it; a UserError naming the key when it cannot be."""

    def bad(expected: str) -> UserError:
        return UserError(f"{path}: {where} = {value!r}: expected {expected}")

    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    many = action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction)
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    if not many and isinstance(value, list):
        raise bad("one value, not a list")
    converted = []
    for item in values:
        if isinstance(item, (dict, list)) or (isinstance(item, bool) and action.type is not None):
            raise bad(f"a {getattr(action.type, '__name__', 'value')}")
        try:
            item = action.type(str(item) if not isinstance(item, str) else item) if action.type else item
        except (TypeError, ValueError):
            raise bad(f"a {getattr(action.type, '__name__', 'value')}") from None
        if action.choices is not None and item not in action.choices:
            raise bad(f"one of {', '.join(map(str, action.choices))}")
        converted.append(item)
    return converted if many else converted[0]


def _flag_table(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every spelling a config file may use for a flag (with or without its dashes), and the flag's dest."""
    table = {}
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or action.dest == "help":
            continue
        for spelling in action.option_strings:
            table[spelling.lstrip("-")] = action
        table.setdefault(action.dest, action)
    return table


def config_defaults(parser: argparse.ArgumentParser, path: str | os.PathLike) -> dict[str, object]:
    """{dest: value} of a run config file, checked against the parser's flags (unknown key -> nearest flag)."""
    path = Path(path)
    table = _flag_table(parser)
    values = {}
    for key, (where, value) in _read_config_file(path).items():
        action = table.get(key.lstrip("-"))
        if action is None or action.dest == CONFIG_FILE_FLAG.lstrip("-"):
            near = difflib.get_close_matches(key.lstrip("-"), list(table), n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]!r} (--{near[0]})?" if near else f"; see `{parser.prog} --help`"
            raise UserError(f"{path}: {where}: unknown option{hint}")
        values[action.dest] = _convert(action, value, where, path)
    return values


def parse_with_config_file(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    check: Callable[[argparse.Namespace], object] | None = None,
) -> argparse.Namespace:
    """Parse ``argv`` over the values of ``--config_file`` (when given): the command line wins.

    Records the flags' names on the result (``_flag_names``, what saved_options writes).
    """
    early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # --config is the sampler's own flag
    early.add_argument(CONFIG_FILE_FLAG, default=None)
    known, _ = early.parse_known_args(argv)
    restore = {}
    if known.config_file:
        values = config_defaults(parser, known.config_file)
        for action in parser._actions:
            if action.dest in values and action.required:
                restore[action] = action.required
                action.required = False  # the file gives it
        parser.set_defaults(**values)
    try:
        args = parser.parse_args(argv)
    finally:
        for action, required in restore.items():
            action.required = required
    skip = ("help", CONFIG_FILE_FLAG.lstrip("-"))
    args._flag_names = [
        a.dest
        for a in parser._actions
        if a.option_strings and a.dest not in skip and not a.dest.startswith("_")
    ]
    if check is not None:
        check(args)
    return args
