"""Worker of the pipeline x expert-parallel contract tests (runs in spawned gloo processes).

Every rank builds the single-process reference model (same seed), runs the whole
batch through it, and compares its own stage/shard's loss and gradients, and its
parameters after several optimizer steps, with the reference. Results go to
``out_dir/rank<r>.json`` for the test to assert on.
"""

from __future__ import annotations

import json
import os

import torch

from cluster.launch.topology import Topology, build_graph
from comm.pipeline import PipelineRunner
from comm.transport import build_mesh
from model import ModelArgs, Transformer
from model.optim import CombinedOptimizer, OptimConfig
from model.stage import PipelineStage, is_expert_param
from model.training import LossConfig, compute_losses, set_attention_mode, update_router_biases

SEQ = 64
# AdamW eps: the recipe's 1e-20 turns near-zero gradients into +-lr sign steps, so 1e-7 reduction-order
# noise flips whole updates; 1e-8 keeps the update continuous in the gradient for the comparison.
ADAM_EPS = 1e-8


def debug_args() -> ModelArgs:
    return ModelArgs.flavor("debug", index_n_heads=8)


def make_batch(B: int, vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, SEQ + 1), generator=g)
    docs = torch.zeros(B, SEQ, dtype=torch.long)
    docs[::2, 40:] = 1  # every other sequence packs two documents
    labels = ids[:, 1:].clone()
    labels[::2, 39] = -100
    return {"input_ids": ids[:, :-1], "labels": labels, "doc_ids": docs}


def _stage_view(stage: PipelineStage, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: (full[n][stage.expert_lo:stage.expert_hi] if is_expert_param(n) and full[n] is not None else full[n])
            for n, _ in stage.named_parameters()}


def _max_err(stage: PipelineStage, ref: dict[str, torch.Tensor], attr: str) -> tuple[float, str, int]:
    worst, where, n = 0.0, "", 0
    view = _stage_view(stage, ref)
    for name, p in stage.named_parameters():
        mine = p.grad if attr == "grad" else p.detach()
        want = view[name]
        if mine is None and want is None:
            continue
        if (mine is None) != (want is None):
            return float("inf"), f"{name}: grad presence differs", n
        n += 1
        if mine is None:
            continue
        err = float((mine - want).abs().max()) if mine.numel() else 0.0
        if err > worst:
            worst, where = err, name
    return worst, where, n


def reference(args: ModelArgs, B: int, cfg: LossConfig, steps: int, lr: float = 3e-3, set_mode: bool = True):
    """The single-process model (seed 0) on ``make_batch(B)``: ``(metrics, grads of step 0, parameters
    after ``steps`` clipped Muon + AdamW steps with the bias update (None when 0), router biases)``.
    ``set_mode``: put the model in ``cfg.mode`` first (False: the model's default attention mode)."""
    torch.manual_seed(0)
    ref = Transformer(args)
    if set_mode:
        set_attention_mode(ref, cfg.mode)
    loss, metrics, aux = compute_losses(ref, make_batch(B, args.vocab_size), cfg)
    loss.backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in ref.named_parameters()}
    params = bufs = None
    if steps:
        opt = CombinedOptimizer(ref, OptimConfig(lr=lr, warmup_steps=0, adam_eps=ADAM_EPS))
        for s in range(steps):
            if s:
                opt.zero_grad()
                loss, _, aux = compute_losses(ref, make_batch(B, args.vocab_size, seed=s), cfg)
                loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in ref.parameters() if p.grad is not None], 1.0)
            opt.step()
            if cfg.mode != "indexer_warmup":
                update_router_biases(ref, aux.routing, 1e-3)
        params = {n: p.detach().clone() for n, p in ref.named_parameters()}
        bufs = {n: b.clone() for n, b in ref.named_buffers() if n.endswith("e_score_correction_bias")}
    return metrics, grads, params, bufs


def run(rank: int, world: int, P: int, E: int, M: int, jobs: list[tuple[str, list[int], int]],
        out_dir: str) -> None:
    """``jobs``: ``(attention mode, waves to try, optimizer steps)``; B = E * M * max(waves) sequences."""
    args = debug_args()
    graph = build_graph(Topology(racks=["r0", "r1"], pipeline_stages=P, expert_parallel=E),
                        args.num_hidden_layers, args.n_routed_experts)
    mesh = build_mesh(graph, rank, tied_embedding=args.num_nextn_predict_layers > 0)
    me = next(a for a in graph.actors if a.rank == rank)
    lo, hi = graph.layer_slices[me.stage]
    B = E * M * max(w for _, ws, _ in jobs for w in ws)
    results = []
    for mode, waves, steps in jobs:
        cfg = LossConfig(mode=mode)
        ref_metrics, ref_grads, ref_params, ref_bufs = reference(args, B, cfg, steps)
        for W in waves:
            torch.manual_seed(0)
            stage = PipelineStage.from_model(Transformer(args), lo, hi, lo == 0, hi == args.num_hidden_layers,
                                              me.ep_rank, E)
            set_attention_mode(stage, mode)
            runner = PipelineRunner(stage, mesh, microbatches=M, waves=W)
            metrics = runner.forward_backward(make_batch(B, args.vocab_size), cfg)
            gerr, gwhere, n = _max_err(stage, ref_grads, "grad")
            row = dict(rank=rank, stage=me.stage, ep=me.ep_rank, mode=mode, W=W, loss=metrics["loss"],
                       ref_loss=ref_metrics["loss"], grad_err=gerr, grad_where=gwhere, n_grads=n,
                       expert_waves=runner.expert_waves)
            if steps:
                opt = CombinedOptimizer(stage, OptimConfig(lr=3e-3, warmup_steps=0, adam_eps=ADAM_EPS))
                for s in range(steps):
                    if s:
                        opt.zero_grad()
                        runner.forward_backward(make_batch(B, args.vocab_size, seed=s), cfg)
                    runner.clip_grad_norm(1.0)
                    opt.step()
                    if mode != "indexer_warmup":
                        runner.update_router_biases(1e-3)
                perr, pwhere, _ = _max_err(stage, ref_params, "param")
                berr = max((float((b - ref_bufs[n]).abs().max()) for n, b in stage.named_buffers()
                            if n in ref_bufs), default=0.0)
                row.update(param_err=perr, param_where=pwhere, bias_err=berr)
            runner.close()
            results.append(row)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
