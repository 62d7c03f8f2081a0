"""Smoke test of bench/bench_checkpoint.py (driver-path vs actor-written checkpoints) on the debug flavor."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_checkpoint_prints_one_json_line():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_checkpoint.py"), "--flavor", "debug",
                          "--repeats", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stdout[-2000:]
    d = json.loads(lines[0])
    assert d["flavor"] == "debug" and d["layout"] == "2 x 2" and d["checkpoint_mb"] > 0
    for op in ("save", "load"):
        r = d[op]
        assert r["driver_path_s"] > 0 and r["actor_path_s"] > 0
        assert r["driver_peak_mb_actor_path"] >= 0 and r["driver_peak_mb_driver_path"] >= 0
