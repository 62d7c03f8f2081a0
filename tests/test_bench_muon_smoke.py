"""Smoke test of bench/bench_muon.py: ``--quick`` end to end, checking the JSON it prints."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "bench_muon.py")
ENV = dict(os.environ, PYTHONPATH=ROOT)


def test_help():
    out = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=60,
                         cwd=ROOT, env=ENV)
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in ("--quick", "--muon-lrs", "--adamw-lrs", "--steps", "--eval-every", "--plot"):
        assert flag in out.stdout, flag


def test_quick_run_prints_one_json_line_with_the_keys(tmp_path):
    plot = tmp_path / "curves.png"
    # One thread: robust to other processes on a small shared machine. A private cache
    # dir: the BPE is trained here (about a second on the --quick corpus budget).
    args = [sys.executable, SCRIPT, "--quick", "--threads", "1", "--cache-dir", str(tmp_path / "cache"),
            "--plot", str(plot)]
    t0 = time.monotonic()
    out = subprocess.run(args, capture_output=True, text=True, timeout=90, cwd=ROOT, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    assert time.monotonic() - t0 < 90
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stdout[-2000:]
    d = json.loads(lines[0])

    for key in ("benchmark", "quick", "flavor", "params", "threads", "steps", "seq_len", "batch_size",
                "tokens_per_step", "tokens_per_run", "eval_every", "eval_batches", "eval_tokens", "schedule",
                "data", "lr_grid", "same_init", "same_data", "runs", "best", "muon_best_lr", "adamw_best_lr",
                "muon_final_eval_loss", "adamw_final_eval_loss", "muon_reaches_adamw_final_at_step",
                "muon_step_ratio", "adamw_steps_multiplier", "summary", "all_runs_curves", "wall_s"):
        assert key in d, key
    assert d["benchmark"] == "muon_vs_adamw" and d["quick"] is True
    assert d["steps"] == 6 and d["eval_every"] == 3 and d["seq_len"] == 128 and d["tokens_per_step"] == 1024
    assert d["tokens_per_run"] == 6 * 1024
    assert d["same_init"] is True and d["same_data"] is True
    assert len(d["lr_grid"]["muon"]) == 1 and len(d["lr_grid"]["adamw"]) == 1

    assert [r["optimizer"] for r in d["runs"]] == ["muon", "adamw"]
    for r in d["runs"]:
        for key in ("optimizer", "lr", "final_eval_loss", "diverged", "wall_s"):
            assert key in r, key
        assert r["diverged"] is False and math.isfinite(r["final_eval_loss"])

    assert set(d["best"]) == {"muon", "adamw"}
    for name in ("muon", "adamw"):
        b = d["best"][name]
        assert b["lr"] == d[f"{name}_best_lr"]
        assert b["final_eval_loss"] == d[f"{name}_final_eval_loss"]
        steps = [s for s, _ in b["curve"]]
        assert steps == [0, 3, 6]
        losses = [v for _, v in b["curve"]]
        assert all(math.isfinite(v) for v in losses)
        assert losses[-1] == b["final_eval_loss"]
        assert losses[-1] < losses[0]  # 6 steps already lower the held-out loss
    assert d["best"]["muon"]["curve"][0] == d["best"]["adamw"]["curve"][0]  # same init, same eval batches

    ratio, mult = d["muon_step_ratio"], d["adamw_steps_multiplier"]
    if ratio is None:
        assert mult is None and d["muon_reaches_adamw_final_at_step"] is None
    else:
        assert 0 < ratio <= 1 and abs(mult - 1 / ratio) < 1e-2
        assert abs(d["muon_reaches_adamw_final_at_step"] / d["steps"] - ratio) < 1e-3
    assert plot.is_file() and plot.stat().st_size > 0


def test_crossing_step_interpolates():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        from bench_muon import crossing_step
    finally:
        sys.path.pop(0)
    curve = [[0, 8.0], [10, 6.0], [20, 4.0], [30, 3.0]]
    assert crossing_step(curve, 5.0) == 15.0
    assert crossing_step(curve, 6.0) == 10.0
    assert crossing_step(curve, 3.0) == 30.0
    assert crossing_step(curve, 2.9) is None
    assert crossing_step(curve, 9.0) == 0.0
