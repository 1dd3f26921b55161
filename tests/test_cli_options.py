"""Every script's command line as users type it: no flag lost or changed when the parsers are reorganised.

tests/data/cli_options.json holds, per script, each option's spellings, destination, default, type,
choices, nargs, action and whether it is required, recorded from the parsers. New flags may appear; a
recorded one must stay as it was. After adding flags on purpose, refresh the record:
`python tests/test_cli_options.py --record`.
"""

import argparse
import importlib
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECORD = Path(__file__).parent / "data" / "cli_options.json"
SCRIPTS = {
    "train_sdxl_ztsnr.py": "train_sdxl_ztsnr",
    "train_vae.py": "train_vae",
    "precompute_latents.py": "precompute_latents",
    "upscale.py": "upscale",
    "sdxl_ztsnr/sample.py": "sdxl_ztsnr.sample",
}


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def script_parser(module_name: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a script's parse_args builds, caught before it parses anything."""
    module = importlib.import_module(module_name)

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    try:
        module.parse_args([])
    except _Captured as caught:
        return caught.parser
    raise AssertionError(f"{module_name}.parse_args did not build a parser")


def _value(value):
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def describe(parser: argparse.ArgumentParser) -> dict[str, dict]:
    """Each option by its first spelling: what a user can type and what it sets."""
    options = {}
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        options[action.option_strings[0]] = {
            "spellings": list(action.option_strings),
            "dest": action.dest,
            "default": _value(
                action.default if not isinstance(action.default, list) else list(action.default)
            ),
            "type": getattr(action.type, "__name__", _value(action.type)),
            "choices": None if action.choices is None else [_value(c) for c in action.choices],
            "nargs": _value(action.nargs),
            "action": type(action).__name__,
            "required": action.required,
        }
    return options


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_recorded_flag_is_still_there_and_unchanged(script, monkeypatch):
    recorded = json.loads(RECORD.read_text())[script]
    now = describe(script_parser(SCRIPTS[script], monkeypatch))
    lost = sorted(set(recorded) - set(now))
    assert not lost, f"{script}: flags gone: {lost}"
    changed = {flag: (recorded[flag], now[flag]) for flag in recorded if recorded[flag] != now[flag]}
    assert not changed, f"{script}: flags changed (recorded, now): {json.dumps(changed, indent=1)}"


def test_the_check_sees_a_changed_default(monkeypatch):
    parser = argparse.ArgumentParser()
    parser.add_argument("--learning_rate", type=float, default=1e-5)
    before = describe(parser)
    parser.set_defaults(learning_rate=1e-4)
    assert describe(parser) != before


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    sys.path.insert(0, str(REPO))
    patch = pytest.MonkeyPatch()
    record = {}
    for script, module in SCRIPTS.items():
        record[script] = describe(script_parser(module, patch))
        patch.undo()
    RECORD.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"recorded {sum(len(v) for v in record.values())} options of {len(record)} scripts in {RECORD}")
