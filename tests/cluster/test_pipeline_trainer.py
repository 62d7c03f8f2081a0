"""Curriculum training across two simulated racks (2 stages x 2 expert shards) vs one process.

The same config with a `parallel` section must train the same model: per-step
losses equal the single-process Trainer's; checkpoints are stage x shard groups;
a single-process run's checkpoint resumes into the 2x2 layout (re-layout) and
continues like the single process; a Chrome trace + timeline PNG are written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster import checkpoint as ckpt
from cluster.train import run_pipeline
from cluster.train_config import load_train_config
from cluster.trainer import Trainer, export_hf
from tests.cluster.test_trainer import tiny_config

PARALLEL = {"topology": {"racks": ["r0", "r1"], "pipeline_stages": 2, "expert_parallel": 2,
                         "cpus_per_actor": 0.5},
            "microbatches": 2, "waves": 2, "trace_steps": 1}


def _config(tmp: Path, name: str, parallel: bool, steps=(3, 1, 3)) -> dict:
    cfg = tiny_config(tmp, name)
    for st, n in zip(cfg["curriculum"], steps, strict=True):
        st["batch_tokens"] = 1024  # 16 x 64 and 8 x 128 tokens: 2 shards x 2 microbatches x 2 waves
        st["steps"] = n
    cfg["checkpoint"] = {"every_steps": 2, "keep": 3}
    if parallel:
        cfg["parallel"] = PARALLEL
    return cfg


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_pipeline_run_matches_single_process_and_relayouts(tmp_path, two_racks):
    single = Trainer(load_train_config(_config(tmp_path, "single", False)), progress="none")
    single.run()
    ref = _rows(single.run_dir)

    summary = run_pipeline(load_train_config(_config(tmp_path, "pipe", True)), progress="none")
    run_dir = Path(summary["run_dir"])
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == list(range(7))
    for a, b in zip(rows, ref, strict=True):
        assert abs(a["ce"] - b["ce"]) <= 1e-5 * b["ce"], (a["step"], a["ce"], b["ce"])
        assert a["attention"] == b["attention"]
    # checkpoints: one group per (stage, expert shard), verified by the store
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert ckpt.verify_checkpoint(latest) == []
    names = sorted(p.name for p in latest.glob("*.safetensors"))
    assert names == ["stage0-ep0.safetensors", "stage0-ep1.safetensors", "stage1-ep0.safetensors",
                     "stage1-ep1.safetensors"]
    # the timeline of step 1
    trace = json.loads((run_dir / "trace.json").read_text())
    cats = {e.get("cat") for e in trace["traceEvents"] if e.get("ph") == "X"}
    assert {"compute", "send", "dispatch", "combine"} <= cats
    assert (run_dir / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # export of a pipeline checkpoint gives one HF model directory
    out = export_hf(latest, tmp_path / "hf")
    assert (out / "config.json").is_file()

    # re-layout: a single-process checkpoint (step 4) continues as 2 stages x 2 shards
    relay = _config(tmp_path, "single", True)
    single_ckpt = ckpt.list_checkpoints(tmp_path / "single" / "checkpoints")
    step4 = [p for p in single_ckpt if ckpt.checkpoint_step(p) == 4][0]
    cfg = load_train_config(relay, name="relayout")
    (tmp_path / "relayout" / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(step4, tmp_path / "relayout" / "checkpoints" / step4.name)
    shutil.copy2(tmp_path / "single" / "metrics.jsonl", tmp_path / "relayout" / "metrics.jsonl")
    run_pipeline(cfg, progress="none")
    cont = _rows(tmp_path / "relayout")
    assert [r["step"] for r in cont] == list(range(7))
    for a, b in zip(cont[4:], ref[4:], strict=True):
        assert abs(a["ce"] - b["ce"]) <= 1e-5 * b["ce"], (a["step"], a["ce"], b["ce"])


def test_a_dead_stage_actor_restarts_the_graph_from_the_last_checkpoint(tmp_path, two_racks):
    cfg = _config(tmp_path, "crash", True, steps=(3, 1, 2))
    clean = run_pipeline(load_train_config(_config(tmp_path, "clean", True, steps=(3, 1, 2))), progress="none")
    run_pipeline(load_train_config({**cfg, "fail_at_step": 3}), progress="none")
    assert (tmp_path / "crash" / ".injected_failure_done").exists()
    got, want = _rows(tmp_path / "crash"), _rows(Path(clean["run_dir"]))
    assert [r["step"] for r in got] == list(range(6))  # steps 2.. replayed from the step-2 checkpoint, once each
    for a, b in zip(got, want, strict=True):
        assert a["ce"] == pytest.approx(b["ce"], abs=1e-6), a["step"]
