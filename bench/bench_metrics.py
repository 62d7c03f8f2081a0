"""Cost of the serving metrics on the decode path.

Per generated token the engine records one inter-token-latency observation and one
generated-token count (``cluster.ops.metrics.ServingMetrics``). This times that pair of
calls without Ray (the recorder keeps its last values only) and with Ray initialised
(through ``ray.util.metrics``), and sets it against a decode step of the given length:
the share of a step's time that per-token metrics cost at batch size 1 and ``--batch``.

Prints one JSON line: ``{"us_per_token": {"no_ray", "ray"}, "ray_vs_no_ray", "share_of_step": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import time


def per_token_us(rec, n: int) -> float:
    """Microseconds per token for the engine's per-token metric calls on ``rec``."""
    t0 = time.perf_counter()
    for _ in range(n):
        rec.observe("tide_serve_inter_token_seconds", 0.01)
        rec.inc("tide_serve_generated_tokens")
    return (time.perf_counter() - t0) / n * 1e6


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=20000, help="tokens timed per setting (default: %(default)s)")
    ap.add_argument("--step-ms", type=float, default=9.3,
                    help="decode step time at batch 1 to compare with, ms (default: %(default)s, bench_serve's ITL "
                         "p50 at concurrency 1 on this project's 2-core machine)")
    ap.add_argument("--batch", type=int, default=32, help="rows per decode step for the second share")
    ap.add_argument("--batch-step-ms", type=float, default=31.4,
                    help="decode step time at --batch, ms (default: %(default)s, bench_serve's ITL p50 at 32)")
    args = ap.parse_args(argv)
    import ray

    from cluster.ops.metrics import ServingMetrics

    no_ray = per_token_us(ServingMetrics("bench-no-ray"), args.tokens)
    ray.init(address="local", include_dashboard=False, num_cpus=1, logging_level="ERROR")
    try:
        with_ray = per_token_us(ServingMetrics("bench-ray"), args.tokens)
    finally:
        ray.shutdown()
    out = {"us_per_token": {"no_ray": round(no_ray, 2), "ray": round(with_ray, 2)},
           "ray_vs_no_ray": round(with_ray / no_ray, 2),
           "share_of_step": {"batch_1": round(with_ray / (args.step_ms * 1e3), 5),
                             f"batch_{args.batch}": round(args.batch * with_ray / (args.batch_step_ms * 1e3), 5)}}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
