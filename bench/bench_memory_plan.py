#!/usr/bin/env python
"""The memory plan (``cluster.launch.memory_plan``, ``tide plan``) against what real training steps use.

Each measurement prints a table with the plan's figure, the measured one and their ratio:

1. **saved for backward** (``--saved``; ``--saved-kernels`` for the fused Triton kernels' path): the
   activation model (``memory_plan.saved_bytes``) against the bytes of the distinct tensors
   autograd keeps when a forward + the losses end, counted with
   ``torch.autograd.graph.saved_tensors_hooks`` on real CPU forwards of the ``debug`` and
   ``small`` flavors (every attention mode, with and without activation checkpointing);
2. **peak memory of real runs** (the layouts, default ``small-1x1,small-2x2,small-d2,debug-d2p2``):
   a short curriculum (dense, indexer warm-up, sparse; ``--steps`` each) of real
   ``actors.stage_worker.StageWorker``s on local gloo processes (``comm.launch.spawn_local``):
   per actor the plan's params / buffers / grads / optimizer (exact: they must equal
   ``StageWorker.memory()``) and its total against the process's peak resident set (``VmHWM``),
   overall and split into ``forward_backward()`` and ``apply()``, the plan computed with the
   overhead constant of such a process (``CPU_PROCESS_OVERHEAD``);
3. **per-process overhead** (``--overhead``): the resident set of a stage-worker process and of a
   Ray actor, idle and after one tiny training step (where ``CPU_PROCESS_OVERHEAD`` /
   ``CPU_ACTOR_OVERHEAD`` come from).

    PYTHONPATH=. python bench/bench_memory_plan.py --saved --overhead      # everything (about 7 min on 2 cores)
    PYTHONPATH=. python bench/bench_memory_plan.py --layouts debug-d2p2
    PYTHONPATH=. python bench/bench_memory_plan.py --saved --layouts ''
    TRITON_INTERPRET=1 PYTHONPATH=. python bench/bench_memory_plan.py --saved-kernels --layouts ''
    PYTHONPATH=. python bench/bench_memory_plan.py --overhead --layouts ''

Progress goes to stderr; the last line of stdout is one JSON object with every figure printed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MiB = 1 << 20

# Layouts: a model flavor, a topology and the microbatching; the curriculum is CURRICULUM at SEQ_LEN.
LAYOUTS = {
    "small-1x1": dict(flavor="small", D=1, P=1, E=1, M=1, W=1, threads=2),
    "small-2x2": dict(flavor="small", D=1, P=2, E=2, M=2, W=1, threads=1),
    "small-d2": dict(flavor="small", D=2, P=1, E=1, M=1, W=1, threads=1),
    "debug-d2p2": dict(flavor="debug", D=2, P=2, E=1, M=2, W=1, threads=1),
}
DEFAULT_LAYOUTS = ("small-1x1", "small-2x2", "small-d2", "debug-d2p2")


def train_config(layout: dict, seq_len: int, batch_tokens: int, steps: int) -> dict:
    """The training-config dict of a benchmark layout (``cluster.training.config`` schema)."""
    from model import ModelArgs

    vocab = ModelArgs.flavor(layout["flavor"]).vocab_size
    D, P, E = layout["D"], layout["P"], layout["E"]
    topo = {"pipeline_stages": P, "expert_parallel": E, "data_parallel": D, "cpus_per_actor": 1}
    if (D, P, E) != (1, 1, 1):
        topo["racks"] = [f"r{i}" for i in range(max(D * P, 1))]
    return {
        "name": "bench-memory-plan", "storage_path": tempfile.gettempdir(), "deterministic": False,
        "model": {"flavor": layout["flavor"]}, "data": {"vocab_size": vocab},
        "parallel": {"topology": topo, "microbatches": layout["M"], "waves": layout["W"]},
        "curriculum": [
            {"name": "dense", "seq_len": seq_len, "batch_tokens": batch_tokens, "steps": steps, "attention": "dense"},
            {"name": "warmup", "seq_len": seq_len, "batch_tokens": batch_tokens, "steps": steps,
             "attention": "indexer_warmup", "mtp_weight": 0.0},
            {"name": "sparse", "seq_len": seq_len, "batch_tokens": batch_tokens, "steps": steps,
             "attention": "sparse"},
        ],
    }


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status (Linux only)")


def _reset_peak() -> None:
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak resident set (VmHWM) restarts from the current one


def make_batch(B: int, S: int, vocab: int, seed: int) -> dict:
    """A packed-looking batch ``[B, S]``: random tokens, a document boundary in every sequence
    (``doc_ids`` 0 then 1, the label before it ignored)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, S + 1), generator=g)
    docs = torch.zeros(B, S, dtype=torch.long)
    cut = torch.randint(S // 4, 3 * S // 4, (B,), generator=g)
    labels = ids[:, 1:].clone()
    for i, c in enumerate(cut.tolist()):
        docs[i, c:] = 1
        labels[i, c - 1] = -100
    return {"input_ids": ids[:, :-1].contiguous(), "labels": labels, "doc_ids": docs}


def run_actor(rank: int, world: int, cfg_dict: dict, out_dir: str) -> None:
    """One stage actor of a layout (in a ``spawn_local`` process): a real ``StageWorker`` trains the
    config's curriculum; writes ``rank<r>.json`` with its ``memory()`` readings and peak RSS."""
    import dataclasses

    import torch

    from actors.stage_worker import StageWorker
    from cluster.data import sequences_per_batch
    from cluster.launch.topology import build_graph, load_topology
    from cluster.training.config import load_train_config, model_args_for
    from cluster.training.trainer import optim_config
    from model.losses import LossConfig

    rss_start = _status("VmRSS")
    cfg = load_train_config(cfg_dict)
    args = model_args_for(cfg, cfg.data.vocab_size)
    par = cfg.parallel
    graph = build_graph(load_topology(par.topology), args.num_hidden_layers, args.n_routed_experts)
    w = StageWorker(graph, rank, args.to_dict(), seed=cfg.seed, microbatches=par.microbatches, waves=par.waves,
                    expert_waves=par.expert_waves, schedule=par.schedule, optim=dataclasses.asdict(optim_config(cfg)),
                    activation_checkpointing=cfg.activation_checkpointing, deterministic=False,
                    bucket_mb=par.bucket_mb)
    w.setup("", 0)
    row = {"rank": rank, "rss_start": rss_start, "grads": 0, "optimizer": 0, "stages": {}}
    step = 0
    _reset_peak()
    for st in cfg.curriculum:
        w.set_attention_mode(st.attention)
        loss_cfg = dataclasses.asdict(LossConfig(mode=st.attention, mtp_weight=st.mtp_weight,
                                                 balance_weight=cfg.balance.sequence_weight,
                                                 mtp_balance=cfg.balance.mtp))
        B = sequences_per_batch(st.batch_tokens, st.seq_len)
        t0 = time.perf_counter()
        fb = ap = 0
        for _ in range(st.num_steps()):
            _reset_peak()
            w.forward_backward(make_batch(B, st.seq_len, args.vocab_size, step), loss_cfg, cfg.optim.grad_clip)
            mem = w.memory()
            fb = max(fb, mem["peak_rss"])
            row["grads"] = max(row["grads"], mem["grads"])
            _reset_peak()
            w.apply(1e-4, cfg.balance.bias_update_speed if st.attention != "indexer_warmup" else None)
            ap = max(ap, _status("VmHWM"))
            step += 1
        mem = w.memory()
        row["optimizer"] = max(row["optimizer"], mem["optimizer"])
        row["stages"][st.name] = {"peak_rss": max(fb, ap), "forward_backward_rss": fb, "apply_rss": ap,
                                  "step_s": (time.perf_counter() - t0) / st.num_steps()}
    row.update(params=mem["params"], buffers=mem["buffers"],
               peak_rss=max(s["peak_rss"] for s in row["stages"].values()),
               forward_backward_rss=max(s["forward_backward_rss"] for s in row["stages"].values()),
               apply_rss=max(s["apply_rss"] for s in row["stages"].values()))
    w.runner.close()
    torch.distributed.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(row, f)


def bench_layout(name: str, seq_len: int, batch_tokens: int, steps: int, timeout_s: float) -> dict:
    """Plan and measure one layout (``LAYOUTS[name]``); prints a per-actor table, returns its figures."""
    from cluster.launch.memory_plan import CPU_PROCESS_OVERHEAD, plan_memory
    from cluster.launch.topology import build_graph, load_topology
    from cluster.training.config import load_train_config, model_args_for
    from comm.launch import spawn_local

    layout = LAYOUTS[name]
    cfg_dict = train_config(layout, seq_len, batch_tokens, steps)
    cfg = load_train_config(cfg_dict)
    args = model_args_for(cfg, cfg.data.vocab_size)
    graph = build_graph(load_topology(cfg.parallel.topology), args.num_hidden_layers, args.n_routed_experts)
    plans = plan_memory(cfg, graph, args, overhead=CPU_PROCESS_OVERHEAD)
    world = len(graph.actors)
    print(f"[{name}] {graph.shape()}, flavor {layout['flavor']}, seq_len {seq_len}, {batch_tokens} tokens/step, "
          f"{layout['M']} microbatch(es), {steps} step(s) per curriculum stage: running {world} process(es) ...",
          file=sys.stderr)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        spawn_local(run_actor, world, cfg_dict, out, threads=layout["threads"], timeout_s=timeout_s)
        rows = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    wall = time.perf_counter() - t0
    actors = []
    print(f"\n{name}: {graph.shape()} ({layout['flavor']} flavor, S={seq_len}, {batch_tokens} tokens/step, "
          f"M={layout['M']}), {wall:.0f} s")
    print("MiB per actor; exact: params, buffers, grads and optimizer equal StageWorker.memory(); total: the plan "
          "against the peak RSS (VmHWM) of the run; by phase: the plan's forward+backward (backward, grad reduce) "
          "and optimizer-step (step, broadcast) peaks against the peak RSS inside forward_backward() and apply()")
    print(f"{'rank':>4} {'dp/st/ep':>8} | {'params':>8} {'grads':>8} {'optim':>8} exact | {'planned':>8} "
          f"{'peak RSS':>8} {'ratio':>6} | {'plan f+b':>8} {'RSS f+b':>8} {'ratio':>6} | {'plan opt':>8} "
          f"{'RSS opt':>8} {'ratio':>6} | peak at (plan / measured)")
    for p, r in zip(plans, rows, strict=True):
        exact = (p.params == r["params"] and p.buffers == r["buffers"] and p.grads == r["grads"]
                 and p.optimizer == r["optimizer"])
        ratio = p.total / r["peak_rss"]
        base = p.total - p.activations - p.transient
        plan_fb = base + max(p.phases["backward"], p.phases["grad reduce"])
        plan_ap = base + max(p.phases["optimizer step"], p.phases["param broadcast"])
        fb, ap = r["forward_backward_rss"], r["apply_rss"]
        peak_stage = max(r["stages"], key=lambda k: r["stages"][k]["peak_rss"])
        phase = "forward_backward" if fb >= ap else "apply"
        print(f"{p.rank:>4} {p.dp_rank:>2}/{p.stage}/{p.ep_rank:<3} | {p.params / MiB:>8.1f} {p.grads / MiB:>8.1f} "
              f"{p.optimizer / MiB:>8.1f} {'yes' if exact else 'NO':>5} | {p.total / MiB:>8.1f} "
              f"{r['peak_rss'] / MiB:>8.1f} {ratio:>6.3f} | {plan_fb / MiB:>8.1f} {fb / MiB:>8.1f} "
              f"{plan_fb / fb:>6.3f} | {plan_ap / MiB:>8.1f} {ap / MiB:>8.1f} {plan_ap / ap:>6.3f} | "
              f"{p.curriculum_stage} {p.peak_phase} / {peak_stage} {phase}")
        actors.append({"rank": p.rank, "dp_rank": p.dp_rank, "stage": p.stage, "ep_rank": p.ep_rank, "exact": exact,
                       "planned_mib": round(p.total / MiB, 1), "peak_rss_mib": round(r["peak_rss"] / MiB, 1),
                       "ratio": round(ratio, 3), "rss_start_mib": round(r["rss_start"] / MiB, 1),
                       "planned_forward_backward_mib": round(plan_fb / MiB, 1),
                       "forward_backward_rss_mib": round(fb / MiB, 1), "forward_backward_ratio": round(plan_fb / fb, 3),
                       "planned_optimizer_mib": round(plan_ap / MiB, 1), "apply_rss_mib": round(ap / MiB, 1),
                       "optimizer_ratio": round(plan_ap / ap, 3), "measured_peak_in": phase,
                       "params_mib": round(p.params / MiB, 2), "grads_mib": round(p.grads / MiB, 2),
                       "optimizer_mib": round(p.optimizer / MiB, 2), "measured_optimizer_mib":
                       round(r["optimizer"] / MiB, 2), "activations_mib": round(p.activations / MiB, 1),
                       "transient_mib": round(p.transient / MiB, 1), "plan_stage": p.curriculum_stage,
                       "plan_phase": p.peak_phase,
                       "measured_by_stage_mib": {k: round(v["peak_rss"] / MiB, 1) for k, v in r["stages"].items()},
                       "step_s": {k: round(v["step_s"], 2) for k, v in r["stages"].items()}})
    worst = max(abs(a["ratio"] - 1) for a in actors)
    print(f"{name}: every exact part equals StageWorker.memory(): {all(a['exact'] for a in actors)}; "
          f"plan / peak RSS within {worst:.1%}")
    return {"layout": name, "shape": graph.shape(), **{k: layout[k] for k in ("flavor", "D", "P", "E", "M", "W")},
            "seq_len": seq_len, "batch_tokens": batch_tokens, "steps": steps, "wall_s": round(wall, 1),
            "actors": actors, "max_abs_error": round(worst, 3)}


# ------------------------------------------------------------------------- saved for backward
def measure_saved(args, b: int, S: int, mode: str, remat: bool = False, kernels: bool = False) -> dict[str, int]:
    """Bytes of the distinct storages autograd keeps for backward after one forward + the losses of
    ``model.stage.PipelineStage.whole`` on ``b`` random packed sequences of ``S`` tokens, by part
    (``layers.<i>``, ``head``, ``loss``, ``mtp``); parameters, buffers and the batch's tensors excluded.
    ``kernels``: run the fused Triton kernels (``kernels.forced()``; on the CPU under ``TRITON_INTERPRET=1``)."""
    import torch

    import kernels as tide_kernels
    from model import Transformer
    from model.losses import LossConfig
    from model.remat import checkpointed
    from model.stage import PipelineStage
    from model.training import set_attention_mode

    torch.manual_seed(0)
    m = Transformer(args)
    set_attention_mode(m, mode)
    st = PipelineStage.whole(m)
    batch = make_batch(b, S, args.vocab_size, 1)
    skip = {t.untyped_storage().data_ptr() for t in [*m.parameters(), *m.buffers(), *batch.values()]}
    names = {mod: n for n, mod in m.named_modules()}
    stack = ["loss"]

    def enter(mod, inp):
        stack.append(names.get(mod, "?"))

    def leave(mod, inp, out):
        stack.pop()

    hooks = [h for mod in m.modules() for h in (mod.register_forward_pre_hook(enter), mod.register_forward_hook(leave))]
    held: dict[int, tuple[int, str]] = {}

    def pack(t):
        with contextlib.suppress(RuntimeError, NotImplementedError):
            s = t.untyped_storage()
            if s.data_ptr() not in skip:
                held.setdefault(s.data_ptr(), (s.nbytes(), stack[-1]))
        return t

    def call(block, *a):  # checkpointed, with the block named while checkpoint saves its inputs
        stack.append(names[block])
        try:
            return checkpointed(block, *a)
        finally:
            stack.pop()

    cfg = LossConfig(mode=mode, mtp_weight=0.0 if mode == "indexer_warmup" else 0.3)
    fused = tide_kernels.forced() if kernels else contextlib.nullcontext()
    with fused, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, aux = st(None, batch["input_ids"], batch["doc_ids"], call=call if remat else None)
        st.losses(out, aux, batch, st.loss_norms(batch), cfg, call=call if remat else None)
    for h in hooks:
        h.remove()
    parts: dict[str, int] = collections.Counter()
    for nbytes, where in held.values():
        m_ = re.match(r"(layers\.\d+|mtp|hc_head|norm)", where)
        part = {"hc_head": "head", "norm": "head"}.get(m_.group(1), m_.group(1)) if m_ else "loss"
        parts[part] += nbytes
    return dict(parts)


SAVED_CASES = [  # flavor, b, S, mode, remat
    ("debug", 2, 256, "dense", False), ("debug", 2, 256, "indexer_warmup", False), ("debug", 2, 256, "sparse", False),
    ("debug", 1, 300, "sparse", False), ("debug", 2, 256, "sparse", True), ("debug", 1, 512, "indexer_warmup", True),
    ("small", 1, 512, "dense", False), ("small", 1, 512, "sparse", False), ("small", 2, 512, "sparse", False),
    ("small", 1, 1024, "indexer_warmup", False), ("small", 2, 512, "sparse", True),
]


KERNEL_CASES = [("debug", 2, 128, "sparse", False), ("debug", 1, 160, "dense", False)]


def bench_saved(cases=SAVED_CASES, kernels: bool = False) -> list[dict]:
    """The activation model against measured saved-for-backward bytes; prints a table. ``kernels``: the
    fused Triton kernels' path (``TRITON_INTERPRET=1`` on a CPU)."""
    from cluster.launch.memory_plan import saved_bytes
    from model import ModelArgs

    path = "fused Triton kernels" + (" (interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else "") \
        if kernels else "torch reference ops, CPU"
    print(f"\nsaved for backward, one forward + losses ({path}): model vs measured")
    print(f"{'flavor':>6} {'b':>2} {'S':>5} {'mode':>15} {'remat':>5} | {'model':>10} {'measured':>10} {'ratio':>6} "
          f"| worst part")
    out = []
    for flavor, b, S, mode, remat in cases:
        args = ModelArgs.flavor(flavor)
        got = measure_saved(args, b, S, mode, remat, kernels)
        want = saved_bytes(args, range(args.num_hidden_layers), first=True, last=True, b=b, S=S, mode=mode,
                           mtp=mode != "indexer_warmup", remat=remat, kernels=kernels)
        want.pop("recompute", None)
        parts = sorted(set(got) | set(want))
        worst = max(parts, key=lambda k: abs(want.get(k, 0) - got.get(k, 0)))
        tw, tg = sum(want.values()), sum(got.values())
        wr = want.get(worst, 0) / got[worst] if got.get(worst) else float("nan")
        print(f"{flavor:>6} {b:>2} {S:>5} {mode:>15} {'on' if remat else 'off':>5} | {tw / MiB:>8.2f}Mi "
              f"{tg / MiB:>8.2f}Mi {tw / tg:>6.3f} | {worst} {wr:.3f}")
        out.append({"flavor": flavor, "b": b, "S": S, "mode": mode, "remat": remat, "kernels": kernels,
                    "model_mib": round(tw / MiB, 3),
                    "measured_mib": round(tg / MiB, 3), "ratio": round(tw / tg, 4)})
    return out


# ------------------------------------------------------------------------------------ overhead
def overhead_probe() -> dict:
    """In this process (a gloo group of one joined, or none yet): the resident set after importing what
    a stage actor imports (``idle``), then after a 1 x 1 ``debug``-flavor ``StageWorker`` was set up
    and trained one tiny step (one sequence of 64 tokens, sparse attention) minus the tensors it then
    holds (``working``: the code pages torch touched, the meta-build machinery, autograd, gloo). Bytes."""
    import dataclasses

    import torch.distributed as dist

    import actors.stage_worker  # noqa: F401  (what a stage actor imports)
    import cluster.training.trainer  # noqa: F401
    from actors.stage_worker import StageWorker
    from cluster.launch.topology import build_graph, single_actor
    from comm.launch import free_port
    from model import ModelArgs
    from model.losses import LossConfig

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    idle = _status("VmRSS")
    args = ModelArgs.flavor("debug")
    graph = build_graph(single_actor(), args.num_hidden_layers, args.n_routed_experts)
    w = StageWorker(graph, 0, args.to_dict())
    w.setup("", 0)
    w.set_attention_mode("sparse")
    w.forward_backward(make_batch(1, 64, args.vocab_size, 0), dataclasses.asdict(LossConfig()), 1.0)
    w.apply(1e-4, 1e-3)
    mem = w.memory()
    tensors = mem["params"] + mem["buffers"] + mem["optimizer"] + mem["grads"]
    w.runner.close()
    return {"idle": idle, "working": _status("VmRSS") - tensors}


def _overhead_process(rank: int, world: int, out_dir: str) -> None:
    with open(os.path.join(out_dir, f"overhead{rank}.json"), "w") as f:
        json.dump(overhead_probe(), f)


def bench_overhead() -> dict:
    """``overhead_probe`` in a ``spawn_local`` process and in a Ray actor (where ``CPU_PROCESS_OVERHEAD``
    and ``CPU_ACTOR_OVERHEAD`` come from); prints them."""
    from comm.launch import spawn_local

    with tempfile.TemporaryDirectory() as out:
        spawn_local(_overhead_process, 1, out)
        proc = json.loads(Path(out, "overhead0.json").read_text())
    res = {"process_idle_mib": round(proc["idle"] / MiB, 1), "process_working_mib": round(proc["working"] / MiB, 1)}
    try:
        import ray

        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        probe = ray.remote(num_cpus=1)(_RayProbe).remote()
        got = ray.get(probe.run.remote())
        res.update(ray_actor_idle_mib=round(got["idle"] / MiB, 1), ray_actor_working_mib=round(got["working"] / MiB, 1))
        ray.shutdown()
    except Exception as e:  # noqa: BLE001 - report it, the other figures stand
        res["ray_actor_error"] = f"{type(e).__name__}: {e}"
    print(f"\nper-process overhead (resident set without tensors): {res}")
    return res


class _RayProbe:
    def run(self) -> dict:
        import torch

        torch.set_num_threads(1)
        return overhead_probe()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="The memory plan against measured saved-for-backward bytes and the peak "
                                            "RSS of real training steps (see the module docstring).")
    p.add_argument("--layouts", default=",".join(DEFAULT_LAYOUTS),
                   help=f"comma-separated, of {sorted(LAYOUTS)} (default: %(default)s); '' for none")
    p.add_argument("--seq-len", type=int, default=512, help="sequence length (default: %(default)s)")
    p.add_argument("--batch-tokens", type=int, default=2048, help="tokens per step (default: %(default)s)")
    p.add_argument("--steps", type=int, default=1, help="steps per curriculum stage (default: %(default)s)")
    p.add_argument("--saved", action="store_true", help="also check the activation model against saved tensors")
    p.add_argument("--saved-kernels", action="store_true",
                   help="also check the fused Triton kernels' path (slow on a CPU: set TRITON_INTERPRET=1)")
    p.add_argument("--overhead", action="store_true", help="also measure the per-process overhead")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per layout")
    ns = p.parse_args(argv)
    layouts = [x for x in ns.layouts.split(",") if x]
    bad = [x for x in layouts if x not in LAYOUTS]
    if bad:
        p.error(f"unknown layout(s) {bad}; choose from {sorted(LAYOUTS)}")
    res: dict = {}
    if ns.overhead:
        res["overhead"] = bench_overhead()
    if ns.saved:
        res["saved"] = bench_saved()
    if ns.saved_kernels:
        res["saved_kernels"] = bench_saved(KERNEL_CASES, kernels=True)
    res["layouts"] = [bench_layout(x, ns.seq_len, ns.batch_tokens, ns.steps, ns.timeout) for x in layouts]
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
