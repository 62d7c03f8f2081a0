"""The ``tide`` CLI, run as a subprocess (``python -m cluster.cli``) from the repository root."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from cluster.cli import CLIError, byte_tokens, load_text
from model.config import ModelArgs


def tide(repo_root, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``tide ARGS`` and capture its output."""
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=repo_root,
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
    pytest.importorskip("torch")
    try:
        from model import Transformer  # noqa: F401
    except ImportError:
        pytest.skip("model.Transformer not implemented yet")
    r = tide(repo_root, "demo", "--tokens", "256", "--new-tokens", "4", timeout=600)
    assert r.returncode == 0, r.stderr
    for field in ("loss", "prefill", "decode", "params total / active", "decode state"):
        assert field in r.stdout
