"""Smoke test of bench/bench_serve.py: a minimal run against a tiny random model (HTTP, HF baseline, JSON)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.deploy.util import write_tiny_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "bench_serve.py")


def test_minimal_serving_benchmark_prints_the_figures(tmp_path):
    write_tiny_hf(tmp_path / "hf", tmp_path / "tok")
    args = [str(tmp_path / "hf"), "--concurrency", "1,2", "--requests", "2", "--prompt-tokens", "8",
            "--max-tokens", "4", "--long-prompt-tokens", "0", "--hf-requests", "2", "--wait-idle", "0",
            "--no-progress", "--out", str(tmp_path / "out.json")]
    out = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr[-3000:]
    d = json.loads((tmp_path / "out.json").read_text())
    for c in ("1", "2"):
        lvl = d["tide"][c]
        assert lvl["ok"] == 2 and lvl["errors"] == 0 and lvl["completion_tokens"] == 8
        assert lvl["output_tokens_per_s"] > 0 and lvl["ttft_ms"]["p50"] > 0
        assert d["speedup_vs_hf"][c] > 0
    assert d["hf"]["completion_tokens"] == 8 and d["hf"]["output_tokens_per_s"] > 0
    assert d["target"]["speedup_at_8"] == 3.0


def test_metrics_cost_benchmark_prints_its_figures():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_metrics.py"), "--tokens", "200"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr[-3000:]
    d = json.loads(out.stdout.strip().splitlines()[-1])
    assert d["us_per_token"]["no_ray"] > 0 and d["us_per_token"]["ray"] > 0 and 0 < d["share_of_step"]["batch_1"] < 1
