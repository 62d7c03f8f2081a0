"""``tide calibrate``: measure the inter-/intra-rack links (nccl-tests, else a gloo probe) and write the
link-model file (``cluster.ops.calibrate``)."""

from __future__ import annotations

import argparse
import sys

from cli.common import CLIError


def run(ns: argparse.Namespace) -> int:
    """``tide calibrate``: measure the links (nccl-tests or a gloo probe) and write the link-model file."""
    from cluster.ops import calibrate
    from comm.nccl_tests import NcclTestsError

    try:
        calibrate.main(ns)
    except NcclTestsError as e:  # a failed benchmark run (a ValueError too): exit 1 with its error, not 2
        print(f"tide: error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        raise CLIError(str(e)) from None
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """The ``tide calibrate`` subcommand (its options: ``cluster.ops.calibrate.add_arguments``)."""
    from cluster.ops import calibrate

    cb = calibrate.add_arguments(sub.add_parser(
        "calibrate", help="measure inter-/intra-rack links (nccl-tests, else a gloo probe); write the link model",
        description=calibrate.DESCRIPTION))
    cb.set_defaults(func=run)
    return cb
