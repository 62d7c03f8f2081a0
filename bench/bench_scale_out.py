#!/usr/bin/env python
"""Scale-out acceptance on one machine: the ``medium`` flavor on 4 x 2 actors, then re-laid out
as 2 data-parallel replicas x 2 stages x 2 expert shards, each actor's peak memory against the plan.

Phase 1 trains ``configs/scale-out.yaml`` (4 pipeline stages x 2 expert shards = 8 actors on two
simulated racks) for ``--steps`` steps. Phase 2 continues the *same run* (its last checkpoint, any
layout loads into any other) on ``data_parallel: 2, pipeline_stages: 2, expert_parallel: 2`` (8
actors again) for ``--more-steps`` steps. After each phase every actor's measured memory
(``actor_memory.json``: parameters, optimizer state, peak resident set ``VmHWM``) is printed beside
``tide plan``'s memory plan for it (``cluster.launch.memory_plan.plan_memory``) with the ratios, and
one JSON line per phase summarises them::

    PYTHONPATH=. python bench/bench_scale_out.py [--storage /tmp/tide-scale-out] [--steps 3] [--more-steps 2]

The run needs ~20 GB of RAM and ~6 GB of disk per checkpoint; on a 2-core machine each step
takes minutes (Muon's Newton-Schulz iterations over ~0.6B parameters dominate).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

GiB = 2**30


def _phase(cfg_dict: dict, label: str) -> dict:
    from cluster.launch.memory_plan import plan_memory
    from cluster.training.config import load_train_config, model_args_for
    from cluster.training.trainer import graph_of, read_metrics, train

    cfg = load_train_config(cfg_dict)
    args = model_args_for(cfg, cfg.data.vocab_size)
    graph = graph_of(cfg, args.num_hidden_layers, args.n_routed_experts)
    plan = {a.rank: a for a in plan_memory(cfg, graph, args)}
    t0 = time.perf_counter()
    summary = train(cfg, progress="lines")
    wall = time.perf_counter() - t0
    run_dir = Path(summary["run_dir"])
    measured = json.loads((run_dir / "actor_memory.json").read_text())
    print(f"\n{label}: {graph.shape()}, {len(graph.actors)} actors, {wall:.0f} s")
    print(f"{'rank':>4} {'replica':>7} {'stage':>5} {'shard':>5} | {'params GiB':>10} {'(plan)':>7} | "
          f"{'optim GiB':>9} {'(plan)':>7} | {'peak GiB':>8} {'plan GiB':>8} {'peak/plan':>9}")
    ratios = []
    for m in sorted(measured, key=lambda r: r["rank"]):
        p = plan[m["rank"]]
        ratio = m["peak_rss"] / p.total
        ratios.append(ratio)
        print(f"{m['rank']:>4} {m.get('dp_rank') or 0:>7} {m['stage']:>5} {m['ep_rank']:>5} | "
              f"{m['params'] / GiB:>10.3f} {p.params / GiB:>7.3f} | {m['optimizer'] / GiB:>9.3f} "
              f"{p.optimizer / GiB:>7.3f} | {m['peak_rss'] / GiB:>8.2f} {p.total / GiB:>8.2f} {ratio:>9.2f}")
    rows = read_metrics(run_dir)
    print("losses: " + ", ".join(f"step {r['step']} {r['ce']:.3f}" for r in rows))
    out = {"phase": label, "layout": graph.shape(), "actors": len(graph.actors), "wall_s": round(wall, 1),
           "steps": [r["step"] for r in rows], "final_ce": rows[-1]["ce"],
           "peak_over_plan_min": round(min(ratios), 3), "peak_over_plan_max": round(max(ratios), 3),
           "within_25pct": all(0.75 <= r <= 1.25 for r in ratios),
           "params_exact": all(m["params"] == plan[m["rank"]].params for m in measured),
           "optimizer_exact": all(m["optimizer"] == plan[m["rank"]].optimizer for m in measured),
           "optimizer_GiB_per_actor_max": round(max(m["optimizer"] for m in measured) / GiB, 3)}
    print(json.dumps(out))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/scale-out.yaml")
    ap.add_argument("--storage", default="/tmp/tide-scale-out", help="run storage (default %(default)s)")
    ap.add_argument("--steps", type=int, default=3, help="steps on 4 x 2 (default %(default)s)")
    ap.add_argument("--more-steps", type=int, default=2, help="further steps on D=2 x 2 x 2 (default %(default)s)")
    ns = ap.parse_args(argv)
    from model.safe_io import read_yaml_mapping

    base, _ = read_yaml_mapping(ns.config, "training config")
    base = {**base, "storage_path": ns.storage, "name": "scale-out"}
    base["curriculum"] = [{**base["curriculum"][0], "steps": ns.steps}]
    base["checkpoint"] = {"every_steps": 1000, "keep": 1}  # one checkpoint, at the end of each phase
    first = _phase(base, "4 x 2")
    relaid = copy.deepcopy(base)
    relaid["parallel"]["topology"] = {**base["parallel"]["topology"], "data_parallel": 2, "pipeline_stages": 2,
                                      "expert_parallel": 2}
    relaid["curriculum"][0]["steps"] = ns.steps + ns.more_steps
    second = _phase(relaid, "re-laid out")
    ok = first["within_25pct"] and second["within_25pct"] and second["steps"][-1] == ns.steps + ns.more_steps - 1
    print(json.dumps({"ok": ok, "phases": [first, second]}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
