"""``tide cache-bytes``: the decode-state (KV cache) bytes of a flavor as JSON
(:func:`model.cache_bytes.cache_bytes`)."""

from __future__ import annotations

import argparse
import json

from cli.common import CLIError, usage_errors
from model.cache_bytes import LAYOUTS, cache_bytes
from model.config import FLAVORS, ModelArgs


def run(ns: argparse.Namespace) -> int:
    """``tide cache-bytes``: print :func:`model.cache_bytes.cache_bytes` as JSON."""
    args = ModelArgs.flavor(ns.flavor)
    if ns.context > args.max_position_embeddings:
        raise CLIError(f"--context {ns.context} exceeds max_position_embeddings "
                       f"({args.max_position_embeddings}) of flavor {ns.flavor!r}")
    with usage_errors():
        result = cache_bytes(args, ns.context, batch=ns.batch, layout=ns.layout)
    print(json.dumps({"flavor": ns.flavor, **result}, indent=2))
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """The ``tide cache-bytes`` subcommand."""
    cb = sub.add_parser(
        "cache-bytes", help="decode-state (KV cache) bytes of a flavor, as JSON",
        description="Print the per-sequence decode state of FLAVOR at a context length as JSON: "
                    "sliding-window buffers, compressed CSA/HCA entries, uncompressed tails, CSA "
                    "overlap slices and indexer keys, per layer type, with the ratio to "
                    "DeepSeek-V3.2's MLA cache (see model/cache_bytes.py).")
    cb.add_argument("--flavor", default="v4-flash", choices=FLAVORS, help="default: %(default)s")
    cb.add_argument("--context", type=int, default=1 << 20, metavar="TOKENS",
                    help="context length per sequence, at most the flavor's max_position_embeddings; "
                         "default: %(default)s")
    cb.add_argument("--batch", type=int, default=1, help="sequences; default: %(default)s")
    cb.add_argument("--layout", default="paper", choices=LAYOUTS,
                    help="storage: fp32/bf16 everywhere, or paper (FP8 non-RoPE dims, BF16 RoPE dims); "
                         "default: %(default)s")
    cb.set_defaults(func=run)
    return cb
