"""Benchmark: does streaming in waves hide communication?

Runs training steps of a pipeline x expert-parallel layout on local gloo
processes with the link model on (emulating a slower network than loopback, so
transfers take time the way they do between racks), for W = 1 (no overlap)
and W = 2, 4 waves, and prints one JSON line per layout with the median step
time per W, the ratio to W = 1, and from the timeline the pipeline bubble and
the fraction of communication time overlapped with compute. Writes the Chrome
trace and timeline PNG of each run to ``--out``.

    python bench/bench_pipeline.py                      # 2x1 (pipeline) and 1x2 (expert) layouts
    python bench/bench_pipeline.py --layouts 2x2 --inter-gbps 0.5

On 2 CPU cores use layouts of <= 2 processes: more processes than cores time-slice
compute and blur the comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _worker(rank: int, world: int, P: int, E: int, waves: list[int], opts: dict, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from cluster.launch.topology import Topology, build_graph
    from comm.link_model import LinkModel
    from comm.pipeline import PipelineRunner
    from comm.trace import Tracer
    from comm.transport import build_mesh
    from model import ModelArgs, Transformer
    from model.stage import PipelineStage
    from model.training import LossConfig, set_attention_mode

    args = ModelArgs.flavor(opts["flavor"])
    graph = build_graph(Topology(racks=["r0", "r1"], pipeline_stages=P, expert_parallel=E),
                        args.num_hidden_layers, args.n_routed_experts)
    mesh = build_mesh(graph, rank, tied_embedding=args.num_nextn_predict_layers > 0)
    me = next(a for a in graph.actors if a.rank == rank)
    lo, hi = graph.layer_slices[me.stage]
    link = LinkModel.from_dict({"intra-rack": {"latency_us": opts["latency_us"], "bandwidth_gbps": opts["intra_gbps"]},
                                "inter-rack": {"latency_us": opts["latency_us"], "bandwidth_gbps": opts["inter_gbps"]}},
                               enabled=True)
    B = E * opts["microbatches"] * max(waves) * opts["seqs_per_wave"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab_size, (B, opts["seq_len"] + 1), generator=g)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    results = []
    for W in waves:
        torch.manual_seed(0)
        stage = PipelineStage.from_model(Transformer(args), lo, hi, lo == 0, hi == args.num_hidden_layers,
                                         me.ep_rank, E)
        set_attention_mode(stage, "sparse")
        tracer = Tracer(rank, f"stage {me.stage} / shard {me.ep_rank}", enabled=False)
        runner = PipelineRunner(stage, mesh, microbatches=opts["microbatches"], waves=W, link=link, tracer=tracer)
        times = []
        for step in range(opts["steps"] + 1):
            tracer.enabled = step == opts["steps"]  # trace the last step
            stage.zero_grad(set_to_none=True)
            dist.barrier()
            t0 = time.perf_counter()
            runner.forward_backward(batch, LossConfig(mode="sparse"))
            dist.barrier()
            if step:  # step 0 warms up
                times.append(time.perf_counter() - t0)
        events: list = [None] * world
        dist.all_gather_object(events, tracer.events())
        runner.close()
        if rank == 0:
            results.append({"W": W, "expert_waves": runner.expert_waves, "step_s": times,
                            "events": [e for ev in events for e in ev]})
    if rank == 0:
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(results, f)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default="2x1,1x2", help="comma-separated STAGESxEXPERT_SHARDS (default 2x1,1x2)")
    p.add_argument("--waves", default="1,2,4", help="wave counts to compare (default 1,2,4; 1 = no overlap)")
    p.add_argument("--flavor", default="debug", help="model flavor (default debug)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--microbatches", type=int, default=2)
    p.add_argument("--seqs-per-wave", type=int, default=1, help="sequences per wave at the largest W")
    p.add_argument("--steps", type=int, default=3, help="timed steps per W (after one warm-up step)")
    p.add_argument("--intra-gbps", type=float, default=2.0, help="emulated intra-rack bandwidth, Gbit/s")
    p.add_argument("--inter-gbps", type=float, default=0.5, help="emulated inter-rack bandwidth, Gbit/s")
    p.add_argument("--latency-us", type=float, default=50.0, help="emulated one-way latency, microseconds")
    p.add_argument("--out", default="runs/bench_pipeline", help="directory for traces and timelines")
    a = p.parse_args(argv)
    try:
        layouts = [tuple(int(x) for x in item.lower().split("x")) for item in a.layouts.split(",")]
        waves = [int(w) for w in a.waves.split(",")]
    except ValueError:
        p.error(f"--layouts takes STAGESxSHARDS items like 2x1,1x2 and --waves integers like 1,2,4; got "
                f"{a.layouts!r} / {a.waves!r}")
    if any(len(lt) != 2 or min(lt) < 1 for lt in layouts) or min(waves) < 1:
        p.error("every layout needs 2 numbers >= 1 (STAGESxSHARDS) and every wave count must be >= 1")
    if any(8 % e for _, e in layouts):
        p.error("expert shards must divide the 8 routed experts of the debug/tiny flavors (1, 2, 4 or 8)")

    from comm.launch import spawn_local
    from comm.trace import plot_timeline, summarize, write_chrome_trace

    opts = dict(flavor=a.flavor, seq_len=a.seq_len, microbatches=a.microbatches, seqs_per_wave=a.seqs_per_wave,
                steps=a.steps, intra_gbps=a.intra_gbps, inter_gbps=a.inter_gbps, latency_us=a.latency_us)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for P, E in layouts:
        with tempfile.TemporaryDirectory() as tmp:
            spawn_local(_worker, P * E, P, E, waves, opts, tmp, timeout_s=1800)
            results = json.loads((Path(tmp) / "result.json").read_text())
        base = None
        row = {"bench": "pipeline_waves", "layout": f"{P}x{E}", "link": {k: opts[k] for k in
                                                                        ("intra_gbps", "inter_gbps", "latency_us")},
               "seq_len": a.seq_len, "microbatches": a.microbatches, "by_waves": {}}
        for r in results:
            med = statistics.median(r["step_s"])
            base = base or med
            s = summarize(r["events"])
            stem = out / f"{P}x{E}-W{r['W']}"
            write_chrome_trace(r["events"], stem.with_suffix(".trace.json"))
            plot_timeline(r["events"], stem.with_suffix(".png"), title=f"{P}x{E}, W={r['W']}")
            row["by_waves"][r["W"]] = {"step_s": round(med, 4), "speedup_vs_W1": round(base / med, 3),
                                       "expert_waves": r["expert_waves"], "bubble": round(s["bubble"], 3),
                                       "comm_overlapped": round(s["overlap_fraction"], 3)}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
