"""Flags as a table, and `--config FILE` read through it.

`Parser` is an `argparse.ArgumentParser` that keeps a table of the flags added to it (`Flag`:
option strings, destination, kind), so a config file is turned into the very flags a user
would type and argparse converts and checks them exactly as on the command line: `limit: 8.5`
fails as `--limit 8.5` does.  A key is any long spelling of a flag with dashes or underscores
(`num_fewshot`, `num-fewshot`, `output_path`, `seed`, `seeds` ...), so every command takes the
same keys as its flags, and for the lists of `NUMBERS` the singular and the plural alike.  Usage
errors are one line, like every other svdicl error.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from svdicl.errors import SvdiclError, read_text

SWITCH, LIST, VALUE = "switch", "list", "value"

# Keys in the singular and the plural: where a command has the plural flag (`--layers`) the singular key means it
# too, as the command line takes `--layer` for `--layers`; where it has a singular flag that takes several values
# (`--format png svg`, eval's repeatable `--task`), so does the plural.  A command's own flag of either spelling
# comes first (search's `--layer` is one layer; eval's `--rate` one rate, so eval has no `rates` key).
NUMBERS = (
    ("task", "tasks"),
    ("seed", "seeds"),
    ("layer", "layers"),
    ("module", "modules"),
    ("rate", "rates"),
    ("format", "formats"),
    ("prune_layer", "prune_layers"),
    ("prune_module", "prune_modules"),
)


@dataclass(frozen=True)
class Flag:
    """One flag of one command: what a config key names and how its value becomes command-line text."""

    options: tuple[str, ...]  # e.g. ("--seed",)
    dest: str
    kind: str  # SWITCH (true/false), LIST (repeatable or several values), VALUE (one value; a list is joined with commas)
    repeat: bool = False  # LIST: one `--flag value` per item (append) rather than `--flag a b c` (nargs)

    @property
    def keys(self) -> tuple[str, ...]:
        """Config keys naming this flag: every long option without dashes, `-` as `_`."""
        return tuple(config_key(o) for o in self.options if o.startswith("--"))


def config_key(text: str) -> str:
    """`--num-fewshot` or `num-fewshot` as the key `num_fewshot`."""
    return text.lstrip("-").replace("-", "_")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that records its flags (`flags`) and subcommands (`commands`), and raises usage errors."""

    def __init__(self, *args, **kwargs) -> None:
        self.flags: list[Flag] = []
        self.commands: argparse.Action | None = None  # the subcommands action, when there is one
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        """argparse's add_argument, recording the flag."""
        action = super().add_argument(*args, **kwargs)
        _record(self.flags, action, kwargs)
        return action

    def add_argument_group(self, *args, **kwargs) -> ArgumentGroup:
        """A group whose flags go into this parser's table too."""
        return ArgumentGroup(super().add_argument_group(*args, **kwargs), self.flags)

    def add_subparsers(self, **kwargs) -> argparse.Action:
        """Subcommands, kept as `commands` so configs and `-1` values can find every command's flags."""
        self.commands = super().add_subparsers(**kwargs)
        return self.commands

    def error(self, message: str):
        """A usage error as one line (raised, so `main` prints it like every other svdicl error)."""
        raise SvdiclError(f"{message} (see {self.prog} --help)")

    def command_parser(self, argv: Sequence[str]) -> Parser:
        """The innermost subcommand's parser `argv` names (`svdicl -q theory linreg ...` -> linreg's), before parsing:
        a config may hold the flags a parse would ask for (`output` of `condition`)."""
        parser, rest = self, list(argv)
        while parser.commands is not None:
            names = [i for i, arg in enumerate(rest) if arg in parser.commands.choices]
            if not names:
                break
            parser, rest = parser.commands.choices[rest[names[0]]], rest[names[0] + 1 :]
        return parser

    def all_flags(self) -> list[Flag]:
        """Flags of this parser and of every subcommand below it."""
        found = list(self.flags)
        for child in self.commands.choices.values() if self.commands is not None else ():
            found += child.all_flags()
        return found


class ArgumentGroup:
    """An argument group (of `Parser.add_argument_group`) that records its flags in its parser's table."""

    def __init__(self, group: Any, flags: list[Flag]) -> None:
        self._group, self._flags = group, flags

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        """argparse's add_argument on the group, recording the flag."""
        action = self._group.add_argument(*args, **kwargs)
        _record(self._flags, action, kwargs)
        return action

    def __getattr__(self, name: str) -> Any:  # the group's other methods and attributes, unchanged
        return getattr(self._group, name)


