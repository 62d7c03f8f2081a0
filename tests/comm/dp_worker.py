"""Worker of the data-parallel contract tests (runs in spawned gloo processes).

Every rank is a real ``StageWorker`` (replica, stage, expert shard) with ZeRO-1 optimizer
sharding; it compares the step's loss and its gradients with the single-process model on the
same global batch, then its parameters after several optimizer steps (clipping, Muon + AdamW on
the owners, broadcasts, auxiliary-loss-free bias update). It also records its memory
(``StageWorker.memory``) and the step's trace, for the test to assert on; results go to
``out_dir/rank<r>.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os

from actors.stage_worker import StageWorker
from cluster.launch.topology import Topology, build_graph
from model.optim import OptimConfig
from model.training import LossConfig
from tests.comm.pp_worker import ADAM_EPS, _max_err, debug_args, make_batch, reference

LR = 3e-3


def run(rank: int, world: int, D: int, P: int, E: int, M: int, W: int, steps: int, bucket_mb: float,
        out_dir: str) -> None:
    args = debug_args()
    topo = Topology(racks=["r0", "r1"], pipeline_stages=P, expert_parallel=E, data_parallel=D)
    graph = build_graph(topo, args.num_hidden_layers, args.n_routed_experts)
    B = D * E * M * W
    cfg = LossConfig(mode="sparse")
    ref_metrics, ref_grads, ref_params, ref_bufs = reference(args, B, cfg, steps, lr=LR, set_mode=False)

    w = StageWorker(graph, rank, args.to_dict(), init="sequential", microbatches=M, waves=W, trace=True,
                    optim=dataclasses.asdict(OptimConfig(lr=LR, warmup_steps=0, adam_eps=ADAM_EPS)),
                    bucket_mb=bucket_mb)
    w.setup("", 0)
    loss_cfg = dataclasses.asdict(cfg)
    metrics = w.forward_backward(make_batch(B, args.vocab_size), loss_cfg, None)
    events = w.trace_events()
    w.set_trace(False)
    gerr, gwhere, n = _max_err(w.stage, ref_grads, "grad")
    w.runner.clip_grad_norm(1.0)
    mem_before = w.memory()
    w.apply(LR, 1e-3)
    for s in range(1, steps):
        w.forward_backward(make_batch(B, args.vocab_size, seed=s), loss_cfg, 1.0)
        w.apply(LR, 1e-3)
    perr, pwhere, _ = _max_err(w.stage, ref_params, "param")
    berr = max((float((b - ref_bufs[n]).abs().max()) for n, b in w.stage.named_buffers() if n in ref_bufs),
               default=0.0)
    me = w.spec
    row = dict(rank=rank, dp=me.dp_rank, stage=me.stage, ep=me.ep_rank, loss=metrics["loss"],
               ref_loss=ref_metrics["loss"], grad_err=gerr, grad_where=gwhere, n_grads=n, param_err=perr,
               param_where=pwhere, bias_err=berr, memory=w.memory(), grads_bytes_at_step=mem_before["grads"],
               owned=sorted(w.owned), events=events)
    w.runner.close()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(row, f)
