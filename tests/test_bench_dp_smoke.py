"""Smoke tests of bench/bench_data_parallel.py (a minimal run, its JSON) and bench/bench_scale_out.py (--help:
its run needs ~20 GB and minutes per step)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))


def test_bench_data_parallel_minimal_run():
    out = _run("bench_data_parallel.py", "--flavor", "debug", "--seq-len", "64", "--steps", "1", "--bucket-mb",
               "0.05", "--gbps", "1")
    assert out.returncode == 0, out.stderr[-2000:]
    d = json.loads(out.stdout.strip().splitlines()[-1])
    # ZeRO-1 halves the largest actor's optimizer state (whole-tensor ownership: not exactly)
    assert 0.4 <= d["optimizer_ratio"] <= 0.6, d
    assert d["step_s_overlapped"] > 0 and d["step_s_one_bucket"] > 0


def test_bench_scale_out_help():
    out = _run("bench_scale_out.py", "--help", timeout=60)
    assert out.returncode == 0 and "--more-steps" in out.stdout
