"""Stage actors on a local Ray cluster with two labelled racks.

PP = 2 stages x EP = 2 expert shards (stage 0 on rack r0, stage 1 on rack r1), and two
data-parallel layouts: D = 2 replicas x 2 stages x 1 shard and D = 2 x 1 stage x 2 shards
(replica d on rack r<d>). Checks that each actor ran on its rack, and that one training step's
loss and every gradient equal the single-process model's (float32, <= 1e-5).
"""

import pytest
import ray
import torch

from actors.group import PlacementError, StageGroup
from cluster.launch.topology import Topology, build_graph
from model import Transformer
from model.stage import is_expert_param
from model.training import LossConfig, compute_losses, set_attention_mode
from tests.comm.pp_worker import debug_args, make_batch


@pytest.mark.parametrize("D,P,E", [(1, 2, 2), (2, 2, 1), (2, 1, 2)])
def test_stage_actors_on_their_racks_match_single_process(two_racks, D, P, E):
    args = debug_args()
    topo = Topology(racks=["r0", "r1"], pipeline_stages=P, expert_parallel=E, cpus_per_actor=0.5, data_parallel=D)
    graph = build_graph(topo, args.num_hidden_layers, args.n_routed_experts)
    group = StageGroup(graph, args.to_dict(), seed=0, microbatches=2, waves=2, trace=True)
    try:
        for p in group.placements:
            assert p["rack"] == f"r{p['dp_rank'] if D > 1 else p['stage']}", p
        assert len({p["node_id"] for p in group.placements}) == 2  # two raylets, one per rack
        batch = make_batch(4 * D * E, args.vocab_size)  # 2 microbatches x 2 waves per replica and shard
        group.call("set_attention_mode", "sparse")
        metrics = group.call("forward_backward", ray.put(batch), {"mode": "sparse"}, None)
        grads = group.call("grads")
        infos = group.call("shard_info")
        ref = Transformer.build(args, seed=0)  # every layout starts from the same parameters
        set_attention_mode(ref, "sparse")
        loss, _, _ = compute_losses(ref, batch, LossConfig(mode="sparse"))
        loss.backward()
        assert all(abs(m["loss"] - loss.item()) <= 1e-5 * loss.item() for m in metrics)
        ref_grads = dict(ref.named_parameters())
        checked = 0
        for info, g in zip(infos, grads, strict=True):
            for name, grad in g.items():
                want = ref_grads[name].grad
                if is_expert_param(name):
                    want = want[info["expert_lo"]:info["expert_hi"]]
                assert float((grad - want).abs().max()) <= 1e-5, name
                checked += 1
        assert checked > 100
        events = [e for ev in group.call("trace_events") for e in ev]
        cats = {e.get("cat") for e in events if e.get("ph") == "X"}
        assert {"compute", *(("send", "recv") if P > 1 else ()), *(("dispatch", "combine") if E > 1 else ())} <= cats
    finally:
        group.shutdown()


def test_unplaceable_topology_is_a_clear_error(two_racks):
    args = debug_args()
    topo = Topology(racks=["r0", "r9"], pipeline_stages=2, expert_parallel=1)
    graph = build_graph(topo, args.num_hidden_layers, args.n_routed_experts)
    with pytest.raises(PlacementError, match="r9"):
        StageGroup(graph, args.to_dict(), placement_timeout_s=3)


@pytest.mark.parametrize("P,E", [(2, 1), (2, 2)])
def test_greedy_generation_through_stage_actors_equals_the_model(two_racks, P, E):
    from actors.group import pipeline_generate

    args = debug_args()
    graph = build_graph(Topology(racks=["r0", "r1"], pipeline_stages=P, expert_parallel=E, cpus_per_actor=0.5),
                        args.num_hidden_layers, args.n_routed_experts)
    group = StageGroup(graph, args.to_dict(), seed=0)
    try:
        prompt = make_batch(2, args.vocab_size)["input_ids"][:, :40]
        got = pipeline_generate(group, prompt, 8, chunk_size=16)
        want = Transformer.build(args, seed=0).eval().generate(prompt, 8, chunk_size=16)
        assert torch.equal(got, want)
    finally:
        group.shutdown()
