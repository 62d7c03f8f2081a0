"""Per-step losses against the ones recorded before the single training loop (``tests/fixtures/losses``).

The fixtures were recorded with the code that had two training programs (a Ray Train worker
for one-process runs, ``PipelineTrainer`` for pipeline runs), under a fixed seed:

- ``pipeline`` / ``debug``: ``configs/pipeline.yaml`` / ``configs/debug.yaml``, the whole curricula
  (70 and 120 steps; minutes each: run with ``TIDE_FULL_CURRICULA=1``);
- ``pipeline_short`` / ``debug_short``: the same configs with a few steps per curriculum stage
  (dense, indexer warm-up, sparse) and a smaller corpus, always run;
- ``legacy_single`` / ``legacy_pipeline``: the runs whose step-4 checkpoints are kept in
  ``tests/fixtures/legacy`` (one-process format: model + optimizer groups and a state skeleton;
  pipeline format: a group per stage x shard), to resume from.

Today both go through the same loop. With the MTP block's balancing switched off
(``balance.mtp: false``: the one change of the objective that is meant to change numerics), the
next-token CE, the MTP CE, the balance loss, the gradient norm and the learning rate are
bit-identical at every step. The indexer KL (and the total loss, which contains it) is summed
without a host synchronisation now -- zeros in place of the rows that see no compressed entry,
instead of compacting them -- so its value differs in the last bits (<= 1e-6 relative); its
gradient does not (the CE of the sparse stages, which depends on what the indexer learned, is
bit-identical).

The fixtures belong to the environment they were recorded in (Python's standard library is the
corpus; torch's kernels fix the arithmetic); elsewhere the checks are skipped, saying why.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
from pathlib import Path

import pytest
import tokenizers
import torch

from cluster.training.config import load_train_config
from cluster.training.trainer import read_metrics, train

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
BIT = ("ce", "mtp", "balance", "grad_norm", "lr", "tokens")
CLOSE = ("indexer_kl", "loss")


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / "losses" / f"{name}.json").read_text())


def environment_differs(name: str) -> str | None:
    """Why this machine cannot reproduce the fixture ``name`` (None: it can)."""
    from cluster.data import Corpus

    rec = fixture(name)["recorded"]
    here = {"python": platform.python_version(), "torch": torch.__version__, "tokenizers": tokenizers.__version__}
    for k, v in here.items():
        if rec[k] != v:
            return f"recorded with {k} {rec[k]}, this machine has {v}"
    corpus = Corpus("stdlib", max_bytes=fixture(name)["config"]["data"].get("max_bytes"))
    if corpus.fingerprint() != rec["corpus_fingerprint"]:
        return "this machine's Python standard library (the corpus) differs from the recording's"
    return None


def config(name: str, storage: Path, run: str | None = None) -> dict:
    cfg = copy.deepcopy(fixture(name)["config"])
    cfg.update(name=run or name, storage_path=str(storage))
    cfg.setdefault("balance", {})["mtp"] = False  # as recorded: the MTP block's MoE was not balanced
    cfg["init"] = "sequential"  # as recorded: the global RNG in build order (today's default is per parameter)
    if cfg.get("parallel"):
        cfg["parallel"]["trace_steps"] = 0
    return cfg


def compare(rows: list[dict], name: str, start: int = 0) -> None:
    want = fixture(name)["rows"][start:]
    assert [r["step"] for r in rows] == [r["step"] for r in want]
    for got, ref in zip(rows, want, strict=True):
        for k in BIT:
            assert got.get(k) == ref.get(k), (name, got["step"], k, got.get(k), ref.get(k))
        for k in CLOSE:
            if k in ref:
                assert abs(got[k] - ref[k]) <= 1e-6 * abs(ref[k]), (name, got["step"], k, got[k], ref[k])
            else:
                assert k not in got, (name, got["step"], k)


def _skip(*names):
    why = next((w for w in map(environment_differs, names) if w), None)
    return pytest.mark.skipif(why is not None, reason=f"fixture not reproducible here: {why}")


FULL = pytest.mark.skipif(not os.environ.get("TIDE_FULL_CURRICULA"),
                          reason="the whole curricula take minutes: set TIDE_FULL_CURRICULA=1")


@_skip("debug_short")
def test_one_process_curriculum_matches_todays_losses(tmp_path):
    summary = train(load_train_config(config("debug_short", tmp_path)), in_process=True, progress="none")
    compare(read_metrics(Path(summary["run_dir"])), "debug_short")


@_skip("pipeline_short")
def test_pipeline_curriculum_matches_todays_losses(tmp_path, two_racks):
    summary = train(load_train_config(config("pipeline_short", tmp_path)), progress="none")
    compare(read_metrics(Path(summary["run_dir"])), "pipeline_short")


@FULL
@_skip("debug")
def test_whole_debug_curriculum_matches_todays_losses(tmp_path):
    summary = train(load_train_config(config("debug", tmp_path)), in_process=True, progress="none")
    compare(read_metrics(Path(summary["run_dir"])), "debug")


@FULL
@_skip("pipeline")
def test_whole_pipeline_curriculum_matches_todays_losses(tmp_path, two_racks):
    summary = train(load_train_config(config("pipeline", tmp_path)), progress="none")
    compare(read_metrics(Path(summary["run_dir"])), "pipeline")


def _resume_legacy(kind: str, tmp_path: Path, **kwargs) -> list[dict]:
    """Copy the step-4 checkpoint written by the earlier code into a run directory and train on."""
    name = f"legacy_{kind}"
    shutil.copytree(FIXTURES / "legacy" / kind, tmp_path / name)
    summary = train(load_train_config(config(name, tmp_path)), progress="none", **kwargs)
    rows = read_metrics(Path(summary["run_dir"]))
    assert summary["checkpoint"].endswith("step-00000009")
    return rows


@_skip("legacy_single")
def test_a_one_process_checkpoint_of_the_earlier_format_resumes(tmp_path):
    rows = _resume_legacy("single", tmp_path, in_process=True)
    compare(rows, "legacy_single", start=4)  # steps 4..8 as the uninterrupted run had them


@_skip("legacy_pipeline")
def test_a_pipeline_checkpoint_of_the_earlier_code_resumes(tmp_path, two_racks):
    rows = _resume_legacy("pipeline", tmp_path)
    compare(rows, "legacy_pipeline", start=4)
