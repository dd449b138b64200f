"""The `optcraft` command.

    optcraft compare                train a digits network with each optimizer, table + PNG + CSV
    optcraft lr-find NAME           the learning-rate range test, plot + suggestions
    optcraft trajectory             optimizer paths on 2-D test functions, PNG
    optcraft list / show NAME       the optimizers: chain, defaults, state memory, paper
    optcraft bench ...              optcraft.bench's benchmarks

A user error (an unknown optimizer, a bad value, an output folder that cannot be written, a
missing optional dependency) is one line on stderr, `optcraft: error: ...`, and exit status 1;
argparse's own usage errors exit with 2.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..data import MissingDependency
from .common import CLIError

PROG = "optcraft"


def build_parser() -> argparse.ArgumentParser:
    from . import compare, listing, lr_find, trajectory

    parser = argparse.ArgumentParser(
        prog=PROG, description="Composable PyTorch optimizers: compare them on a real dataset, "
                               "find a learning rate, draw their paths, list them.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    compare.add_parser(subparsers)
    lr_find.add_parser(subparsers)
    trajectory.add_parser(subparsers)
    listing.add_parsers(subparsers)
    subparsers.add_parser("bench", help="benchmarks (optcraft.bench; `optcraft bench --help`)",
                          add_help=False)
    return parser


def _version() -> str:
    from .. import __version__

    return __version__


def run_bench(argv: list[str]) -> int:
    """`optcraft bench ARGS`: optcraft.bench.main(ARGS), imported only when asked for."""
    try:
        bench = importlib.import_module("optcraft.bench")
    except ModuleNotFoundError as error:
        if error.name != "optcraft.bench":
            raise
        raise CLIError("`optcraft bench` is not available: this installation has no "
                       "optcraft.bench module") from None
    result = bench.main(argv)
    return int(result or 0)


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "bench":
            return run_bench(argv[1:])
        args = build_parser().parse_args(argv)
        return int(args.run(args) or 0)
    except (CLIError, MissingDependency) as error:
        _error(str(error))
        return 1
    except BrokenPipeError:
        # `optcraft list | head`: the reader left; nothing more to say, and nothing to flush at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as error:
        # Writing the results failed after the folder was checked (disk full, removed folder).
        where = f" {error.filename!r}" if getattr(error, "filename", None) else ""
        _error(f"cannot write{where}: {error.strerror or error}")
        return 1
    except KeyboardInterrupt:
        _error("interrupted")
        return 130


def _error(message: str) -> None:
    line = " ".join(message.split())
    print(f"{PROG}: error: {line}", file=sys.stderr)


__all__ = ["main", "build_parser", "CLIError"]
