"""Smoke test of bench/bench_model.py: a minimal run end to end, checking the JSON it prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "bench_model.py")

# 256 tokens everywhere (the long prefill reuses the 256-token run), 2 decode steps, one thread
# (robust to other processes on a 2-core machine), no waiting for an idle machine.
ARGS = ["--quick", "--lengths", "256", "--contexts", "256", "--long-prefill", "256", "--decode-steps", "2",
        "--decode-warmup", "1", "--threads", "1", "--wait-idle", "0", "--retries", "0", "--timeout", "50"]


def test_help():
    out = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=60,
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0
    assert "--quick" in out.stdout and "--worker" not in out.stdout


def test_minimal_run_prints_one_json_line_with_the_keys():
    out = subprocess.run([sys.executable, SCRIPT, *ARGS], capture_output=True, text=True, timeout=110,
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stdout[-2000:]
    d = json.loads(lines[0])

    for key in ("flavor", "torch", "threads", "parity_max_abs", "prefill", "prefill_64k", "decode", "decode_growth",
                "kv_cache_v4_flash_1m", "targets"):
        assert key in d, key
    assert d["flavor"] == "small" and d["threads"] == 1
    assert d["parity_max_abs"] is not None and d["parity_max_abs"] < 1e-4

    (p,) = d["prefill"]
    for key in ("tokens", "ours_s", "hf_s", "speedup", "ours_peak_mb", "hf_peak_mb", "hf_skipped"):
        assert key in p, key
    assert p["tokens"] == 256 and p["hf_skipped"] is None and p["ours_error"] is None
    assert p["ours_s"] > 0 and p["hf_s"] > 0 and p["speedup"] > 0
    # Peaks are the growth of one high-water mark (never negative, however noisy the allocator), and
    # never above the process's absolute peak.
    for impl in ("ours", "hf"):
        assert 0 <= p[f"{impl}_peak_mb"] <= p[f"{impl}_peak_abs_mb"], (impl, p)

    long = d["prefill_64k"]
    assert long["tokens"] == 256 and long["within_8gb"] is True and long["state_bytes"] > 0

    (dec,) = d["decode"]
    for key in ("context", "ours_ms", "hf_ms", "speedup"):
        assert dec[key] is not None, key
    assert dec["context"] == 256

    assert set(d["decode_growth"]) >= {"ms_64k_over_4k", "context_ratio"}
    kv = d["kv_cache_v4_flash_1m"]
    assert kv["paper_ratio"] == 0.07 and 0 < kv["ratio_vs_v32"] < 1 and kv["context_len"] == 1 << 20
    assert set(d["targets"]) == {"prefill_8k_speedup_ge_10", "prefill_64k_within_8gb",
                                 "decode_growth_far_below_context"}
    assert d["targets"]["prefill_64k_within_8gb"] is True
