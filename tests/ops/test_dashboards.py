"""The Grafana dashboards (``deploy/dashboards.py``) and ``tide dashboards``: they build, every query names
only series of the metric catalogue (and together all of them), the JSON files land in ``--out`` and in Ray's
Grafana provisioning folder, and ``--push`` uploads them.

Grafana's server cannot be installed on these machines (no package, no download), so the upload is tested
against ``FakeGrafana``: a small FastAPI server that speaks the Grafana HTTP API endpoints grafana-client calls
for these operations, checked against grafana-client's source (``elements/datasource.py``,
``elements/dashboard.py``, ``client.py``): ``GET /api/datasources/uid/<uid>`` and ``/name/<name>``,
``POST /api/datasources``, ``PUT /api/datasources/uid/<uid>`` and ``POST /api/dashboards/db``, with Grafana's
status codes (404 unknown, 401 bad token, 412 an existing dashboard without ``overwrite``) and response shapes.
That the queries name series Prometheus really scrapes is checked live in ``test_metrics_live.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

if sys.version_info < (3, 11):  # every grafana-foundation-sdk build needs 3.11 (see pyproject.toml)
    pytest.skip("grafana-foundation-sdk needs Python >= 3.11", allow_module_level=True)

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from cli.main import main
from cluster.ops.metrics import SERVING, TRAINING
from comm.launch import free_port
from deploy import dashboards as dash

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "glsa_test-token-0123456789abcdef"


# ------------------------------------------------------------------ building
@pytest.fixture(scope="module")
def models():
    return dash.dashboards()


def test_dashboards_build_as_json_with_unique_panel_ids(models):
    assert set(models) == {"tide-training", "tide-serving"}
    for uid, model in models.items():
        assert model["uid"] == uid and model["title"].startswith("tide: ")
        assert json.loads(json.dumps(model)) == model  # plain JSON
        panels = dash.panels(model)
        ids = [p["id"] for p in panels]
        assert all(isinstance(i, int) and i > 0 for i in ids) and len(set(ids)) == len(ids), ids
        assert {p["type"] for p in panels} >= {"row", "timeseries", "heatmap"}
        for p in panels:
            if p["type"] == "row":
                continue
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            refs = [t["refId"] for t in p["targets"]]
            assert refs and len(set(refs)) == len(refs) and all(refs), p["title"]
            assert all(t["datasource"] == p["datasource"] for t in p["targets"])
        variables = {v["name"]: v for v in model["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        label = "run" if uid == "tide-training" else "model"
        assert variables[label]["type"] == "query" and variables[label]["multi"] and variables[label]["includeAll"]
        selector = f'{label}=~"${label}"'
        assert all(selector in q for where, q in dash.queries(model) if not where.startswith("$"))
    # stable: the same code gives the same JSON
    assert dash.dashboards() == models


def test_every_query_names_only_catalogue_series_and_all_are_covered(models):
    catalogue = dash.catalogue_series()
    training, serving = (dash.queried_series(models[u]) for u in ("tide-training", "tide-serving"))
    assert training <= {s for spec in TRAINING.values() for s in spec.series}
    assert serving <= {s for spec in SERVING.values() for s in spec.series}
    assert training | serving == catalogue, sorted(catalogue - training - serving)
    # the panels, by series
    wanted = {"ray_tide_train_loss", "ray_tide_train_tokens_per_second", "ray_tide_train_step_seconds_bucket",
              "ray_tide_train_grad_norm", "ray_tide_train_learning_rate", "ray_tide_train_curriculum_stage",
              "ray_tide_train_seq_len", "ray_tide_train_exposed_comm_fraction", "ray_tide_train_bubble_fraction",
              "ray_tide_train_expert_load_cv", "ray_tide_train_loss_spikes_total", "ray_tide_train_rollbacks_total",
              "ray_tide_train_anticipatory_routing", "ray_tide_train_checkpoints_total",
              "ray_tide_serve_requests_total", "ray_tide_serve_rejections_total", "ray_tide_serve_running",
              "ray_tide_serve_queued", "ray_tide_serve_ttft_seconds_bucket",
              "ray_tide_serve_inter_token_seconds_bucket", "ray_tide_serve_generated_tokens_total",
              "ray_tide_serve_prompt_tokens_total", "ray_tide_serve_kv_state_bytes"}
    assert wanted <= training | serving
    exprs = [q for m in models.values() for _, q in dash.queries(m)]
    for q in ("ray_tide_serve_ttft_seconds_bucket", "ray_tide_serve_inter_token_seconds_bucket",
              "ray_tide_train_step_seconds_bucket"):
        assert any(e.startswith("histogram_quantile(0.99") and q in e for e in exprs), q
    assert any("histogram_quantile(0.9," in e and "ttft" in e for e in exprs)


def test_event_counter_panels_show_zero_before_the_first_event(models, tmp_path):
    """A Ray counter is exported only from its first increase, so on a healthy run the loss-spike and
    rollback series do not exist: their panels must show 0 per run, not "No data". Evaluated by Prometheus's
    own ``promtool test rules`` on synthetic series: a healthy run (step gauge only) and one with a spike."""
    import shutil

    import yaml

    promtool = shutil.which("promtool")
    assert promtool, ("promtool is not installed: `apt-get install prometheus` "
                      "(Debian's package; `make test` installs it through scripts/system-packages.sh)")
    exprs = [q.replace("$run", ".*").replace("$__rate_interval", "2m") for _, q in dash.queries(models["tide-training"])
             if any(c in q for c in ("loss_spikes", "rollbacks", "checkpoints"))]
    assert len(exprs) == 6, exprs  # the events panel (3 queries) and the three totals
    spiky = {"loss_spikes": 1, "rollbacks": 0, "checkpoints": 2}
    tests = []
    for expr in exprs:
        total = "increase(" not in expr
        metric = next(m for m in spiky if m in expr)
        want = spiky[metric] if total else 0  # the counters are flat at the evaluation time
        tests.append({"expr": expr, "eval_time": "10m",
                      "exp_samples": [{"labels": '{run="healthy"}', "value": 0},
                                      {"labels": '{run="spiky"}', "value": want}]})
    series = [{"series": f'ray_tide_train_step{{run="{run}",WorkerId="w1"}}', "values": "0+1x20"}
              for run in ("healthy", "spiky")]
    series += [{"series": f'ray_tide_train_{m}_total{{run="spiky",WorkerId="w1"}}', "values": f"{n}x20"}
               for m, n in spiky.items() if n]
    path = tmp_path / "test.yaml"
    path.write_text(yaml.safe_dump({"tests": [{"interval": "1m", "input_series": series,
                                               "promql_expr_test": tests}]}))
    r = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_series_names_come_from_the_catalogue():
    assert dash.series("tide_serve_ttft_seconds", "bucket") == "ray_tide_serve_ttft_seconds_bucket"
    assert dash.series("tide_train_tokens") == "ray_tide_train_tokens_total"
    assert dash.series("tide_serve_running") == "ray_tide_serve_running"
    with pytest.raises(KeyError, match="not a metric"):
        dash.series("tide_serve_typo")
    with pytest.raises(ValueError, match="histogram"):
        dash.series("tide_serve_ttft_seconds")
    with pytest.raises(ValueError, match="no 'bucket'"):
        dash.series("tide_serve_running", "bucket")


def test_series_of_parses_promql_not_words():
    q = ('histogram_quantile(0.9, sum by (le, model) (rate(a_bucket{model=~"$model", x="ray_tide_fake"}'
         '[$__rate_interval]))) / on() group_left sum(b) + ignoring(x) {__name__="c"} '
         '+ max_over_time(d[${__range}:1m])')
    assert dash.series_of(q) == {"a_bucket", "b", "c", "d"}
    assert dash.series_of('label_replace(e, "dst", "$1", "src", "(.*)")') == {"e"}
    assert dash.variable_series("label_values(ray_tide_train_step{x=\"a,b\"}, run)") == {"ray_tide_train_step"}
    assert dash.variable_series("query_result(max(f) by (run))") == {"f"}
    for bad, why in (('{job="x"}', "fixed metric"), ('{__name__=~"ray_.*"}', "fixed metric"),
                     ("rate(a[$window])", "unsupported Grafana variable"), ("sum(", "invalid PromQL")):
        with pytest.raises(ValueError, match=why):
            dash.series_of(bad)
    with pytest.raises(ValueError, match="names no fixed series"):
        dash.variable_series("label_values(run)")


# ------------------------------------------------------------------ files
def test_cli_writes_the_files_and_into_rays_provisioning_folder(tmp_path, capsys):
    target = tmp_path / "session_2026" / "metrics" / "grafana" / "dashboards"
    prov = tmp_path / "ray" / "session_latest" / "metrics" / "grafana" / "provisioning" / "dashboards"
    prov.mkdir(parents=True)
    # what Ray's metrics_head writes (templates.DASHBOARD_PROVISIONING_TEMPLATE)
    (prov / "default.yml").write_text(f"\napiVersion: 1\n\nproviders:\n  - name: Ray    # Default dashboards "
                                      f"provided by OSS Ray\n    folder: Ray\n    type: file\n    options:\n"
                                      f"      path: {target}\n")
    out = tmp_path / "out"
    assert main(["dashboards", "--out", str(out), "--ray-temp-dir", str(tmp_path / "ray")]) == 0
    expected = dash.dashboards()
    for folder in (out, target):
        for uid, model in expected.items():
            assert json.loads((folder / f"{uid}.json").read_text()) == model
    assert sorted(p.name for p in target.iterdir()) == ["tide-serving.json", "tide-training.json"]
    printed = capsys.readouterr().out
    assert str(target / "tide-training.json") in printed and "'Ray'" in printed

    assert main(["dashboards", "--out", str(out), "--ray-temp-dir", str(tmp_path / "none")]) == 0
    assert "no Ray session" in capsys.readouterr().out


# ------------------------------------------------------------------ upload
class FakeGrafana:
    """Grafana's HTTP API for datasources and dashboards, in memory; records every request."""

    def __init__(self, token: str):
        self.token = token
        self.requests: list[dict] = []
        self.datasources: dict[str, dict] = {}
        self.dashboards: dict[str, dict] = {}
        self.app = app = FastAPI()

        @app.middleware("http")
        async def record_and_authenticate(request: Request, call_next):
            body = await request.body()
            self.requests.append({"method": request.method, "path": request.url.path,
                                  "authorization": request.headers.get("authorization"),
                                  "json": json.loads(body) if body else None})
            if request.headers.get("authorization") != f"Bearer {self.token}":
                return JSONResponse({"message": "invalid API key"}, status_code=401)
            return await call_next(request)

        def not_found():
            return JSONResponse({"message": "Data source not found"}, status_code=404)

        @app.get("/api/datasources/uid/{uid}")
        def by_uid(uid: str):
            return self.datasources.get(uid) or not_found()

        @app.get("/api/datasources/name/{name}")
        def by_name(name: str):
            return next((d for d in self.datasources.values() if d["name"] == name), None) or not_found()

        @app.post("/api/datasources")
        async def create(request: Request):
            ds = await request.json()
            if any(d["name"] == ds["name"] for d in self.datasources.values()):
                return JSONResponse({"message": "data source with the same name already exists"}, status_code=409)
            ds = {**ds, "id": len(self.datasources) + 1, "uid": ds.get("uid") or "generated", "version": 1}
            self.datasources[ds["uid"]] = ds
            return {"datasource": ds, "id": ds["id"], "message": "Datasource added", "name": ds["name"]}

        @app.put("/api/datasources/uid/{uid}")
        async def update(uid: str, request: Request):
            if uid not in self.datasources:
                return not_found()
            old = self.datasources[uid]
            ds = {**await request.json(), "id": old["id"], "version": old["version"] + 1}
            self.datasources[uid] = ds
            return {"datasource": ds, "id": ds["id"], "message": "Datasource updated", "name": ds["name"]}

        @app.post("/api/dashboards/db")
        async def save(request: Request):
            body = await request.json()
            model = body["dashboard"]
            old = self.dashboards.get(model["uid"])
            if old is not None and not body.get("overwrite"):
                return JSONResponse({"message": "A dashboard with the same uid already exists",
                                     "status": "name-exists"}, status_code=412)
            version = old["version"] + 1 if old else 1
            self.dashboards[model["uid"]] = {**model, "id": 7, "version": version}
            slug = model["title"].lower().replace(":", "").replace(" ", "-")
            return {"id": 7, "uid": model["uid"], "url": f"/d/{model['uid']}/{slug}", "status": "success",
                    "version": version, "slug": slug}


