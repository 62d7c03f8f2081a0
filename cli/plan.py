"""``tide plan CONFIG``: a training config's actor graph (every stage actor with its rack, layers and
experts), its links by class, the per-stage schedule with its simulated bubble, and the per-actor
memory plan (``cluster.launch.memory_plan``: parameters, gradients, optimizer state, activations,
transients, overhead, total, and whether it fits ``--device-memory``) -- starting nothing and
building the model on the ``meta`` device only. A config without a ``parallel`` section is the
1 x 1 graph (one actor holding the whole model)."""

from __future__ import annotations

import argparse

from cli.common import usage_errors


def run(ns: argparse.Namespace) -> int:
    """``tide plan CONFIG``: the actor graph, pipeline schedule and memory plan of a training config, without
    starting anything."""
    from cluster.data import sequences_per_batch
    from cluster.launch.memory_plan import parse_bytes
    from cluster.launch.topology import build_graph, load_topology
    from cluster.training.config import ParallelSection, load_train_config, model_args_for
    from comm.pipeline import SCHEDULES
    from comm.schedule import format_schedule, simulate

    with usage_errors():  # option errors before any output
        sizes = {k: parse_bytes(getattr(ns, k), "--" + k.replace("_", "-")) if getattr(ns, k) is not None
                 else None for k in ("device_memory", "overhead")}
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
    P, E, D = graph.num_stages, len(graph.expert_groups[0]), graph.data_parallel
    per = args.n_routed_experts // E
    replicas = f"{D} data-parallel replicas x " if D > 1 else ""
    print(f"{len(graph.actors)} stage actors = {replicas}{P} pipeline stages x {E} expert shards "
          f"({graph.cpus_per_actor:g} CPU each)")
    for a in graph.actors:
        lo, hi = graph.layer_slices[a.stage]
        ends = (["embedding"] if a.stage == 0 else []) + (["head"] + (["MTP"] if args.num_nextn_predict_layers else [])
                                                            if a.stage == P - 1 else [])
        where = f"rack {a.rack}" if a.rack is not None else "any node"
        rep = f"replica {a.dp_rank} " if D > 1 else ""
        print(f"  rank {a.rank}: {rep}stage {a.stage} shard {a.ep_rank} on {where}: layers {lo}..{hi - 1}"
              f"{' + ' + ', '.join(ends) if ends else ''}, experts {a.ep_rank * per}..{(a.ep_rank + 1) * per - 1}")
    pipe = [lk for lk in graph.links if lk.kind == "pipeline"]
    by_class = {c: sum(lk.link_class == c for lk in pipe) for c in ("intra-rack", "inter-rack")}
    print(f"pipeline links (activations forward, gradients back): {len(pipe)} "
          f"({by_class['inter-rack']} inter-rack, {by_class['intra-rack']} intra-rack); expert all-to-all: "
          f"{P * D} group(s) of {E} shard(s), intra-rack")
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
        mb = B // (D * E) // par.microbatches
        waves = "+".join(str(mb * (w + 1) // par.waves - mb * w // par.waves) for w in range(par.waves))
        rep = f"{B // D} per replica -> " if D > 1 else ""
        print(f"curriculum[{i}] {st.name}: {B} sequences/step -> {rep}{B // (D * E)} per shard -> {mb} per "
              f"microbatch -> waves of {waves}")
    fits = print_memory_plan(cfg, graph, args, ns, **sizes)
    if ns.check and not fits:
        return 1  # --check: a plan that does not fit fails (CI, a pre-submit hook)
    return 0


COLUMNS = ("params", "grads", "optimizer", "activations", "transient", "overhead", "total")


def ranges(ranks: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"``."""
    out, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            out.append(str(start) if start == r else f"{start}-{r}")
            start = None
    return ", ".join(out)


def print_memory_plan(cfg, graph, args, ns: argparse.Namespace, device_memory: int | None = None,
                      overhead: int | None = None) -> bool:
    """The per-actor memory table of ``tide plan`` (``cluster.launch.memory_plan.plan_memory``) and its
    verdicts against ``device_memory`` bytes (``--device-memory``; default: ``default_device_memory``).
    ``overhead``: per-process bytes instead of the built-in constant (``--overhead``). Returns whether
    every actor fits (True when the device memory is unknown)."""
    from rich.console import Console
    from rich.table import Table

    from cluster.launch.memory_plan import default_device_memory, human, plan_memory

    device = device_memory
    if device is None:
        device, source = default_device_memory(graph)
    else:
        source = f"--device-memory {ns.device_memory}"
    gpu = bool(graph.gpus_per_actor)
    with usage_errors():
        plans = plan_memory(cfg, graph, args, overhead=overhead)
    D = graph.data_parallel
    console = Console()
    if not console.is_terminal:  # logs and pipes: one line per row, never a cut table
        console = Console(width=220)
    table = Table(title="memory plan per actor (float32; the peak of the curriculum's worst step)")
    for col in ("ranks", *(("replica",) if D > 1 else ()), "stage", "shard", *COLUMNS, "peak at", "verdict"):
        table.add_column(col, justify="right" if col in COLUMNS else "left")

    def cells(p):
        verdict = "?" if device is None else ("fits" if p.fits(device) else "does not fit")
        values = (p.params + p.buffers, p.grads, p.optimizer, p.activations, p.transient, p.overhead, p.total)
        return ((str(p.dp_rank),) if D > 1 else ()) + (str(p.stage),), tuple(human(v) for v in values) + (
            f"{p.curriculum_stage}, {p.peak_phase}", verdict)

    rows: list[list] = []  # consecutive actors with the same figures share a row (unless --every-actor)
    for p in plans:
        head, rest = cells(p)
        if rows and not ns.every_actor and rows[-1][1] == head and rows[-1][3] == rest:
            rows[-1][0].append(p.rank)
            rows[-1][2].append(p.ep_rank)
        else:
            rows.append([[p.rank], head, [p.ep_rank], rest])

    def span(xs):
        return str(xs[0]) if len(xs) == 1 else f"{xs[0]}-{xs[-1]}"

    for ranks, head, shards, rest in rows:
        table.add_row(span(ranks), *head, span(shards), *rest)
    console.print(table)
    if ns.breakdown:  # what the activations and transients of each stage are made of
        for p in plans:
            if p.dp_rank == 0 and p.ep_rank == 0:
                parts = ", ".join(f"{k} {v if k == 'microbatches in flight' else human(v)}" for k, v in p.parts.items())
                phases = ", ".join(f"{k} {human(v)}" for k, v in p.phases.items())
                print(f"stage {p.stage} ({p.curriculum_stage}): {parts}; phase peaks above the persistent state: "
                      f"{phases}")
    where = "fused Triton kernels (CUDA)" if gpu else "torch reference ops (CPU)"
    print(f"device memory per actor: {'unknown' if device is None else human(device)} ({source})")
    if device is not None:
        bad = [p.rank for p in plans if not p.fits(device)]
        worst = max(plans, key=lambda p: p.total)
        print(f"{len(plans) - len(bad)} of {len(plans)} actor(s) fit; the largest, rank {worst.rank}, needs "
              f"{human(worst.total)} ({worst.total / device:.0%} of {human(device)})"
              + (f"; do not fit: ranks {ranges(bad)}" if bad else ""))
    over = plans[0].overhead
    fits = device is None or all(p.fits(device) for p in plans)
    print(f"assumptions: everything float32 (ModelArgs has no dtype field); activations of the {where}, "
          f"activation checkpointing {'on' if cfg.activation_checkpointing else 'off'}, packed documents, balanced "
          f"expert loads; overhead {human(over)} per {'CUDA' if gpu else 'CPU'} actor"
          + ("" if ns.overhead is None else " (--overhead)") + "; see docs/memory.md")
    return fits


def add_parser(sub) -> argparse.ArgumentParser:
    """The ``tide plan`` subcommand."""
    pl = sub.add_parser(
        "plan", help="print a config's actor graph, schedule and per-actor memory plan (starts nothing)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Validate CONFIG (a training YAML) and print its actor graph: every stage actor with its\n"
                    "rack, layers and experts, the links by class, the per-stage pipeline schedule with its\n"
                    "simulated bubble, how each curriculum stage's batch splits into shards, microbatches and\n"
                    "waves, and the memory every actor needs at its peak (the model is built on the meta device\n"
                    "only; nothing is started).",
        epilog="""memory plan columns (bytes per actor, float32; cluster/launch/memory_plan.py, docs/memory.md):
  params       parameters + buffers of the actor's stage slice and expert shard (exact: meta build)
  grads        gradients of the parameters that train, in the curriculum stage where they weigh most (exact)
  optimizer    Muon / AdamW state of the parameters this replica owns under ZeRO-1 (exact)
  activations  saved-for-backward bytes per microbatch (a per-layer model of this code, checked against
               measured saved tensors) x the microbatches the schedule keeps in flight on the stage
               (1F1B: P - stage, GPipe: all), + pipeline receive buffers + the step's batch; with
               activation_checkpointing a block keeps its input and one block is recomputed at a time
  transient    the largest temporaries beyond that at the step's worst moment: backward's working set
               (loss gradients [b, S, vocab], expert-weight gradient accumulation, attention chunks),
               or the gradient all-reduce buckets, the global norm, the optimizer step, ZeRO-1 broadcasts
  overhead     per process (memory_plan.py's constants): CPU actor 480 MiB (measured: torch + tide + a Ray
               worker after a step), CUDA actor 2 GiB (an assumption: CUDA context, cuBLAS, NCCL buffers);
               --overhead replaces it
  total        the sum: the actor's peak; 'peak at' names the curriculum stage and phase that set it
assumptions: activations are modelled at the maximum over the curriculum; packed documents (doc_ids);
balanced expert loads; GPU actors run the fused Triton kernels, CPU actors the torch reference ops.""")
    pl.add_argument("config", help="training YAML, e.g. configs/pipeline.yaml")
    pl.add_argument("--device-memory", metavar="SIZE",
                    help="memory one actor may use, e.g. 141GB (an H200), 80GiB, 512MiB (units MB, GB, MiB, GiB); "
                         "default: this machine's GPU for GPU actors, its RAM divided by the actors for CPU actors")
    pl.add_argument("--overhead", metavar="SIZE",
                    help="per-process overhead to plan with instead of the built-in constant (same units)")
    pl.add_argument("--breakdown", action="store_true",
                    help="also print, per stage (replica 0, shard 0), what its activations and transients consist of")
    pl.add_argument("--check", action="store_true",
                    help="exit with status 1 when an actor does not fit the device memory (default: always 0)")
    pl.add_argument("--every-actor", action="store_true",
                    help="one table row per actor (default: consecutive actors with equal figures share a row)")
    pl.set_defaults(func=run)
    return pl
