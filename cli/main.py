"""The ``tide`` argument parser and entry point (one subparser per command module of :mod:`cli`)."""

from __future__ import annotations

import argparse
import sys

from cli import cache_bytes, calibrate, config, dashboards, demo, export, plan, serve, train, verify
from cli.common import EXIT_USAGE, CLIError

# in the order `tide --help` lists them
COMMANDS = (demo, train, export, cache_bytes, serve, verify, plan, calibrate, config, dashboards)


def build_parser() -> argparse.ArgumentParser:
    """The ``tide`` argument parser (one subparser per command)."""
    parser = argparse.ArgumentParser(
        prog="tide",
        description="tide: train and serve DeepSeek-V4-style models on Ray.",
        epilog="Run 'tide COMMAND --help' for the options of a command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tide`` console script; returns the exit status."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return ns.func(ns)
    except CLIError as e:  # user input; anything else is a bug and keeps its traceback
        print(f"tide: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `tide plan ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