@pytest.fixture(scope="module")
def grafana():
    """A FakeGrafana on a free port on 127.0.0.1, served by uvicorn in a daemon thread."""
    fake = FakeGrafana(TOKEN)
    config = uvicorn.Config(fake.app, host="127.0.0.1", port=free_port(), log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    fake.url = f"http://127.0.0.1:{config.port}"
    yield fake
    server.should_exit = True
    thread.join(timeout=15)


@pytest.fixture
def fresh(grafana):
    grafana.requests.clear()
    grafana.datasources.clear()
    grafana.dashboards.clear()
    return grafana


def test_push_uploads_the_datasource_and_both_dashboards_and_overwrites(fresh, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GRAFANA_TOKEN", TOKEN)
    argv = ["dashboards", "--out", str(tmp_path), "--no-ray", "--push", fresh.url,
            "--prometheus-url", "http://prom.example:9090"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "datasource 'tide-prometheus' (uid tide-prometheus) created" in printed
    assert all(r["authorization"] == f"Bearer {TOKEN}" for r in fresh.requests)
    calls = [(r["method"], r["path"]) for r in fresh.requests]
    assert calls == [("GET", "/api/datasources/uid/tide-prometheus"), ("GET", "/api/datasources/name/tide-prometheus"),
                     ("POST", "/api/datasources"), ("POST", "/api/dashboards/db"), ("POST", "/api/dashboards/db")]
    ds = fresh.datasources["tide-prometheus"]
    assert (ds["type"], ds["url"], ds["access"], ds["name"]) == ("prometheus", "http://prom.example:9090", "proxy",
                                                                  "tide-prometheus")
    expected = dash.dashboards("tide-prometheus")
    assert set(fresh.dashboards) == {"tide-training", "tide-serving"}
    for r in fresh.requests[3:]:
        body = r["json"]
        assert body["overwrite"] is True
        model = body["dashboard"]
        assert model == expected[model["uid"]] and "id" not in model
        ds_var = next(v for v in model["templating"]["list"] if v["name"] == "datasource")
        assert ds_var["current"]["value"] == "tide-prometheus"  # pinned to the pushed datasource
    assert "dashboard tide-serving saved (version 1): /d/tide-serving/" in printed

    # a second push updates the datasource (new URL) and overwrites both dashboards
    fresh.requests.clear()
    argv[-1] = "http://prom2.example:9090"
    assert main(argv) == 0
    printed = capsys.readouterr().out
    calls = [(r["method"], r["path"]) for r in fresh.requests]
    assert calls == [("GET", "/api/datasources/uid/tide-prometheus"), ("PUT", "/api/datasources/uid/tide-prometheus"),
                     ("POST", "/api/dashboards/db"), ("POST", "/api/dashboards/db")]
    assert fresh.datasources["tide-prometheus"]["url"] == "http://prom2.example:9090"
    assert {d["version"] for d in fresh.dashboards.values()} == {2}
    assert "updated" in printed and "(version 2)" in printed


def test_push_updates_a_datasource_found_by_name(fresh):
    fresh.datasources["abc"] = {"id": 3, "uid": "abc", "name": "tide-prometheus", "type": "prometheus",
                                "url": "http://old:9090", "version": 4}
    result = dash.push(fresh.url, TOKEN, "http://new:9090")
    assert result["datasource"] == {"name": "tide-prometheus", "uid": "abc", "action": "updated"}
    assert fresh.datasources["abc"]["url"] == "http://new:9090" and "tide-prometheus" not in fresh.datasources
    var = next(v for v in fresh.dashboards["tide-training"]["templating"]["list"] if v["name"] == "datasource")
    assert var["current"]["value"] == "abc"


def test_push_errors_are_clear(fresh, tmp_path, capsys, monkeypatch):
    base = ["dashboards", "--out", str(tmp_path), "--no-ray", "--push", fresh.url]
    monkeypatch.delenv("GRAFANA_TOKEN", raising=False)
    assert main(base) == 2
    assert "environment variable GRAFANA_TOKEN" in capsys.readouterr().err
    assert not fresh.requests  # nothing sent without a token

    monkeypatch.setenv("GRAFANA_TOKEN", "wrong-token")
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "refused the token (401 Unauthorized)" in err and "wrong-token" not in err
    assert not fresh.dashboards and not fresh.datasources

    monkeypatch.setenv("MY_TOKEN", TOKEN)
    assert main([*base, "--token-env", "MY_TOKEN"]) == 0
    capsys.readouterr()

    assert main([*base[:-1], f"http://127.0.0.1:{free_port()}", "--token-env", "MY_TOKEN", "--timeout", "5"]) == 2
    assert "cannot reach Grafana at http://127.0.0.1:" in capsys.readouterr().err
    assert main([*base[:-1], "grafana:3000", "--token-env", "MY_TOKEN"]) == 2
    assert "must be an http(s) URL" in capsys.readouterr().err


def _leaks(text: str, secret: str, min_len: int = 8) -> list[str]:
    """Forms of ``secret`` found in ``text``: as it is, ``repr``/bytes-escaped, and any part of those
    ``min_len`` characters long (a fragment is still a leak)."""
    forms = {secret, repr(secret)[1:-1], repr(secret.encode())[2:-1]}
    found = [f for f in forms if f in text]
    for f in forms:
        k = min(min_len, len(f))
        found += [f[i:i + k] for i in range(len(f) - k + 1) if f[i:i + k] in text]
    return found


def test_the_token_never_appears_in_the_output(fresh, tmp_path):
    """The whole process's stdout and stderr (warnings always shown), for a push that succeeds, one with a
    wrong token, tokens with whitespace (a trailing line break is stripped; an embedded one or a tab refused,
    never echoed), and URLs carrying credentials (refused, never echoed: the token authenticates)."""

    def run(token: str, url: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "GRAFANA_TOKEN": token, "PYTHONWARNINGS": "always"}
        return subprocess.run([sys.executable, "-m", "cli", "dashboards", "--out", str(tmp_path),
                               "--no-ray", "--push", url, "--timeout", "5"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)

    ok = run(TOKEN, fresh.url)
    assert ok.returncode == 0, ok.stderr
    assert "tide-training saved" in ok.stdout
    wrong = "glsa_wrong-0123456789"
    bad = run(wrong, fresh.url)
    assert bad.returncode == 2 and "401" in bad.stderr
    n = len(fresh.requests)
    trailing = run(TOKEN + "\n", fresh.url)  # `export GRAFANA_TOKEN="$(cat file)"` style: stripped, works
    assert trailing.returncode == 0, trailing.stderr
    assert {r["authorization"] for r in fresh.requests[n:]} == {f"Bearer {TOKEN}"}
    embedded, tab = "glsa_Secret-\n-0123456789abcdef", "glsa_Secret-\t-0123456789abcdef"
    n = len(fresh.requests)
    runs = [(ok, TOKEN), (bad, wrong), (trailing, TOKEN + "\n")]
    for secret in (embedded, tab, embedded + "\n"):
        r = run(secret, fresh.url)
        assert r.returncode == 2 and "$GRAFANA_TOKEN: the Grafana token" in r.stderr, r.stderr
        assert "whitespace, control or non-ASCII" in r.stderr and "printable ASCII" in r.stderr
        runs.append((r, secret))
    assert len(fresh.requests) == n  # refused before sending anything
    for url, what in ((fresh.url.replace("http://", "http://admin:pw-secret-0123456789@"), "carries user info"),
                      (fresh.url.replace("http://", f"https://{TOKEN}@"), "carries user info"),
                      (f"gopher://u:{TOKEN}@grafana.example", "must be an http(s) URL"),
                      ("admin:pw-secret-0123456789@grafana:3000", "must be an http(s) URL"),  # no scheme
                      ("http:/admin:pw-secret-0123456789@grafana:3000", "must be an http(s) URL"),
                      ("http://127.0.0.1:99999", "its port is not a number in 0..65535")):  # not silently :80
        r = run(TOKEN, url)
        assert r.returncode == 2 and what in r.stderr, r.stderr
        runs += [(r, TOKEN), (r, "pw-secret-0123456789")]
    assert len(fresh.requests) == n
    for r, secret in runs:
        assert not _leaks(r.stdout + r.stderr, secret), (secret, r.stdout, r.stderr)


def test_redact_masks_every_form_and_fragment():
    secret = "glsa_Secret-0123456789\n"
    msg = (f"Invalid header value {('Bearer ' + secret).encode()!r}; {secret!r}; {ascii(secret)}; raw {secret}; "
           f"cut glsa_Secret-01...; quoted glsa_Secret-0123456789%0A; other text stays")
    out = dash.redact(msg, secret)
    assert not _leaks(out, secret) and "glsa_Secret" not in out and "0123456789" not in out, out
    assert out.startswith("Invalid header value b'Bearer ***'") and out.endswith("other text stays")
    assert dash.redact("a 1234 b", "1234") == "a *** b"  # a short secret: matched whole
    with pytest.raises(ValueError) as info:
        dash.check_token("glsa_Sec\nret-0123456789")
    assert "glsa" not in str(info.value) and "position(s) 8" in str(info.value)
    with pytest.raises(ValueError, match="user info") as info:
        dash.check_url("http://u:pw-secret@h:3000/x")
    assert "pw-secret" not in str(info.value) and "http://h:3000/x" in str(info.value)
