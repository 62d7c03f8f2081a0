"""Worker of the memory-plan tests (runs in spawned gloo processes, ``comm.launch.spawn_local``).

Every rank is a real ``StageWorker`` of the config's actor graph: it trains one sparse-attention
step (forward + backward, then the optimizer step) and writes what it holds
(``StageWorker.memory()``: parameters, buffers, gradients after backward, optimizer state after the
step) to ``out_dir/rank<r>.json`` for the test to compare with ``cluster.launch.memory_plan``.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from actors.stage_worker import StageWorker
from cluster.data import sequences_per_batch
from cluster.launch.topology import build_graph, load_topology
from cluster.training.config import load_train_config, model_args_for
from cluster.training.trainer import optim_config
from model.losses import LossConfig


def run(rank: int, world: int, cfg_dict: dict, out_dir: str) -> None:
    cfg = load_train_config(cfg_dict)
    args = model_args_for(cfg, cfg.data.vocab_size)
    par = cfg.parallel
    graph = build_graph(load_topology(par.topology), args.num_hidden_layers, args.n_routed_experts)
    w = StageWorker(graph, rank, args.to_dict(), microbatches=par.microbatches, waves=par.waves,
                    optim=dataclasses.asdict(optim_config(cfg)))
    w.setup("", 0)
    st = cfg.curriculum[-1]
    w.set_attention_mode(st.attention)
    B, S = sequences_per_batch(st.batch_tokens, st.seq_len), st.seq_len
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab_size, (B, S + 1), generator=g)
    docs = torch.zeros(B, S, dtype=torch.long)
    docs[:, S // 2:] = 1
    labels = ids[:, 1:].clone()
    labels[:, S // 2 - 1] = -100
    batch = {"input_ids": ids[:, :-1], "labels": labels, "doc_ids": docs}
    loss_cfg = dataclasses.asdict(LossConfig(mode=st.attention, mtp_weight=st.mtp_weight))
    w.forward_backward(batch, loss_cfg, 1.0)
    after_backward = w.memory()
    w.apply(1e-3, 1e-3)
    after_step = w.memory()
    w.runner.close()
    row = {"rank": rank, "params": after_step["params"], "buffers": after_step["buffers"],
           "grads": after_backward["grads"], "optimizer": after_step["optimizer"]}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(row, f)
