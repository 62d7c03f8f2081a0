"""Smoke test of bench/bench_pipeline.py: a minimal run, checking its JSON line and outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "bench_pipeline.py")


def test_minimal_run(tmp_path):
    out = subprocess.run([sys.executable, SCRIPT, "--layouts", "2x1", "--waves", "1,2", "--steps", "1",
                          "--seq-len", "64", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stdout[-2000:]
    d = json.loads(lines[0])
    assert d["layout"] == "2x1" and set(d["by_waves"]) == {"1", "2"}
    w1, w2 = d["by_waves"]["1"], d["by_waves"]["2"]
    assert w1["speedup_vs_W1"] == 1.0 and w2["step_s"] > 0
    assert 0 <= w2["bubble"] < 1 and 0 <= w2["comm_overlapped"] <= 1
    assert (tmp_path / "2x1-W2.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "2x1-W2.trace.json").read_text())["traceEvents"]
