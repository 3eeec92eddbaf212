"""`svdicl` command line: parses flags (or a YAML/JSON config), calls the library, prints results.

One module per subcommand, each with `add(subparsers)` and `run(args)`.  Every subcommand
takes `--config FILE` and `-q`: the file's keys are the subcommand's flag names in any of
their spellings (dashes or underscores, aliases too), its values go through the same
conversion and checks as flags, and flags given on the command line win over the file.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import re
import sys
import warnings
from pathlib import Path

from svdicl.cli.config import VALUE, Parser, config_argv, config_path, given_dests, read_config
from svdicl.errors import SvdiclError, write_error

COMMANDS = ("inspect", "prune", "condition", "report", "eval", "compare", "sweep", "search", "theory")


def build_parser() -> Parser:
    """The `svdicl` argument parser: global flags and one subparser per command module."""
    from svdicl import __version__

    parser = Parser(
        prog="svdicl",
        description="SVD-based weight pruning for better in-context learning (Yao et al., NeurIPS 2024).",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or status lines")
    parser.add_argument("--version", action="version", version=f"svdicl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"svdicl.cli.{name}").add(sub)
    _add_common_flags(parser)
    return parser


def _add_common_flags(parser: Parser) -> None:
    """`--config` and `-q` on every command that runs something (`svdicl eval -q` as well as `svdicl -q eval`)."""
    for child in parser.commands.choices.values():
        if child.commands is not None:
            _add_common_flags(child)
            continue
        child.add_argument("--config", help="YAML or JSON file of flag values (command-line flags win)")
        child.add_argument(
            "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars or status lines"
        )


def parse_args(argv: list[str], parser: Parser | None = None) -> argparse.Namespace:
    """Flags, with a `--config FILE` of the chosen command read as the flags it names (the command line wins)."""
    parser = parser or build_parser()
    argv = _join_negative_values(parser, argv)
    path = config_path(argv)
    if path is None:
        return parser.parse_args(argv)
    flags = parser.command_parser(argv).flags
    given = given_dests(flags, argv)
    extra = config_argv(flags, read_config(path), path, given)
    try:
        return parser.parse_args(argv + extra)
    except SvdiclError as exc:
        named = [f for f in flags if f.dest not in given and f"argument {'/'.join(f.options)}:" in str(exc)]
        if named:
            raise SvdiclError(f"config {path}: {exc}") from None
        raise


def _join_negative_values(parser: Parser, argv: list[str]) -> list[str]:
    """`--prune -1:mlp:0.9` as `--prune=-1:mlp:0.9`: argparse takes a value starting with `-` (other than a plain
    negative number) for a flag, so layer specs counted from the end would need the `=` form otherwise."""
    valued = {option for flag in parser.all_flags() if flag.kind == VALUE or flag.repeat for option in flag.options}
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
    args = None
    with warnings.catch_warnings():  # restores the caller's warning display when main returns
        warnings.showwarning = _warning_line
        try:
            args = parse_args(argv, parser)
            if args.quiet:
                os.environ["TQDM_DISABLE"] = "1"
            _quiet_libraries()
            return _run(args)
        except SvdiclError as exc:
            print(f"svdicl: error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:  # a full disk or a read-only folder wherever a file is written: one line, not a traceback
            problem = write_error(exc, _output_folder(args), writing=False)
            if problem is None:
                raise
            print(f"svdicl: error: {problem}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("svdicl: interrupted; finished work is kept, rerun the same command to resume", file=sys.stderr)
            return 130


def _run(args: argparse.Namespace) -> int:
    """The subcommand; if it fails, the output folders it created are removed again when they hold nothing."""
    from svdicl.outputs import remove_if_empty

    fresh = [Path(p) for p in (getattr(args, "output", None), getattr(args, "export", None)) if p and not Path(p).exists()]
    try:
        return args.handler(args)
    except BaseException:
        for folder in fresh:
            with contextlib.suppress(OSError):
                remove_if_empty(folder)
        raise


def _output_folder(args: argparse.Namespace | None) -> str | None:
    """The folder the command writes to, to name in an error that does not name its file."""
    directories = getattr(args, "directories", None) or []
    return getattr(args, "output", None) or (directories[0] if len(directories) == 1 else None)


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line each, like errors (svdicl's are addressed to the user, not to a developer)."""
    print(f"svdicl: warning: {str(message).splitlines()[0] if str(message) else category.__name__}", file=sys.stderr)


def _quiet_libraries() -> None:
    """Keep transformers' info/warning chatter and its own progress bars out of the output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
