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
