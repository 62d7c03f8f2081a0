"""Training YAML: the shipped config loads; bad configs are clear errors; stages are looked up by step."""

from pathlib import Path

import pytest

from cluster.training.config import load_train_config

ROOT = Path(__file__).resolve().parents[2]
STAGE = {"name": "a", "seq_len": 64, "batch_tokens": 256, "steps": 5}


def test_shipped_debug_config():
    cfg = load_train_config(ROOT / "configs" / "debug.yaml")
    assert [s.attention for s in cfg.curriculum] == ["dense", "dense", "indexer_warmup", "sparse"]
    assert [s.seq_len for s in cfg.curriculum] == [256, 1024, 1024, 4096]
    assert cfg.total_steps == sum(s.num_steps() for s in cfg.curriculum)


def test_stage_lookup_and_token_budget():
    cfg = load_train_config({"curriculum": [STAGE, {"name": "b", "seq_len": 128, "batch_tokens": 512,
                                                    "tokens": 1500, "attention": "sparse"}]})
    assert cfg.curriculum[1].num_steps() == 3  # 1500 tokens / 512 per step, rounded up
    assert cfg.stage_at(0)[0] == 0 and cfg.stage_at(4)[0] == 0
    assert cfg.stage_at(5)[:1] == (1,) and cfg.stage_at(5)[2] == 5 and cfg.stage_at(7)[0] == 1


@pytest.mark.parametrize("bad,match", [
    ({"curriculum": [STAGE], "optimizer": {}}, "unknown key"),
    ({"curriculum": [{**STAGE, "tokens": 100}]}, "exactly one of steps or tokens"),
    ({"curriculum": [{**STAGE, "attention": "fast"}]}, "attention must be one of"),
    ({"curriculum": [{**STAGE, "seq_len": "64"}]}, r"curriculum\[0\].seq_len: expected int"),
    ({"curriculum": [{**STAGE, "batch_tokens": 10}]}, "batch_tokens"),
    ({"curriculum": []}, "at least one stage"),
    ({"curriculum": [STAGE], "ray": {"num_workers": 2}}, "every run is an actor graph"),
    ({"curriculum": [STAGE], "parallel": {"topology": {"racks": ["r0"], "pipeline_stages": 9}}},
     r"parallel.topology: cannot split 4 layers over 9"),
    ({"curriculum": [{**STAGE, "batch_tokens": 192}], "parallel": {"topology": {"racks": ["r0"],
                                                                               "expert_parallel": 3}}},
     r"divisible by expert_parallel \(3\)"),
    ({"curriculum": [STAGE], "parallel": {"topology": {"racks": ["r0"]}, "waves": 64}}, "waves"),
    ({"curriculum": [STAGE], "parallel": {"topology": {"racks": ["r0"]}, "schedule": "zb"}}, "schedule"),
    ({"curriculum": [STAGE], "parallel": {"topology": {"racks": ["r0"]}, "link_model": "nope.yaml"}},
     "calibration file"),
    ({"curriculum": [STAGE], "parallel": {"topolgy": {"racks": ["r0"]}}}, "unknown key"),
    ({"curriculum": [STAGE], "data": {"vocab_size": 100}}, "vocab_size"),
    ({"curriculum": [STAGE], "model": {"flavor": "debug", "index_topk": 0}}, "index_topk"),
    ({"curriculum": [STAGE], "spike": {"factor": 0.5}}, "factor"),
    ({}, "missing required key 'curriculum'"),
])
def test_bad_configs(bad, match):
    with pytest.raises(ValueError, match=match):
        load_train_config(bad)


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_train_config(tmp_path / "nope.yaml")
    f = tmp_path / "x.yaml"
    f.write_text("curriculum: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_train_config(f)
    f.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        load_train_config(f)


@pytest.mark.parametrize("text,problem", [
    ("inter-rack: {latency_us: -1, bandwidth_gbps: 100}\n", "latency_us must be >= 0"),
    ("inter-rack: {latency_us: 20, bandwidth_gbps: 0}\n", "bandwidth_gbps > 0"),
    ("inter-rack: {latency_us: .nan, bandwidth_gbps: 100}\n", "both finite numbers"),
    ("intra-rack: {latency_us: 5, bandwidth_gbps: .inf}\n", "both finite numbers"),
    ("spine: {latency_us: 5, bandwidth_gbps: 100}\n", "unknown link class 'spine'"),
    ("!!python/object/apply:os.system [echo hi]\n", "not valid YAML"),
    ("", "expected a mapping"),
])
def test_link_model_contents_are_validated(tmp_path, text, problem):
    """`parallel.link_model` is loaded as the trainer will load it: a bad file fails the config, naming it."""
    f = tmp_path / "lm.yaml"
    f.write_text(text)
    cfg = {"curriculum": [STAGE], "parallel": {"topology": {"racks": ["r0"]}, "link_model": str(f)}}
    with pytest.raises(ValueError, match=rf"^parallel\.link_model: {f}: .*{problem}"):
        load_train_config(cfg)
    f.write_text("inter-rack: {latency_us: 20, bandwidth_gbps: 100}\n")
    assert load_train_config(cfg).parallel.link_model == str(f)
