"""The metric recorders without Ray: the catalogue's rules, and what the engine and the app record
(the live export through Ray to Prometheus is tests/ops/test_metrics_live.py)."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from cluster.ops.metrics import SERVING, TRAINING, Recorder, ServingMetrics, TrainingMetrics
from deploy.app import build_app
from deploy.engine import LocalEngine
from tests.deploy.test_engine import _req, _run_concurrently, parts  # noqa: F401 - the module fixture


def test_catalogue_names_are_valid_and_series_follow_rays_naming():
    import re

    for spec in (*TRAINING.values(), *SERVING.values()):
        assert re.fullmatch(r"tide_(train|serve)_[a-z0-9_]+", spec.name), spec.name
        assert spec.description and spec.tag_keys
        assert (spec.kind == "histogram") == bool(spec.boundaries)
    assert TRAINING["tide_train_tokens"].series == ("ray_tide_train_tokens_total",)
    assert SERVING["tide_serve_ttft_seconds"].series == ("ray_tide_serve_ttft_seconds_bucket",
                                                         "ray_tide_serve_ttft_seconds_sum",
                                                         "ray_tide_serve_ttft_seconds_count")


def test_recorder_refuses_unknown_names_wrong_kinds_and_reasons():
    rec = TrainingMetrics("r")
    with pytest.raises(KeyError):
        rec.set("tide_train_los", 1.0)
    with pytest.raises(ValueError, match="is a counter"):
        rec.set("tide_train_tokens", 1.0)
    with pytest.raises(ValueError, match="default tags"):
        Recorder(TRAINING, {"model": "m"})
    with pytest.raises(ValueError, match="unknown rejection reason"):
        ServingMetrics("m").rejected("because")


def test_training_row_is_exported_term_by_term():
    rec = TrainingMetrics("r")
    row = {"step": 4, "stage": 1, "seq_len": 128, "lr": 1e-3, "grad_norm": 0.5, "ce": 5.0, "mtp": 5.5,
           "loss": 5.2, "tokens": 256, "step_time": 0.5, "tokens_per_s": 512.0, "anticipatory_routing": True,
           "load_cv/0": 0.25, "load_cv/2": 0.75}
    rec.step(row)
    rec.step({**row, "step": 5})
    assert rec.value("tide_train_loss", term="ce") == 5.0 and rec.value("tide_train_loss", term="mtp") == 5.5
    assert rec.value("tide_train_loss", term="indexer_kl") is None  # not in the row: not exported
    assert rec.value("tide_train_step") == 6 and rec.value("tide_train_tokens") == 512
    assert rec.value("tide_train_anticipatory_routing") == 1.0
    assert rec.value("tide_train_expert_load_cv", layer="2") == 0.75
    rec.communication({"comm_s": 2.0, "overlap_fraction": 0.75, "bubble": 0.4})
    assert rec.value("tide_train_exposed_comm_fraction") == 0.25 and rec.value("tide_train_bubble_fraction") == 0.4


def test_engine_records_requests_tokens_latencies_and_goes_idle(parts):  # noqa: F811
    model, tok = parts
    engine = LocalEngine(model, tok, "m", max_batch=4)
    try:
        ids = [tok.encode(t).ids for t in ("def f(x):", "import os", "class A:")]
        out = _run_concurrently(engine, [(i, _req(engine, max_tokens=6)) for i in ids])
        rec = engine.metrics
        tokens = sum(o[2] for o in out)
        assert rec.value("tide_serve_generated_tokens") == tokens == engine.stats()["generated_tokens"]
        assert rec.value("tide_serve_prompt_tokens") == sum(len(i) for i in ids)
        reasons = [o[1] for o in out]
        for reason in set(reasons):
            assert rec.value("tide_serve_requests", finish_reason=reason) == reasons.count(reason)
        assert 0 < rec.value("tide_serve_ttft_seconds") < 60
        assert rec.value("tide_serve_running") == rec.value("tide_serve_queued") == 0
        assert rec.value("tide_serve_kv_state_bytes") == 0
        # a request cancelled by its consumer counts as cancelled
        gen = engine.stream(ids[0], _req(engine, max_tokens=50))
        next(gen)
        gen.close()
        for _ in range(200):
            if rec.value("tide_serve_requests", finish_reason="cancelled"):
                break
            time.sleep(0.02)
        assert rec.value("tide_serve_requests", finish_reason="cancelled") == 1
    finally:
        engine.close()


def test_app_counts_rejections_by_reason(parts):  # noqa: F811
    model, tok = parts
    engine = LocalEngine(model, tok, "m")
    try:
        client = TestClient(build_app(engine, api_key="k", max_queue=0))
        auth = {"Authorization": "Bearer k"}
        assert client.post("/v1/completions", json={"prompt": "x"}).status_code == 401
        assert client.post("/v1/completions", json={"prompt": "x", "top_p": 5}, headers=auth).status_code == 400
        assert client.post("/v1/completions", json={"model": "other", "prompt": "x"}, headers=auth).status_code == 404
        assert client.post("/v1/completions", json={"prompt": "x"}, headers=auth).status_code == 503  # max_queue 0
        rec = engine.metrics
        assert {r: rec.value("tide_serve_rejections", reason=r)
                for r in ("unauthorized", "invalid_request", "unknown_model", "overloaded")} == \
            {"unauthorized": 1, "invalid_request": 1, "unknown_model": 1, "overloaded": 1}
    finally:
        engine.close()
