"""Link model arithmetic, calibration files and the (injectable) delay."""

import json

import pytest

from cluster.launch.link_model import load_link_model
from comm.link_model import LinkModel


def test_transfer_time_and_defaults():
    lm = LinkModel()
    assert not lm.enabled and lm.delay(10**9, "inter-rack") == 0.0
    t_intra, t_inter = lm.transfer_time(10**8, "intra-rack"), lm.transfer_time(10**8, "inter-rack")
    assert t_inter == pytest.approx(20e-6 + 10**8 / 12.5e9) and t_inter > t_intra
    assert lm.transfer_time(0, "intra-rack") == pytest.approx(5e-6)


def test_calibration_file_round_trip_and_delay(tmp_path):
    f = tmp_path / "links.json"
    f.write_text(json.dumps({"inter-rack": {"latency_us": 100, "bandwidth_gbps": 8}}))
    lm = load_link_model(f)
    assert lm.enabled and lm.transfer_time(10**6, "inter-rack") == pytest.approx(1e-4 + 10**6 / 1e9)
    slept = []
    held = lm.delay(10**6, "inter-rack", sleep=slept.append)
    assert slept == [held] and held == pytest.approx(1.1e-3)
    y = tmp_path / "links.yaml"
    y.write_text("intra-rack: {latency_us: 1, bandwidth_gbps: 800}\n")
    assert load_link_model(y).to_dict()["intra-rack"] == {"latency_us": pytest.approx(1.0),
                                                              "bandwidth_gbps": pytest.approx(800.0)}


@pytest.mark.parametrize("bad,match", [
    ({"spine": {"latency_us": 1, "bandwidth_gbps": 1}}, "unknown link class"),
    ({"inter-rack": {"latency_us": -1, "bandwidth_gbps": 1}}, "latency_us must be"),
    ({"inter-rack": {"latency_us": 1, "bandwidth_gbps": 0}}, "bandwidth_gbps > 0"),
    ({"inter-rack": {"lat": 1}}, "needs latency_us"),
    ([1, 2], "mapping"),
    ({"inter-rack": {"latency_us": float("nan"), "bandwidth_gbps": 1}}, "both finite numbers"),
    ({"inter-rack": {"latency_us": 1, "bandwidth_gbps": float("nan")}}, "both finite numbers"),
    ({"inter-rack": {"latency_us": float("inf"), "bandwidth_gbps": 1}}, "both finite numbers"),
    ({"inter-rack": {"latency_us": 1, "bandwidth_gbps": float("inf")}}, "both finite numbers"),
    ({"inter-rack": {"latency_us": 1, "bandwidth_gbps": 10**400}}, "both finite numbers"),
    ({"inter-rack": {"latency_us": True, "bandwidth_gbps": 1}}, "both finite numbers"),
    ({"inter-rack": {"latency_us": "5", "bandwidth_gbps": 1}}, "both finite numbers"),
])
def test_bad_calibrations(bad, match):
    with pytest.raises(ValueError, match=match):
        LinkModel.from_dict(bad)


@pytest.mark.parametrize("text", ["inter-rack: {latency_us: .nan, bandwidth_gbps: 1}\n",
                                  "inter-rack: {latency_us: 1, bandwidth_gbps: .inf}\n",
                                  "inter-rack: {latency_us: -.inf, bandwidth_gbps: 1}\n"])
def test_non_finite_yaml_is_refused(tmp_path, text):
    f = tmp_path / "lm.yaml"
    f.write_text(text)
    with pytest.raises(ValueError, match=rf"{f}: inter-rack: latency_us must be >= 0 and bandwidth_gbps > 0, both "
                                         rf"finite numbers"):
        load_link_model(f)


def test_sources(tmp_path):
    assert LinkModel().source_of("inter-rack") == "default"
    f = tmp_path / "lm.yaml"
    f.write_text("inter-rack: {latency_us: 7, bandwidth_gbps: 9}\n")
    lm = load_link_model(f)
    assert lm.source_of("inter-rack") == str(f) and lm.source_of("intra-rack") == "default"


def test_bad_queries(tmp_path):
    with pytest.raises(ValueError, match="unknown link class"):
        LinkModel().transfer_time(1, "spine")
    with pytest.raises(ValueError, match="does not exist"):
        load_link_model(tmp_path / "none.json")
