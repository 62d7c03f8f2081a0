"""``tide plan CONFIG``: a training config's actor graph (every stage actor with its rack, layers and
experts), its links by class and the per-stage schedule with its simulated bubble -- starting nothing.
A config without a ``parallel`` section is the 1 x 1 graph (one actor holding the whole model)."""

from __future__ import annotations

import argparse

from cli.common import usage_errors


def run(ns: argparse.Namespace) -> int:
    """``tide plan CONFIG``: the actor graph and pipeline schedule of a training config, without starting anything."""
    from cluster.data import sequences_per_batch
    from cluster.launch.topology import build_graph, load_topology
    from cluster.training.config import ParallelSection, load_train_config, model_args_for
    from comm.pipeline import SCHEDULES
    from comm.schedule import format_schedule, simulate

    with usage_errors():
        cfg = load_train_config(ns.config)
    par = cfg.parallel
    if par is None:  # the 1 x 1 graph every run without a `parallel` section trains on
        from cluster.launch.topology import single_actor

        t = single_actor()
        par = ParallelSection(topology={"pipeline_stages": 1, "expert_parallel": 1, "cpus_per_actor": t.cpus_per_actor})
        print(f"{ns.config} has no `parallel` section: one actor holds the whole model")
    args = model_args_for(cfg, cfg.data.vocab_size)
    topo = load_topology(par.topology)
    graph = build_graph(topo, args.num_hidden_layers, args.n_routed_experts)
    P, E = graph.num_stages, len(graph.expert_groups[0])
    per = args.n_routed_experts // E
    print(f"{len(graph.actors)} stage actors = {P} pipeline stages x {E} expert shards "
          f"({graph.cpus_per_actor:g} CPU each)")
    for a in graph.actors:
        lo, hi = graph.layer_slices[a.stage]
        ends = (["embedding"] if a.stage == 0 else []) + (["head"] + (["MTP"] if args.num_nextn_predict_layers else [])
                                                            if a.stage == P - 1 else [])
        where = f"rack {a.rack}" if a.rack is not None else "any node"
        print(f"  rank {a.rank}: stage {a.stage} shard {a.ep_rank} on {where}: layers {lo}..{hi - 1}"
              f"{' + ' + ', '.join(ends) if ends else ''}, experts {a.ep_rank * per}..{(a.ep_rank + 1) * per - 1}")
    pipe = [lk for lk in graph.links if lk.kind == "pipeline"]
    by_class = {c: sum(lk.link_class == c for lk in pipe) for c in ("intra-rack", "inter-rack")}
    print(f"pipeline links (activations forward, gradients back): {len(pipe)} "
          f"({by_class['inter-rack']} inter-rack, {by_class['intra-rack']} intra-rack); expert all-to-all: "
          f"{P} group(s) of {E} shard(s), intra-rack")
    if par.link_model is None:
        print("link model: off (parallel.link_model: null): transfers are not delayed")
    else:
        from cluster.launch.link_model import load_link_model
        from comm.link_model import LinkModel

        # validated by load_train_config; "default" is the built-in classes
        link = LinkModel() if par.link_model == "default" else load_link_model(par.link_model)
        print(f"link model ({par.link_model}): every transfer held for latency + bytes / bandwidth")
        for c, lc in link.classes.items():
            print(f"  {c}: latency {lc.latency_s * 1e6:g} us, bandwidth {lc.bandwidth_Bps * 8 / 1e9:g} Gbit/s "
                  f"(source: {link.source_of(c)})")
    unused = sorted(set(topo.racks or ()) - {a.rack for a in graph.actors})
    if unused:
        print(f"note: rack(s) {unused} host no stage")
    sched = SCHEDULES[par.schedule](P, par.microbatches)
    sim = simulate(sched, f_cost=1.0, b_cost=2.0)
    xw = min(par.expert_waves or par.waves, per)
    print(f"schedule {par.schedule}, {par.microbatches} microbatch(es) per shard, {par.waves} wave(s) each, "
          f"{xw} expert wave(s) per MoE layer (backward = 2 x forward):")
    print(format_schedule(sched))
    print(f"simulated bubble {sim.bubble:.3f}; peak live microbatches per stage {sim.peak_live}")
    for i, st in enumerate(cfg.curriculum):
        B = sequences_per_batch(st.batch_tokens, st.seq_len)
        mb = B // E // par.microbatches
        waves = "+".join(str(mb * (w + 1) // par.waves - mb * w // par.waves) for w in range(par.waves))
        print(f"curriculum[{i}] {st.name}: {B} sequences/step -> {B // E} per shard -> {mb} per microbatch -> "
              f"waves of {waves}")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """The ``tide plan`` subcommand."""
    pl = sub.add_parser(
        "plan", help="print a pipeline config's actor graph and schedule (starts nothing)",
        description="Validate CONFIG (a training YAML with a `parallel` section) and print its actor graph: "
                    "every stage actor with its rack, layers and experts, the links by class, the per-stage "
                    "pipeline schedule with its simulated bubble, and how each curriculum stage's batch splits "
                    "into shards, microbatches and waves.")
    pl.add_argument("config", help="training YAML with a `parallel` section, e.g. configs/pipeline.yaml")
    pl.set_defaults(func=run)
    return pl
