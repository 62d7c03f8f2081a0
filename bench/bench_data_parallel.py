#!/usr/bin/env python
"""Data parallelism: ZeRO-1 optimizer memory per actor, and gradient all-reduce hidden behind backward.

Runs real ``StageWorker``\\ s on local gloo processes (``comm.launch.spawn_local``), one pipeline
stage x ``--shards`` expert shards per replica, and measures:

- **optimizer memory per actor**, D = 1 against D = 2 (ZeRO-1: each parameter's Muon/AdamW state
  on one replica), after one optimizer step: the largest actor's bytes and the ratio;
- **step time with the all-reduce overlapped** (D = 2, gradient buckets of ``--bucket-mb`` sent
  during the last backward) against **one bucket** (the whole gradient as a single all-reduce,
  which can only start when backward has finished) under an emulated inter-replica link
  (``--gbps``; the replicas sit on two racks, so their link is the ``inter-rack`` class of the
  link model), median of ``--steps`` steps after one warm-up; plus the time the compute thread
  waited for the all-reduces (``wait allreduce`` spans).

Output: a table and one JSON line::

    PYTHONPATH=. python bench/bench_data_parallel.py [--flavor tiny] [--shards 1] [--gbps 2] [--steps 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _worker(rank: int, world: int, flavor: str, D: int, E: int, seq: int, bucket_mb: float, gbps: float,
            steps: int, out_dir: str) -> None:
    import torch

    from actors.stage_worker import StageWorker
    from cluster.launch.topology import Topology, build_graph
    from model import ModelArgs
    from model.optim import OptimConfig

    args = ModelArgs.flavor(flavor)
    graph = build_graph(Topology(racks=["r0", "r1"], pipeline_stages=1, expert_parallel=E, data_parallel=D),
                        args.num_hidden_layers, args.n_routed_experts)
    link = {"inter-rack": {"latency_us": 20, "bandwidth_gbps": gbps}} if gbps > 0 else None
    w = StageWorker(graph, rank, args.to_dict(), trace=True, link=link, bucket_mb=bucket_mb,
                    optim=dataclasses.asdict(OptimConfig(warmup_steps=0)))
    w.setup("", 0)
    B = 2 * D * E
    g = torch.Generator().manual_seed(0)
    times, waits = [], []
    for _ in range(steps + 1):
        ids = torch.randint(0, args.vocab_size, (B, seq + 1), generator=g)
        batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
        torch.distributed.barrier()
        t0 = time.perf_counter()
        w.forward_backward(batch, {"mode": "dense"}, 1.0)
        times.append(time.perf_counter() - t0)
        ev = w.trace_events()
        waits.append(sum(e["dur"] for e in ev if e.get("ph") == "X" and e["name"] == "wait allreduce") / 1e6)
        w.apply(1e-4, None)
    mem = w.memory()
    w.runner.close()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "step_s": times[1:], "wait_s": waits[1:], **mem}, f)


def _run(flavor, D, E, seq, bucket_mb, gbps, steps) -> list[dict]:
    from comm.launch import spawn_local

    with tempfile.TemporaryDirectory() as d:
        spawn_local(_worker, D * E, flavor, D, E, seq, bucket_mb, gbps, steps, d, timeout_s=1800)
        return [json.loads(f.read_text()) for f in sorted(Path(d).glob("rank*.json"))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flavor", default="tiny")
    ap.add_argument("--shards", type=int, default=1, help="expert shards per replica (default %(default)s)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--bucket-mb", type=float, default=1.0, help="overlapped bucket size, MiB (default %(default)s)")
    ap.add_argument("--gbps", type=float, default=2.0, help="emulated inter-replica bandwidth, Gbit/s "
                                                             "(0: no emulation; default %(default)s)")
    ap.add_argument("--steps", type=int, default=3)
    ns = ap.parse_args(argv)
    E = ns.shards
    one = _run(ns.flavor, 1, E, ns.seq_len, ns.bucket_mb, 0, 1)
    zero = _run(ns.flavor, 2, E, ns.seq_len, ns.bucket_mb, ns.gbps, ns.steps)
    whole = _run(ns.flavor, 2, E, ns.seq_len, 1e6, ns.gbps, ns.steps)
    opt1, opt2 = max(r["optimizer"] for r in one), max(r["optimizer"] for r in zero)
    med = lambda rows, k: statistics.median(v for r in rows for v in r[k])  # noqa: E731
    out = {"flavor": ns.flavor, "expert_shards": E, "seq_len": ns.seq_len, "gbps": ns.gbps,
           "optimizer_MiB_per_actor_D1": round(opt1 / 2**20, 1), "optimizer_MiB_per_actor_D2": round(opt2 / 2**20, 1),
           "optimizer_ratio": round(opt2 / opt1, 3), "params_MiB_per_actor": round(zero[0]["params"] / 2**20, 1),
           "step_s_overlapped": round(med(zero, "step_s"), 3), "step_s_one_bucket": round(med(whole, "step_s"), 3),
           "wait_s_overlapped": round(med(zero, "wait_s"), 3), "wait_s_one_bucket": round(med(whole, "wait_s"), 3)}
    out["speedup"] = round(out["step_s_one_bucket"] / out["step_s_overlapped"], 3)
    print(f"optimizer state per actor: D=1 {out['optimizer_MiB_per_actor_D1']} MiB, D=2 "
          f"{out['optimizer_MiB_per_actor_D2']} MiB ({out['optimizer_ratio']}x); parameters "
          f"{out['params_MiB_per_actor']} MiB per actor either way")
    print(f"step (forward + backward + reduction), D=2 at {ns.gbps} Gbit/s: {ns.bucket_mb} MiB buckets during "
          f"backward {out['step_s_overlapped']} s (waited {out['wait_s_overlapped']} s) vs one bucket after it "
          f"{out['step_s_one_bucket']} s (waited {out['wait_s_one_bucket']} s): {out['speedup']}x")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
