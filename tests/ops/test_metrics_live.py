"""Metrics end to end: a real Prometheus scrapes Ray's metrics export ports while a short pipeline
training job (2 racks, 2 stages, a loss spike with rollback, a traced step) and a Ray Serve
deployment (completions, streaming, refused requests) run; every series of the catalogue
(``cluster.ops.metrics``) must reach Prometheus, with the values the job produced, and every query of the
Grafana dashboards (``deploy/dashboards.py``) must name scraped series and run on this Prometheus."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import ray
import requests

from cluster.launch.local_racks import start_local_racks
from cluster.ops.metrics import SERVING, TRAINING
from comm.launch import free_port
from tests.cluster.test_training_graph import _config
from tests.deploy.util import write_tiny_hf
from tests.ops.prometheus import Prometheus, prometheus_binary

STEPS = (4, 1, 1)
SPIKE_AT = 3


def _all_series() -> set[str]:
    return {name for spec in (*TRAINING.values(), *SERVING.values()) for name in spec.series}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from ray import serve

    from cluster.training.trainer import train
    from cluster.training.config import load_train_config
    from deploy.serve import build

    prometheus_binary()  # fail early and clearly when it is not installed
    tmp = tmp_path_factory.mktemp("live")
    t0 = time.time()
    racks = start_local_racks({"r0": 2, "r1": 2})
    prom = None
    try:
        targets = [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray.nodes() if n["Alive"]]
        prom = Prometheus(targets, tmp)

        cfg = _config(tmp, "live", True, steps=STEPS)
        cfg["parallel"] = {"topology": {"racks": ["r0", "r1"], "pipeline_stages": 2, "expert_parallel": 1,
                                        "cpus_per_actor": 0.5}, "microbatches": 2, "waves": 1, "trace_steps": 1}
        cfg["checkpoint"] = {"every_steps": 1, "keep": 5}
        cfg["inject_spike_at_step"] = SPIKE_AT
        # EMA ~ the previous step's loss: the garbage batch at step 3 (5.40 nats) is above step 2's (5.01)
        cfg["spike"] = {"factor": 1.01, "min_steps": 2, "ema_beta": 0.01}
        summary = train(load_train_config(cfg), progress="none")

        hf = tmp / "hf"
        write_tiny_hf(hf, tmp / "tok")
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build({"path": str(hf), "model_name": "tide-live"}), name="tide", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/completions"
        served = {"tokens": 0, "finish": []}  # what the clients were told
        for i in range(3):
            body = {"model": "tide-live", "prompt": f"def f{i}(x):", "max_tokens": 5, "temperature": 0}
            if i == 2:
                body |= {"stream": True, "stream_options": {"include_usage": True}}
            r = requests.post(url, json=body, timeout=120)
            assert r.status_code == 200, r.text
            if i < 2:
                served["tokens"] += r.json()["usage"]["completion_tokens"]
                served["finish"].append(r.json()["choices"][0]["finish_reason"])
            else:
                chunks = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
                served["tokens"] += chunks[-1]["usage"]["completion_tokens"]
                served["finish"] += [c["choices"][0]["finish_reason"] for c in chunks
                                     if c["choices"] and c["choices"][0]["finish_reason"]]
        assert requests.post(url, json={"model": "tide-live", "prompt": "x", "top_p": 5}, timeout=30).status_code \
            == 400
        assert requests.post(url, json={"model": "other", "prompt": "x"}, timeout=30).status_code == 404

        deadline = time.monotonic() + 90  # Ray exports every ~10 s, Prometheus scrapes every second
        names: set[str] = set()
        while time.monotonic() < deadline:
            names = prom.series_names(t0)
            if _all_series() <= names and \
                    _value(prom, "sum(last_over_time(ray_tide_serve_generated_tokens_total[10m]))") >= served["tokens"]:
                break
            time.sleep(2)
        yield {"prom": prom, "summary": summary, "names": names, "run_dir": Path(summary["run_dir"]),
               "served": served}
    finally:
        try:
            serve.shutdown()
        finally:
            if prom is not None:
                prom.stop()
            racks.shutdown()


def _value(prom: Prometheus, promql: str) -> float:
    res = prom.query(promql)
    return float(res[0]["value"][1]) if res else float("nan")


def _last(prom: Prometheus, agg: str, selector: str) -> float:
    """``agg`` over the last value of each series matching ``selector`` in the past 10 minutes
    (so the gauges of a job that has finished still count)."""
    return _value(prom, f"{agg}(last_over_time({selector}[10m]))")


def test_every_catalogue_series_reaches_prometheus(live):
    missing = sorted(_all_series() - live["names"])
    assert not missing, f"not scraped by Prometheus: {missing}"


def test_training_values_match_the_run(live):
    prom, run_dir = live["prom"], live["run_dir"]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = rows[-1]
    run = 'run="live"'
    assert _last(prom, "max", f"ray_tide_train_step{{{run}}}") == sum(STEPS) == last["step"] + 1
    assert _last(prom, "max", f'ray_tide_train_loss{{{run},term="ce"}}') == pytest.approx(last["ce"], rel=1e-6)
    assert _last(prom, "sum", f"ray_tide_train_tokens_total{{{run}}}") == sum(r["tokens"] for r in rows)
    assert _last(prom, "sum", f"ray_tide_train_step_seconds_count{{{run}}}") == len(rows)
    assert live["summary"]["spikes"] == [SPIKE_AT], [r["ce"] for r in rows]
    assert _last(prom, "sum", f"ray_tide_train_loss_spikes_total{{{run}}}") == 1
    assert _last(prom, "sum", f"ray_tide_train_rollbacks_total{{{run}}}") == 1
    assert _last(prom, "max", f"ray_tide_train_seq_len{{{run}}}") == last["seq_len"]
    layers = {s["metric"]["layer"] for s in prom.query(f"last_over_time(ray_tide_train_expert_load_cv{{{run}}}[10m])")}
    assert layers == {k.split("/", 1)[1] for k in last if k.startswith("load_cv/")}
    trace = json.loads((run_dir / "trace_summary.json").read_text())
    assert _last(prom, "max", f"ray_tide_train_bubble_fraction{{{run}}}") == pytest.approx(trace["bubble"])
    exposed = _last(prom, "max", f"ray_tide_train_exposed_comm_fraction{{{run}}}")
    assert exposed == pytest.approx(1 - trace["overlap_fraction"]) and 0 <= exposed <= 1


def test_serving_values_match_the_requests(live):
    prom, served = live["prom"], live["served"]
    m = 'model="tide-live"'
    assert len(served["finish"]) == 3
    for reason in set(served["finish"]):
        assert _last(prom, "sum", f'ray_tide_serve_requests_total{{{m},finish_reason="{reason}"}}') \
            == served["finish"].count(reason)
    assert _last(prom, "sum", f"ray_tide_serve_generated_tokens_total{{{m}}}") == served["tokens"]
    assert _last(prom, "sum", f"ray_tide_serve_ttft_seconds_count{{{m}}}") == 3
    assert _last(prom, "sum", f"ray_tide_serve_inter_token_seconds_count{{{m}}}") == served["tokens"] - 3
    assert _last(prom, "sum", f'ray_tide_serve_rejections_total{{{m},reason="invalid_request"}}') == 1
    assert _last(prom, "sum", f'ray_tide_serve_rejections_total{{{m},reason="unknown_model"}}') == 1
    assert _last(prom, "sum", f"ray_tide_serve_prompt_tokens_total{{{m}}}") > 0
    # the server is idle now (its gauges are kept alive): nothing running or queued, no decode state held
    for gauge in ("running", "queued", "kv_state_bytes"):
        assert _value(prom, f"max(ray_tide_serve_{gauge}{{{m}}})") == 0, gauge


def test_every_dashboard_query_names_a_scraped_series(live):
    from deploy.dashboards import dashboards, queried_series, queries

    models = dashboards()
    queried = set().union(*(queried_series(m) for m in models.values()))
    assert queried, "the dashboards query nothing"
    missing = sorted(queried - live["names"])
    assert not missing, f"dashboard queries name series Prometheus never scraped: {missing}"
    # and Prometheus itself accepts every panel query, with Grafana's variables as Grafana would fill them in
    values = {"$__rate_interval": "1m", "$run": "live", "$model": "tide-live"}
    for model in models.values():
        for where, q in queries(model):
            if where.startswith("$"):
                continue
            for var, value in values.items():
                q = q.replace(var, value)
            live["prom"].query(q)  # raises on a 4xx (bad query); asserts status == success
