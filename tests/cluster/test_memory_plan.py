"""The per-actor memory plan (``cluster.launch.memory_plan``, ``tide plan``).

- the exact parts (parameters, buffers, gradients, ZeRO-1 optimizer state) equal what real
  ``StageWorker``s hold (debug flavor, 2 replicas x 2 stages on local gloo processes), and the
  optimizer state per actor falls to about 1/D;
- the analytic saved-for-backward model matches the bytes autograd keeps (counted with
  ``saved_tensors_hooks``) on real CPU forwards, in every attention mode, with and without
  activation checkpointing;
- the meta build allocates nothing; sizes parse with their units;
- ``tide plan`` prints the table and honours ``--device-memory``; the GPU configs validate and
  every actor of them fits an H200.

The peak-RSS comparison of real runs (slow, noisy) is ``bench/bench_memory_plan.py``'s.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from cluster.launch.memory_plan import (
    GiB,
    MiB,
    meta_stages,
    parse_bytes,
    plan_memory,
    saved_bytes,
)
from cluster.launch.topology import build_graph, load_topology
from cluster.training.config import load_train_config, model_args_for
from model import ModelArgs

ROOT = Path(__file__).resolve().parents[2]


def _config(D: int, P: int, E: int, M: int) -> dict:
    return {"name": "memory-plan-test", "model": {"flavor": "debug"}, "data": {"vocab_size": 512},
            "parallel": {"topology": {"racks": ["r0", "r1"], "data_parallel": D, "pipeline_stages": P,
                                      "expert_parallel": E}, "microbatches": M},
            "curriculum": [{"name": "dense", "seq_len": 64, "batch_tokens": 64 * D * E * M, "steps": 1,
                            "attention": "dense"},
                           {"name": "sparse", "seq_len": 64, "batch_tokens": 64 * D * E * M, "steps": 1,
                            "attention": "sparse", "mtp_weight": 0.3}]}


def _plan(cfg_dict: dict):
    cfg = load_train_config(cfg_dict)
    args = model_args_for(cfg, cfg.data.vocab_size)
    graph = build_graph(load_topology(cfg.parallel.topology), args.num_hidden_layers, args.n_routed_experts)
    return plan_memory(cfg, graph, args), graph


def test_exact_parts_equal_what_stage_workers_hold(tmp_path):
    from comm.launch import spawn_local
    from tests.cluster import memory_worker

    cfg = _config(D=2, P=2, E=1, M=2)
    plans, graph = _plan(cfg)
    spawn_local(memory_worker.run, len(graph.actors), cfg, str(tmp_path), timeout_s=300)
    rows = {r["rank"]: r for r in (json.loads(f.read_text()) for f in tmp_path.glob("rank*.json"))}
    assert sorted(rows) == [a.rank for a in graph.actors]
    for p in plans:
        got = rows[p.rank]
        where = f"rank {p.rank} (replica {p.dp_rank}, stage {p.stage})"
        assert (p.params, p.buffers, p.grads, p.optimizer) == (got["params"], got["buffers"], got["grads"],
                                                               got["optimizer"]), where
        assert p.params > 0 and p.grads == p.params  # sparse training with MTP: every parameter trains
    # ZeRO-1: the replicas of a stage split its optimizer state (whole tensors, balanced by size)
    whole, _ = _plan(_config(D=1, P=2, E=1, M=2))
    for s in range(2):
        reps = [p.optimizer for p in plans if p.stage == s]
        total = next(p.optimizer for p in whole if p.stage == s)
        assert sum(reps) == total and len(reps) == 2
        assert max(reps) <= 1.25 * total / 2, (s, reps, total)


def _measured_saved(args: ModelArgs, b: int, S: int, mode: str, remat: bool) -> int:
    """Bytes of the distinct storages autograd keeps after a forward + losses (parameters, buffers
    and the batch excluded)."""
    from model import Transformer
    from model.losses import LossConfig
    from model.remat import checkpointed
    from model.stage import PipelineStage
    from model.training import set_attention_mode

    torch.manual_seed(0)
    model = Transformer(args)
    set_attention_mode(model, mode)
    st = PipelineStage.whole(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab_size, (b, S + 1), generator=g)
    docs = torch.zeros(b, S, dtype=torch.long)
    docs[:, S // 3:] = 1
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "doc_ids": docs}
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), *batch.values(), ids]}
    held: dict[int, int] = {}

    def pack(t):
        with contextlib.suppress(RuntimeError, NotImplementedError):
            s = t.untyped_storage()
            if s.data_ptr() not in skip:
                held[s.data_ptr()] = s.nbytes()
        return t

    call = checkpointed if remat else None
    cfg = LossConfig(mode=mode, mtp_weight=0.0 if mode == "indexer_warmup" else 0.3)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, aux = st(None, batch["input_ids"], batch["doc_ids"], call=call)
        st.losses(out, aux, batch, st.loss_norms(batch), cfg, call=call)
    return sum(held.values())


@pytest.mark.parametrize("b,S,mode,remat", [
    (2, 256, "dense", False), (1, 300, "sparse", False), (2, 192, "sparse", False),
    (2, 256, "indexer_warmup", False), (1, 256, "indexer_warmup", False), (2, 128, "sparse", True),
])
def test_activation_model_matches_saved_tensors(b, S, mode, remat):
    args = ModelArgs.flavor("debug")
    want = saved_bytes(args, range(args.num_hidden_layers), first=True, last=True, b=b, S=S, mode=mode,
                       mtp=mode != "indexer_warmup", remat=remat)
    want.pop("recompute", None)
    got = _measured_saved(args, b, S, mode, remat)
    assert got > 0
    assert abs(sum(want.values()) / got - 1) < 0.02, (sum(want.values()) / MiB, got / MiB)


def test_meta_build_allocates_nothing():
    args = ModelArgs.flavor("v4-flash")
    graph = build_graph(load_topology({"racks": ["r0", "r1"], "pipeline_stages": 8, "expert_parallel": 8}),
                        args.num_hidden_layers, args.n_routed_experts)
    stages = meta_stages(args, graph)
    assert sorted(stages) == list(range(8))
    tensors = [t for st in stages.values() for t in (*st.parameters(), *st.buffers())]
    assert tensors and all(t.is_meta for t in tensors)
    # the stages tile the model: every decoder layer once, experts sliced to 1/8, the last stage's MTP
    from model import Transformer
    from model.transformer import meta_device

    with meta_device():
        full = Transformer(args)
    n = full.num_params()
    experts = sum(p.numel() for name, p in full.named_parameters() if ".experts." in name)
    embed = full.embed_tokens.weight.numel()  # the MTP copy on the last stage
    assert sum(p.numel() for st in stages.values() for p in st.parameters()) == \
        n["total"] + n["mtp"] - experts + experts // 8 + embed


def test_parse_bytes():
    assert parse_bytes("141GB") == 141 * 10**9
    assert parse_bytes("80 GiB") == 80 * GiB
    assert parse_bytes("512MiB") == 512 * MiB and parse_bytes("1.5gb") == 15 * 10**8
    for bad, msg in (("12", "has no unit"), ("12TB", "unknown unit"), ("GB", "expected a number"),
                     ("-3GB", "expected a number"), ("0GB", "must be > 0")):
        with pytest.raises(ValueError, match=msg):
            parse_bytes(bad)


def _tide(capsys, *args: str) -> tuple[int, str, str]:
    """``tide ARGS`` in this process: ``(exit status, stdout, stderr)``."""
    from cli.main import main

    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_plan_prints_the_memory_table_and_verdicts(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    rc, out, err = _tide(capsys, "plan", "configs/pipeline.yaml", "--device-memory", "141GB")
    assert rc == 0, err
    assert "4 stage actors = 2 pipeline stages x 2 expert shards" in out  # the graph is still printed
    for col in ("params", "grads", "optimizer", "activations", "transient", "overhead", "total", "verdict"):
        assert col in out
    assert "4 of 4 actor(s) fit" in out and "(--device-memory 141GB)" in out
    rc, out, err = _tide(capsys, "plan", "configs/pipeline.yaml", "--device-memory", "300MiB", "--every-actor")
    assert rc == 0, err
    assert out.count("does not fit") == 4 and "0 of 4 actor(s) fit" in out and "do not fit: ranks 0-3" in out
    rc, _, _ = _tide(capsys, "plan", "configs/pipeline.yaml", "--device-memory", "300MiB", "--check")
    assert rc == 1  # --check fails a plan that does not fit
    rc, _, _ = _tide(capsys, "plan", "configs/pipeline.yaml", "--device-memory", "141GB", "--check")
    assert rc == 0
    rc, out, err = _tide(capsys, "plan", "configs/debug.yaml")  # no flag: this machine's RAM per CPU actor
    assert rc == 0, err
    assert "the topology names no memory resource: this machine's RAM" in out and "1 CPU actor(s)" in out
    rc, out, err = _tide(capsys, "plan", "configs/pipeline.yaml", "--device-memory", "141")
    assert rc == 2 and "--device-memory '141' has no unit" in err
    assert out == ""  # refused before anything is printed
    rc, out, err = _tide(capsys, "plan", "configs/pipeline.yaml", "--overhead", "2TB")
    assert rc == 2 and "--overhead '2TB': unknown unit 'TB'" in err


@pytest.mark.parametrize("name,actors", [("v4-flash-gpu", 128), ("v4-pro-gpu", 2048)])
def test_gpu_configs_validate_and_fit_an_h200(name, actors):
    cfg = load_train_config(ROOT / "configs" / f"{name}.yaml")
    args = model_args_for(cfg, cfg.data.vocab_size)
    assert args.vocab_size == ModelArgs.flavor(name.removesuffix("-gpu")).vocab_size
    graph = build_graph(load_topology(cfg.parallel.topology), args.num_hidden_layers, args.n_routed_experts)
    assert len(graph.actors) == actors and graph.gpus_per_actor == 1 and cfg.activation_checkpointing
    plans = plan_memory(cfg, graph, args)
    h200 = parse_bytes("141GB")
    worst = max(plans, key=lambda p: p.total)
    assert all(p.fits(h200) for p in plans), (worst.rank, worst.total / GiB)
    assert worst.total > h200 / 2  # sized for the device, not far below it
