"""``tide config show FLAVOR`` / ``tide config check PATH``: a flavor's resolved ``ModelArgs`` as
YAML / validate a model YAML."""

from __future__ import annotations

import argparse
import sys

from cli.common import usage_errors
from model.config import FLAVORS, ModelArgs


def run_show(ns: argparse.Namespace) -> int:
    """``tide config show``: a flavor's resolved ModelArgs as YAML."""
    sys.stdout.write(ModelArgs.flavor(ns.flavor).to_yaml())
    return 0


def run_check(ns: argparse.Namespace) -> int:
    """``tide config check``: validate a model YAML (``ModelArgs.from_yaml``)."""
    with usage_errors():
        args = ModelArgs.from_yaml(ns.path)
    print(f"OK: {ns.path} ({args.num_hidden_layers} layers, hidden {args.hidden_size}, "
          f"vocab {args.vocab_size})")
    return 0


def run(ns: argparse.Namespace) -> int:
    """``tide config ACTION``: the action's function (argparse sets it; this is the fallback)."""
    return {"show": run_show, "check": run_check}[ns.config_command](ns)


def add_parser(sub) -> argparse.ArgumentParser:
    """The ``tide config`` subcommand and its actions ``show`` and ``check``."""
    cfg = sub.add_parser("config", help="show a flavor or check a model YAML",
                         description="Model configuration (ModelArgs) utilities.")
    cfg.set_defaults(func=run)
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = cfg_sub.add_parser("show", help="print a flavor's resolved config as YAML",
                              description="Print the resolved ModelArgs of FLAVOR as YAML "
                                          "(a valid input for 'tide config check').")
    show.add_argument("flavor", metavar="FLAVOR", choices=FLAVORS, help=f"one of {', '.join(FLAVORS)}")
    show.set_defaults(func=run_show)
    check = cfg_sub.add_parser("check", help="validate a model YAML; exit 2 with the reason if invalid",
                               description="Load PATH with ModelArgs.from_yaml. Prints OK and exits "
                                           "0, or prints the error (unknown or duplicate key, wrong "
                                           "type, inconsistent value, empty file, invalid YAML) and "
                                           "exits 2.")
    check.add_argument("path", metavar="PATH", help="model YAML (fields of ModelArgs, optional 'flavor')")
    check.set_defaults(func=run_check)
    return cfg
