#!/usr/bin/env python
"""Checkpoint save / load through the driver (tide before) against actor-written shards (today).

Starts a ``--flavor`` model (default ``small``, ~168M parameters) as a 2 stage x 2 expert-shard
actor graph on two simulated racks, takes one optimizer step (so Muon / AdamW state exists), then
times, four times each way, round-robin:

- **driver path** (what tide did): every actor returns its tensors through the object store
  (``StageWorker.state``), the driver writes one checkpoint (``save_pipeline_checkpoint``); on
  load the driver merges every shard into full tensors (``load_pipeline_full``) and ``ray.put``\\ s
  them for every actor (``StageWorker.load_state``);
- **actor path** (today's trainer): every actor writes its own shard file into the uncommitted
  directory and reports its sha256, the driver writes the manifest and commits
  (``StageWorker.write_shard`` + ``commit_pipeline_checkpoint``); on load the driver verifies the
  manifest and every actor reads its own tensors (``shard_sources`` + ``StageWorker.load_shards``).

Driver memory is the peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``)
above the resident set before each operation. Output: one JSON line on stdout with medians
and ratios::

    PYTHONPATH=. python bench/bench_checkpoint.py [--flavor small] [--repeats 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def _measure(fn):
    """``(seconds, driver peak MB above the resident set before)`` of ``fn()``."""
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
    base = _status("VmRSS")
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0, max(0.0, _status("VmHWM") - base)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Driver-path vs actor-written checkpoints (one JSON line on stdout).")
    p.add_argument("--flavor", default="small", help="model flavor (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=4, help="saves and loads per path (default: %(default)s)")
    ns = p.parse_args(argv)

    import ray
    import torch

    from actors.group import StageGroup
    from cluster.checkpoint import sharded as pckpt
    from cluster.checkpoint import store as ckpt
    from cluster.launch.local_racks import start_local_racks
    from cluster.launch.topology import Topology, build_graph
    from model import ModelArgs

    args = ModelArgs.flavor(ns.flavor)
    topo = Topology(racks=["r0", "r1"], pipeline_stages=2, expert_parallel=2, cpus_per_actor=1)
    graph = build_graph(topo, args.num_hidden_layers, args.n_routed_experts)
    racks = start_local_racks(graph.cpus_per_rack(), object_store_mb=4096)
    results: dict[str, list] = {k: [] for k in ("save_driver", "save_actor", "load_driver", "load_actor")}
    try:
        group = StageGroup(graph, args.to_dict(), seed=0)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, args.vocab_size, (4, 64), generator=g)
        batch = {"input_ids": ids, "labels": ids}
        group.call("forward_backward", ray.put(batch), {"mode": "dense"}, 1.0)
        group.call("apply", 1e-3, None)  # optimizer state exists now
        infos = group.call("shard_info")
        layout = pckpt.make_layout(graph.layer_slices, 2, args.n_routed_experts)
        layout["shards"] = {pckpt.shard_group(i["stage"], i["ep_rank"]): i for i in infos}
        meta = {"model_args": args.to_dict()}
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            step = 0

            def save_driver():
                states = group.call("state")
                shards = {(i["stage"], i["ep_rank"]): s for i, s in zip(infos, states, strict=True)}
                return pckpt.save_pipeline_checkpoint(root / "driver", step, shards, layout, meta, keep=1)

            def save_actor():
                d = ckpt.begin_checkpoint(root / "actor", step)
                written = group.call("write_shard", str(d), pckpt.SHARD_GROUP_FORMAT, None)
                return pckpt.commit_pipeline_checkpoint(d, step, written, layout, meta, keep=1)

            def load_driver():
                model, optim, _ = pckpt.load_pipeline_full(ckpt.latest_checkpoint(root / "driver"))
                group.call("load_state", ray.put(model), ray.put(optim))

            def load_actor():
                path = ckpt.latest_checkpoint(root / "actor")
                group.call("load_shards", pckpt.shard_sources(path, pckpt.read_meta(path)))

            for r in range(ns.repeats):
                step = r + 1
                for name, fn in (("save_driver", save_driver), ("save_actor", save_actor),
                                 ("load_driver", load_driver), ("load_actor", load_actor)):
                    results[name].append(_measure(fn))
                    print(f"repeat {r}: {name} {results[name][-1][0]:.2f} s, driver +{results[name][-1][1]:.0f} MB",
                          file=sys.stderr, flush=True)
            size = sum(f.stat().st_size for f in ckpt.latest_checkpoint(root / "actor").glob("*.safetensors"))
        group.shutdown()
    finally:
        racks.shutdown()
    med = {k: (statistics.median(t for t, _ in v), statistics.median(m for _, m in v)) for k, v in results.items()}
    out = {"flavor": ns.flavor, "layout": "2 x 2", "checkpoint_mb": round(size / 2**20, 1), "repeats": ns.repeats}
    for op in ("save", "load"):
        (td, md), (ta, ma) = med[f"{op}_driver"], med[f"{op}_actor"]
        out[op] = {"driver_path_s": round(td, 2), "actor_path_s": round(ta, 2), "time_ratio": round(ta / td, 3),
                   "driver_peak_mb_driver_path": round(md, 1), "driver_peak_mb_actor_path": round(ma, 1)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
