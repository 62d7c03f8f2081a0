"""Every YAML the project reads goes through one reader (``model.safe_io.read_yaml``), which refuses a key
given twice in one mapping -- naming the key and both lines -- instead of silently keeping the last."""

from __future__ import annotations

import pytest

TRAINING = """name: dup
parallel:
  topology:
    racks: [r0]
    racks: [r1]
curriculum:
  - {name: a, seq_len: 64, batch_tokens: 256, steps: 1}
"""


def _readers():
    from cluster.launch.link_model import load_link_model
    from cluster.launch.rack_label import load_rack_map
    from cluster.launch.topology import load_topology
    from cluster.training.config import load_train_config
    from deploy.loader import read_topology
    from model import ModelArgs

    return {
        "training config": (load_train_config, TRAINING, 5, 4),
        "topology": (load_topology, "racks: [r0, r1]\npipeline_stages: 2\npipeline_stages: 1\n", 3, 2),
        "serve --topology": (read_topology, "racks: [r0]\nracks: [r1]\n", 2, 1),
        "model YAML": (ModelArgs.from_yaml, "flavor: debug\nhidden_size: 64\nhidden_size: 128\n", 3, 2),
        "link model": (load_link_model, "intra-rack: {latency_us: 1, bandwidth_gbps: 10}\n"
                                        "intra-rack: {latency_us: 2, bandwidth_gbps: 10}\n", 2, 1),
        "cluster YAML rack map": (load_rack_map, "provider:\n  racks:\n    r0: [10.0.0.1]\n    r0: [10.0.0.2]\n", 4, 3),
    }


@pytest.mark.parametrize("what", ["training config", "topology", "serve --topology", "model YAML", "link model",
                                  "cluster YAML rack map"])
def test_a_duplicate_key_is_refused_with_both_lines(what, tmp_path):
    read, text, line, first = _readers()[what]
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ValueError) as info:
        read(f)
    msg = str(info.value)
    assert str(f) in msg and "duplicate key" in msg, msg
    assert f"line {line}," in msg and f"first given on line {first}" in msg, msg


def test_a_duplicate_key_in_a_json_link_model_is_refused(tmp_path):
    from cluster.launch.link_model import load_link_model

    f = tmp_path / "links.json"
    f.write_text('{"intra-rack": {"latency_us": 1, "bandwidth_gbps": 10}, '
                 '"intra-rack": {"latency_us": 2, "bandwidth_gbps": 10}}')
    with pytest.raises(ValueError, match="duplicate key 'intra-rack'"):
        load_link_model(f)


def test_the_same_key_in_different_mappings_is_fine(tmp_path):
    from model.safe_io import read_yaml

    f = tmp_path / "ok.yaml"
    f.write_text("a: {x: 1}\nb: {x: 2}\nc: 1e-6\n")
    assert read_yaml(f, "test") == {"a": {"x": 1}, "b": {"x": 2}, "c": 1e-6}  # and YAML 1.2 floats


def test_no_other_yaml_reader_in_the_packages():
    """The static check: no yaml.safe_load / yaml.load outside model/safe_io.py (a second reader would
    not refuse duplicate keys)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    found = []
    for pkg in ("cli", "deploy", "cluster", "actors", "comm", "model", "kernels"):
        for f in (root / pkg).rglob("*.py"):
            if f == root / "model" / "safe_io.py":
                continue
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Attribute) and node.attr in ("safe_load", "load", "load_all", "safe_load_all") \
                        and isinstance(node.value, ast.Name) and node.value.id == "yaml":
                    found.append(f"{f.relative_to(root)}:{node.lineno}")
    assert found == []
