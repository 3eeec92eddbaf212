"""`svdicl` command line: parses flags (or a YAML/JSON config), calls the library, prints results.

One module per subcommand, each with `add(subparsers)` and `run(args)`.  Every subcommand
takes `--config FILE`: its keys are the subcommand's flag names (dashes or underscores), and
flags given on the command line win over the file.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import sys
from pathlib import Path

from svdicl.errors import SvdiclError

COMMANDS = ("inspect", "prune", "condition", "report", "eval", "sweep", "search", "theory")


def build_parser() -> argparse.ArgumentParser:
    """The `svdicl` argument parser: global flags and one subparser per command module."""
    parser = argparse.ArgumentParser(
        prog="svdicl",
        description="SVD-based weight pruning for better in-context learning (Yao et al., NeurIPS 2024).",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or status lines")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"svdicl.cli.{name}").add(sub)
    for subparser in sub.choices.values():
        subparser.add_argument("--config", help="YAML or JSON file of flag values (command-line flags win)")
    return parser


def _config_defaults(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Apply `--config FILE` of the chosen subcommand as parser defaults."""
    probe, _ = parser.parse_known_args(argv)
    path = getattr(probe, "config", None)
    if not path:
        return
    file = Path(path)
    if not file.is_file():
        raise SvdiclError(f"config file {path} does not exist")
    text = file.read_text()
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
    subparser = parser._subparsers._group_actions[0].choices[probe.command]
    while subparser._subparsers is not None:  # nested commands: `svdicl theory linreg --config ...`
        nested = subparser._subparsers._group_actions[0]
        subparser = nested.choices[getattr(probe, nested.dest)]
    actions = {a.dest: a for a in subparser._actions if a.dest not in ("config", "help")}
    defaults = {}
    for key, value in values.items():
        action = actions.get(str(key).replace("-", "_"))
        if action is None:
            raise SvdiclError(
                f"config {path}: unknown key {key!r} for `svdicl {probe.command}`; see svdicl {probe.command} --help"
            )
        takes_list = isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*")
        if takes_list and not isinstance(value, list):
            value = [value]
        elif isinstance(value, list) and not takes_list:
            value = ",".join(map(str, value))  # `layers: [0, 1]` means --layers 0,1
        defaults[action.dest] = value
    subparser.set_defaults(**defaults)


def _join_negative_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`--prune -1:mlp:0.9` as `--prune=-1:mlp:0.9`: argparse takes a value starting with `-` (other than a plain
    negative number) for a flag, so layer specs counted from the end would need the `=` form otherwise."""
    parsers, valued = [parser], set()
    while parsers:
        current = parsers.pop()
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += action.choices.values()
            elif action.option_strings and action.nargs is None:
                valued.update(action.option_strings)
    joined: list[str] = []
    for arg in argv:
        if joined and joined[-1] in valued and re.match(r"-\d", arg):
            joined[-1] = f"{joined[-1]}={arg}"
        else:
            joined.append(arg)
    return joined


def main(argv: list[str] | None = None) -> int:
    """Run the CLI on `argv` (default: sys.argv); returns the exit status, printing an SvdiclError as one line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    argv = _join_negative_values(parser, argv)
    try:
        _config_defaults(parser, argv)
        args = parser.parse_args(argv)
        if args.quiet:
            os.environ["TQDM_DISABLE"] = "1"
        _quiet_libraries()
        return args.handler(args)
    except SvdiclError as exc:
        print(f"svdicl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("svdicl: interrupted; finished work is kept, rerun the same command to resume", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    """Keep transformers' info/warning chatter and its own progress bars out of the output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
