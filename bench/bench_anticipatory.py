#!/usr/bin/env python
"""Overhead of anticipatory routing: step time while it is on against ordinary steps of the same run.

Runs the first curriculum stage of ``--config`` (default ``configs/pipeline.yaml``: 2 stages x 2
expert shards on two simulated racks) for ``--steps`` steps with a loss spike injected at
``--spike-at``: the rollback switches anticipatory routing on for ``--ar-steps`` steps, during
which every step also routes the batch ``--delta`` steps ahead (a forward-only pass of the
schedule on the stage actors). Reported: the median step time of the steps that route ahead, the
median of the ordinary steps after the first three (warm-up) and before the spike, their ratio
minus one (the overhead; the DeepSeek-V4 report gives about 20%), and the lag every forced step had.

Output: the trainer's progress on stderr, ONE JSON line on stdout::

    PYTHONPATH=. python bench/bench_anticipatory.py
    PYTHONPATH=. python bench/bench_anticipatory.py --config configs/debug.yaml --in-process
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Anticipatory-routing overhead (one JSON line on stdout).")
    p.add_argument("--config", default="configs/pipeline.yaml", help="training YAML (default: %(default)s)")
    p.add_argument("--steps", type=int, default=40, help="steps of the first curriculum stage to run")
    p.add_argument("--spike-at", type=int, default=22, help="step whose batch is replaced by garbage")
    p.add_argument("--ar-steps", type=int, default=10, help="steps with anticipatory routing after the rollback")
    p.add_argument("--delta", type=int, default=1, help="routing lag in updates")
    p.add_argument("--in-process", action="store_true", help="a 1 x 1 config, in this process (no Ray)")
    ns = p.parse_args(argv)
    if not 3 < ns.spike_at < ns.steps - ns.ar_steps - ns.delta:
        p.error("need 3 < --spike-at < --steps - --ar-steps - --delta")

    from cluster.training.config import load_train_config
    from cluster.training.trainer import read_metrics, train
    from model.safe_io import read_yaml_mapping

    data, _ = read_yaml_mapping(ns.config, "training config")
    first = dict(data["curriculum"][0], steps=ns.steps)
    first.pop("tokens", None)
    with tempfile.TemporaryDirectory() as tmp:
        data.update(name="bench-anticipatory", storage_path=tmp, curriculum=[first], inject_spike_at_step=ns.spike_at,
                    spike={"factor": 1.2, "min_steps": 5, "ema_beta": 0.8, "anticipatory_steps": ns.ar_steps,
                           "delta": ns.delta},
                    checkpoint={"every_steps": 5, "keep": 2})
        if data.get("parallel"):
            data["parallel"]["trace_steps"] = 0
        cfg = load_train_config(data)
        with contextlib.redirect_stdout(sys.stderr):
            summary = train(cfg, in_process=ns.in_process, progress="none")
        rows = read_metrics(cfg.run_dir())
    spikes = [r["step"] for r in rows if r.get("spike")]
    ahead = [r["step_time"] for r in rows if r.get("routing_pass")]
    normal = [r["step_time"] for r in rows[3:] if not r.get("routing_pass") and not r.get("anticipatory_routing")
              and not r.get("spike") and r["step"] < (spikes[0] if spikes else len(rows))]
    out = {"config": ns.config, "steps": ns.steps, "spikes": spikes, "delta": ns.delta,
           "forced_steps": [r["step"] for r in rows if r.get("anticipatory_routing")],
           "lags": sorted({r["routing_lag"] for r in rows if r.get("anticipatory_routing")}),
           "median_step_s_routing_ahead": statistics.median(ahead) if ahead else None,
           "median_step_s_ordinary": statistics.median(normal) if normal else None,
           "overhead": statistics.median(ahead) / statistics.median(normal) - 1 if ahead and normal else None,
           "trainer_summary_overhead": summary["anticipatory_overhead"], "paper_overhead": 0.20}
    print(json.dumps(out))
    return 0 if spikes else 1


if __name__ == "__main__":
    sys.exit(main())