def _record(flags: list[Flag], action: argparse.Action, kwargs: Mapping[str, Any]) -> None:
    kind = kwargs.get("action")
    if not action.option_strings or kind in ("help", "version"):
        return  # positionals are not config keys
    if kind in ("store_true", "store_false"):
        flags.append(Flag(tuple(action.option_strings), action.dest, SWITCH))
    elif kind == "append" or action.nargs in ("+", "*"):
        flags.append(Flag(tuple(action.option_strings), action.dest, LIST, repeat=kind == "append"))
    else:
        flags.append(Flag(tuple(action.option_strings), action.dest, VALUE))


def read_config(path: str) -> dict:
    """The mapping in a YAML (.yaml/.yml) or JSON file; one-line errors for a missing or malformed file."""
    file = Path(path)
    if not file.is_file():
        raise SvdiclError(f"config file {path} does not exist")
    text = read_text(file)
    try:
        if file.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as exc:  # any parse failure is a problem in the user's file
        raise SvdiclError(f"cannot parse config {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise SvdiclError(f"config {path} must be a mapping of flag names to values")
    return values


def config_path(argv: Sequence[str]) -> str | None:
    """The value of the last `--config FILE` or `--config=FILE` in `argv`."""
    found = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            found = argv[i + 1]
        elif arg.startswith("--config="):
            found = arg.split("=", 1)[1]
    return found


def given_dests(flags: Sequence[Flag], argv: Sequence[str]) -> set[str]:
    """Destinations the command line sets itself: any spelling, `--flag=value`, or an unambiguous prefix as argparse
    takes it (`--limit` is search's --limit, not also --limit-test)."""
    options = {option: flag.dest for flag in flags for option in flag.options}
    given = set()
    for text in {arg.split("=", 1)[0] for arg in argv if arg.startswith("-")}:
        if text in options:
            given.add(options[text])
        elif text.startswith("--"):
            matches = {dest for option, dest in options.items() if option.startswith(text)}
            given |= matches if len(matches) == 1 else set()
    return given


def config_argv(flags: Sequence[Flag], values: Mapping[str, Any], origin: str, given: set[str]) -> list[str]:
    """The command-line text of a config mapping; keys the command line sets itself are left out (it wins)."""
    by_key = config_keys(flags)
    seen: dict[str, str] = {}
    argv: list[str] = []
    for key, value in values.items():
        flag = by_key.get(config_key(str(key)))
        if flag is None:
            valid = ", ".join(sorted({f.keys[0] for f in flags if f.keys and f.dest != "config"}))
            raise SvdiclError(f"config {origin}: unknown key {key!r}; valid keys (dashes or underscores): {valid}")
        if flag.dest == "config":
            raise SvdiclError(f"config {origin}: a config file cannot name another one (key {key!r})")
        if flag.dest in seen:
            raise SvdiclError(f"config {origin}: keys {seen[flag.dest]!r} and {key!r} set the same flag; keep one")
        seen[flag.dest] = str(key)
        if flag.dest not in given and value is not None:
            argv += _argv(flag, value, f"config {origin}: key {key!r}")
    return argv


def config_keys(flags: Sequence[Flag]) -> dict[str, Flag]:
    """Every key a config of a command with `flags` may use: each flag's spellings, then the other number of a
    `NUMBERS` list where the command has no flag of that spelling."""
    keys = {key: flag for flag in flags for key in flag.keys}
    for one, many in NUMBERS:
        if many in keys and one not in keys:
            keys[one] = keys[many]
        elif one in keys and keys[one].kind == LIST and many not in keys:
            keys[many] = keys[one]
    return keys


def _argv(flag: Flag, value: Any, where: str) -> list[str]:
    option = next(o for o in flag.options if o.startswith("--"))
    if flag.kind == SWITCH:
        if not isinstance(value, bool):
            raise SvdiclError(f"{where} takes true or false, not {value!r}")
        return [option] if value else []
    items = value if isinstance(value, list) else [value]
    if any(isinstance(item, dict | list) for item in items):
        raise SvdiclError(f"{where} takes a value or a list of values, not {value!r}")
    texts = [str(item) for item in items]
    if flag.kind == LIST and flag.repeat:
        return [f"{option}={text}" for text in texts]
    if flag.kind == LIST:
        return [option, *texts]
    return [f"{option}={','.join(texts)}"]  # `layers: [0, 1]` means --layers 0,1; `=` keeps `-1` a value
