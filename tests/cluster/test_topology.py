"""Topology YAML -> ActorGraph (pure data, no processes)."""

import pytest

from cluster.launch.topology import build_graph, load_topology, split_layers


def test_two_racks_two_stages_two_expert_shards():
    topo = load_topology({"racks": ["r0", "r1"], "pipeline_stages": 2, "expert_parallel": 2})
    g = build_graph(topo, num_layers=5, n_routed_experts=8)
    assert [(a.rank, a.stage, a.ep_rank, a.rack) for a in g.actors] == [
        (0, 0, 0, "r0"), (1, 0, 1, "r0"), (2, 1, 0, "r1"), (3, 1, 1, "r1")]
    assert g.layer_slices == [(0, 3), (3, 5)]
    assert g.pipeline_groups == [[0, 2], [1, 3]] and g.expert_groups == [[0, 1], [2, 3]]
    assert {(l.src, l.dst, l.kind, l.link_class) for l in g.links if l.kind == "pipeline"} == {
        (0, 2, "pipeline", "inter-rack"), (1, 3, "pipeline", "inter-rack")}
    assert all(l.link_class == "intra-rack" for l in g.links if l.kind == "expert")
    assert g.actor(1, 1).label_selector == {"rack": "r1"} and g.stage_of_rack("r0") == [0]
    # a stage never straddles racks
    for s in range(g.num_stages):
        assert len({a.rack for a in g.actors if a.stage == s}) == 1


def test_placement_and_shared_racks():
    g = build_graph(load_topology({"racks": ["a", "b"], "pipeline_stages": 4}), num_layers=8)
    assert [a.rack for a in g.actors] == ["a", "a", "b", "b"]
    assert [l.link_class for l in g.links] == ["intra-rack", "inter-rack", "intra-rack"]
    g = build_graph(load_topology({"racks": ["a", "b"], "pipeline_stages": 2, "placement": {0: "b", 1: "a"}}), 4)
    assert [a.rack for a in g.actors] == ["b", "a"]


def test_split_layers():
    assert split_layers(43, 4) == [(0, 11), (11, 22), (22, 33), (33, 43)]
    with pytest.raises(ValueError, match="cannot split"):
        split_layers(2, 3)


@pytest.mark.parametrize("bad,match", [
    ({"racks": []}, "non-empty list"),
    ({"racks": ["a", "a"]}, "duplicate"),
    ({"racks": ["a"], "pipeline_stages": 0}, "pipeline_stages"),
    ({"racks": ["a"], "stages": 2}, "unknown key"),
    ({"racks": ["a"], "pipeline_stages": 2, "placement": {0: "a"}}, "every stage"),
    ({"racks": ["a"], "placement": {0: "z"}}, "unknown rack"),
    ({"racks": ["a"], "cpus_per_actor": 0}, "cpus_per_actor"),
])
def test_bad_topologies(bad, match):
    with pytest.raises(ValueError, match=match):
        load_topology(bad)


def test_experts_must_divide():
    with pytest.raises(ValueError, match="divisible"):
        build_graph(load_topology({"racks": ["a"], "expert_parallel": 3}), 4, n_routed_experts=8)


def test_gpus_per_actor_is_0_or_1():
    from cluster.launch.topology import build_graph, load_topology

    g = build_graph(load_topology({"racks": ["r0"], "gpus_per_actor": 1}), 4, 8)
    assert g.gpus_per_actor == 1
    with pytest.raises(ValueError, match="gpus_per_actor must be 0"):
        load_topology({"racks": ["r0"], "gpus_per_actor": 2})


@pytest.mark.parametrize("topo,match", [
    ({"racks": ["rack 0", "r1"]}, "cannot be Ray node label values"),
    ({"racks": ["r0", "r1"], "pipeline_stages": 2, "placement": {0: ["r0"], 1: "r1"}}, "placement must map"),
    ({"racks": ["r0", "r1"], "pipeline_stages": 2, "placement": {"a": "r0", 1: "r1"}}, "placement must map"),
])
def test_bad_rack_names_and_placements(topo, match):
    from cluster.launch.topology import load_topology

    with pytest.raises(ValueError, match=match):
        load_topology(topo)


def test_data_parallel_replicas_map_onto_racks():
    from cluster.launch.topology import one_replica

    # R = D: each replica fills one rack (its pipeline stays inside it; only gradients cross racks)
    g = build_graph(load_topology({"racks": ["a", "b"], "data_parallel": 2, "pipeline_stages": 2,
                                   "expert_parallel": 2}), num_layers=4, n_routed_experts=8)
    assert [(a.rank, a.dp_rank, a.stage, a.ep_rank, a.rack) for a in g.actors] == [
        (0, 0, 0, 0, "a"), (1, 0, 0, 1, "a"), (2, 0, 1, 0, "a"), (3, 0, 1, 1, "a"),
        (4, 1, 0, 0, "b"), (5, 1, 0, 1, "b"), (6, 1, 1, 0, "b"), (7, 1, 1, 1, "b")]
    assert g.data_parallel == 2 and g.expert_parallel == 2
    assert g.pipeline_groups == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert g.expert_groups == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g.replica_groups == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert {lk.link_class for lk in g.links if lk.kind == "pipeline"} == {"intra-rack"}
    assert {lk.link_class for lk in g.links if lk.kind == "data-parallel"} == {"inter-rack"}
    assert "2 data-parallel replicas" in g.shape()
    # R = D x P: every stage instance on its own rack
    g = build_graph(load_topology({"racks": ["r0", "r1", "r2", "r3"], "data_parallel": 2,
                                   "pipeline_stages": 2}), num_layers=4)
    assert [(a.dp_rank, a.stage, a.rack) for a in g.actors] == [(0, 0, "r0"), (0, 1, "r1"), (1, 0, "r2"),
                                                                 (1, 1, "r3")]
    # one rack for everything; a per-replica placement list
    g = build_graph(load_topology({"racks": ["a"], "data_parallel": 3}), num_layers=2)
    assert [a.rack for a in g.actors] == ["a"] * 3
    g = build_graph(load_topology({"racks": ["a", "b"], "data_parallel": 2, "pipeline_stages": 2,
                                   "placement": [{0: "a", 1: "b"}, {0: "b", 1: "a"}]}), num_layers=4)
    assert [(a.dp_rank, a.stage, a.rack) for a in g.actors] == [(0, 0, "a"), (0, 1, "b"), (1, 0, "b"), (1, 1, "a")]
    # serving runs one replica
    r = one_replica(g)
    assert [a.rank for a in r.actors] == [0, 1] and r.data_parallel == 1 and r.num_stages == 2


@pytest.mark.parametrize("bad,match", [
    ({"racks": ["a"], "data_parallel": 0}, "data_parallel must be an int >= 1"),
    ({"data_parallel": 2}, "racks must be a non-empty list"),
    ({"racks": ["a", "b"], "data_parallel": 2, "placement": [{0: "a"}]}, "one stage -> rack mapping per"),
    ({"racks": ["a", "b"], "data_parallel": 2, "placement": [{0: "a"}, {0: "z"}]}, r"placement\[1\] uses unknown"),
    ({"racks": ["a"], "data_parallel": 2, "placement": [1, 2]}, r"placement\[0\] must map stage"),
])
def test_bad_data_parallel_topologies(bad, match):
    with pytest.raises(ValueError, match=match):
        load_topology(bad)
