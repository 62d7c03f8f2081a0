"""The ``tide`` CLI, run as a subprocess (``python -m cli``) from the repository root."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cli.common import CLIError
from cli.demo import byte_tokens, continuation_text, load_text, timed_greedy
from model.config import ModelArgs


def tide(repo_root, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``tide ARGS`` and capture its output."""
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=repo_root,
                          capture_output=True, text=True, timeout=timeout)


def test_help(repo_root):
    r = tide(repo_root, "--help")
    assert r.returncode == 0, r.stderr
    for command in ("demo", "cache-bytes", "config"):
        assert command in r.stdout
    r = tide(repo_root, "demo", "--help")
    assert r.returncode == 0 and "--tokens" in r.stdout and "UTF-8 bytes" in r.stdout


def test_no_command_is_a_usage_error(repo_root):
    assert tide(repo_root).returncode == 2


def test_config_show(repo_root):
    r = tide(repo_root, "config", "show", "debug")
    assert r.returncode == 0, r.stderr
    assert ModelArgs.from_dict(yaml.safe_load(r.stdout)) == ModelArgs.flavor("debug")


def test_config_check_ok(repo_root, tmp_path):
    path = tmp_path / "ok.yaml"
    ModelArgs.flavor("tiny").to_yaml(path)
    r = tide(repo_root, "config", "check", str(path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("OK")


def test_config_check_bad_file(repo_root, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("flavor: debug\no_groups: 3\n")
    r = tide(repo_root, "config", "check", str(path))
    assert r.returncode == 2
    assert "tide: error:" in r.stderr and "must be divisible by o_groups (3)" in r.stderr
    assert "Traceback" not in r.stderr


def test_config_check_missing_file(repo_root, tmp_path):
    r = tide(repo_root, "config", "check", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_cache_bytes_json(repo_root):
    r = tide(repo_root, "cache-bytes")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["flavor"] == "v4-flash" and data["context_len"] == 1 << 20 and data["layout"] == "paper"
    assert 0.03 < data["ratio_vs_v32"] < 0.15
    r = tide(repo_root, "cache-bytes", "--flavor", "debug", "--context", "100", "--layout", "fp32")
    assert json.loads(r.stdout)["total_bytes"] > 0


def test_cache_bytes_bad_context(repo_root):
    r = tide(repo_root, "cache-bytes", "--context", "-5")
    assert r.returncode == 2 and "context_len must be" in r.stderr


def test_cache_bytes_context_beyond_max_positions(repo_root):
    r = tide(repo_root, "cache-bytes", "--flavor", "debug", "--context", "65537")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--context 65537 exceeds max_position_embeddings (65536) of flavor 'debug'" in r.stderr
    r = tide(repo_root, "cache-bytes", "--flavor", "debug", "--context", "65536")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("flavor", ["v4-flash", "v4-pro"])
def test_demo_refuses_accounting_only_flavors(repo_root, flavor):
    r = tide(repo_root, "demo", "--flavor", flavor, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"tide: error: flavor {flavor!r} is for accounting only (tide cache-bytes, tide config show): "
        "too large to build here; demo runs debug, tiny, small, medium"]
    assert tide(repo_root, "cache-bytes", "--flavor", flavor).returncode == 0
    assert tide(repo_root, "config", "show", flavor).returncode == 0


def test_demo_flavor_choices(repo_root):
    r = tide(repo_root, "demo", "--help")
    assert "{debug,tiny,small,medium}" in r.stdout and "v4-flash}" not in r.stdout
    r = tide(repo_root, "demo", "--flavor", "huge")
    assert r.returncode == 2 and "unknown flavor 'huge'" in r.stderr and "Traceback" not in r.stderr


def test_continuation_text_marks_non_byte_ids():
    assert continuation_text([104, 105]) == ("hi", 0)
    assert continuation_text([104, 300, 0xC3, 0xA9, 511]) == ("h<300>é<511>", 2)
    assert continuation_text([]) == ("", 0)


class _SleepyModel:
    """Stands in for a Transformer: prefill and each decode step take a known time."""

    def __init__(self, prefill_s: float, step_s: float):
        self.prefill_s, self.step_s, self.calls = prefill_s, step_s, []

    def new_state(self, batch):
        self.calls.append("new_state")
        return {"pos": 0}

    def prefill(self, ids, state):
        import torch

        time.sleep(self.prefill_s)
        assert state["pos"] == 0, "prefill must start from a fresh state"
        state["pos"] += ids.shape[1]
        self.calls.append(f"prefill {ids.shape[1]}")
        return torch.nn.functional.one_hot(torch.tensor([state["pos"] % 7]), 7).float()

    def __call__(self, ids, state):
        import torch

        time.sleep(self.step_s)
        assert ids.shape == (1, 1)
        state["pos"] += 1
        self.calls.append("step")
        return torch.nn.functional.one_hot(torch.tensor([[state["pos"] % 7]]), 7).float()


def test_timed_greedy_times_prefill_and_decode_separately():
    import torch

    model = _SleepyModel(prefill_s=0.02, step_s=0.05)
    prefill_s, decode_s, new = timed_greedy(model, torch.zeros(1, 40, dtype=torch.long), 5)
    # warm-up on its own state, then prefill on a fresh state, then one step per new token
    assert model.calls == ["new_state", "prefill 15", "step", "new_state", "prefill 40"] + ["step"] * 5
    assert new == [40 % 7, 41 % 7, 42 % 7, 43 % 7, 44 % 7]
    assert 0.02 <= prefill_s < 0.02 + 4 * 0.05  # no decode step inside
    assert decode_s / 5 >= 0.05


def test_timed_greedy_matches_generate():
    torch = pytest.importorskip("torch")
    from model import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelArgs.flavor("debug")).eval()
    ids = torch.randint(0, 256, (1, 40))
    _, decode_s, new = timed_greedy(model, ids, 6)
    assert new == model.generate(ids, max_new_tokens=6)[0, 40:].tolist()
    assert decode_s > 0


def test_load_text_default_is_stdlib_source():
    data, sources = load_text(4000)
    assert len(data) == 4000 and sources
    assert b"def " in data  # real Python source
    data.decode("utf-8")


def test_load_text_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("héllo wörld".encode())
    data, sources = load_text(1000, path)
    assert data == "héllo wörld".encode() and sources == [str(path)]
    assert load_text(3, path)[0] == b"h\xc3\xa9"
    with pytest.raises(CLIError, match="does not exist"):
        load_text(10, tmp_path / "missing.txt")
    with pytest.raises(CLIError, match=">= 2"):
        load_text(1, path)


def test_byte_tokens():
    ids = byte_tokens("é!".encode(), 256)
    assert ids.tolist() == [[0xC3, 0xA9, 0x21]]
    with pytest.raises(CLIError, match="vocab_size >= 256"):
        byte_tokens(b"ab", 255)


def test_demo_runs(repo_root):
    r = tide(repo_root, "demo", "--tokens", "256", "--new-tokens", "4", timeout=600)
    assert r.returncode == 0, r.stderr
    for field in ("loss", "prefill", "decode", "params total / active", "decode state"):
        assert field in r.stdout
    assert "0.00 ms/token" not in r.stdout and "ms/token (4 steps" in r.stdout


def test_plan_prints_the_actor_graph_and_schedule(repo_root, tmp_path):
    r = tide(repo_root, "plan", "configs/pipeline.yaml")
    assert r.returncode == 0, r.stderr
    assert "4 stage actors = 2 pipeline stages x 2 expert shards" in r.stdout
    assert "stage 1 shard 1 on rack r1: layers 2..3 + head, MTP, experts 4..7" in r.stdout
    assert "stage 0: F0 F1 B0 B1" in r.stdout and "simulated bubble" in r.stdout
    r = tide(repo_root, "plan", "configs/debug.yaml")  # no `parallel` section: the 1 x 1 graph
    assert r.returncode == 0, r.stderr
    assert "1 stage actors = 1 pipeline stages x 1 expert shards (2 CPU each)" in r.stdout
    assert "stage 0 shard 0 on any node: layers 0..3 + embedding, head, MTP, experts 0..7" in r.stdout


def test_plan_prints_and_checks_the_link_model(repo_root, tmp_path):
    cfg = yaml.safe_load((Path(repo_root) / "configs" / "pipeline.yaml").read_text())
    lm = tmp_path / "lm.yaml"
    lm.write_text("inter-rack: {latency_us: 603.226, bandwidth_gbps: 6.651227}\n")
    conf = tmp_path / "p.yaml"
    conf.write_text(yaml.safe_dump({**cfg, "parallel": {**cfg["parallel"], "link_model": str(lm)}}))
    r = tide(repo_root, "plan", str(conf))
    assert r.returncode == 0, r.stderr
    assert f"link model ({lm}):" in r.stdout
    assert "  intra-rack: latency 5 us, bandwidth 400 Gbit/s (source: default)" in r.stdout
    assert f"  inter-rack: latency 603.226 us, bandwidth 6.65123 Gbit/s (source: {lm})" in r.stdout
    lm.write_text("inter-rack: {latency_us: .nan, bandwidth_gbps: 0}\n")
    r = tide(repo_root, "plan", str(conf))
    assert r.returncode == 2 and f"tide: error: {conf}: parallel.link_model: {lm}: inter-rack: latency_us" in r.stderr
    r = tide(repo_root, "plan", "configs/pipeline.yaml")  # link_model unset: off
    assert "link model: off" in r.stdout
