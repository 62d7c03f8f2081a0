"""``tide dashboards [--push URL]``: write the training and serving Grafana dashboards
(``deploy.dashboards``) and, with ``--push``, upload them."""

from __future__ import annotations

import argparse
import os

from cli.common import CLIError


def run(ns: argparse.Namespace) -> int:
    """``tide dashboards``: write the Grafana dashboards (``deploy.dashboards``) as JSON files, also into the
    dashboard folder of the latest Ray session's Grafana provisioning, and with ``--push URL`` upload them and
    a Prometheus datasource to a Grafana server (token from the environment, never printed)."""
    try:
        from deploy import dashboards as dash
    except ImportError as e:
        raise CLIError(f"tide dashboards needs grafana-foundation-sdk and grafana-client (Python >= 3.11; "
                       f"pip install -e .): {e}") from None
    token = None
    if ns.push:
        token = os.environ.get(ns.token_env, "").strip()  # `$(cat token-file)` may keep a line break
        if not token:
            raise CLIError(f"--push needs a Grafana service-account token in the environment variable "
                           f"{ns.token_env} (Grafana: Administration > Users and access > Service accounts, add a "
                           "token; role Admin to create the datasource); it is read from there only, never from "
                           "arguments")
        try:
            dash.check_token(token)
        except ValueError as e:
            raise CLIError(f"${ns.token_env}: {e}") from None
        try:  # before writing anything; the messages never show user info, and the token is masked anyway
            dash.check_url(ns.push, "--push URL")
            dash.check_url(ns.prometheus_url, "--prometheus-url")
        except ValueError as e:
            raise CLIError(dash.redact(str(e), token)) from None
    for path in dash.write_dashboards(ns.out):
        print(f"wrote {path}")
    if not ns.no_ray:
        target = dash.ray_dashboards_dir(ns.ray_temp_dir)
        if target is None:
            root = ns.ray_temp_dir or dash.ray_temp_dir()
            print(f"no Ray session with Grafana provisioning under {root} (start one with `ray start --head`): "
                  "skipped")
        else:
            for path in dash.write_dashboards(target):
                print(f"wrote {path} (Ray's Grafana provisioning, folder 'Ray')")
    if ns.push:
        try:
            result = dash.push(ns.push, token, ns.prometheus_url, datasource_name=ns.datasource_name,
                               timeout=ns.timeout)
        except (ValueError, dash.PushError) as e:
            raise CLIError(dash.redact(str(e), token)) from None
        ds = result["datasource"]
        print(f"datasource {ds['name']!r} (uid {ds['uid']}) {ds['action']}: {dash._safe_url(ns.prometheus_url)}")
        for d in result["dashboards"]:
            print(f"dashboard {d['uid']} saved (version {d['version']}): {d['url']}")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """The ``tide dashboards`` subcommand."""
    db = sub.add_parser(
        "dashboards", help="write the training and serving Grafana dashboards; --push uploads them",
        description="Build the Grafana dashboards of training (uid tide-training) and serving (uid tide-serving) "
                    "with grafana-foundation-sdk and write them as JSON into --out and into the dashboard folder of "
                    "the latest Ray session's Grafana provisioning (<ray temp dir>/session_latest/metrics/grafana; "
                    "a Grafana started with that session's grafana.ini shows them in its folder 'Ray'). With --push "
                    "URL, upload both (overwriting) and a Prometheus datasource to that Grafana server with "
                    "grafana-client, authenticated by the service-account token in $GRAFANA_TOKEN (--token-env).")
    db.add_argument("--out", default="runs/dashboards", help="folder for the JSON files; default: %(default)s")
    db.add_argument("--ray-temp-dir", metavar="DIR",
                    help="Ray's temporary root (default: $RAY_TMPDIR, else $TMPDIR, else /tmp, plus /ray)")
    db.add_argument("--no-ray", action="store_true", help="do not write into Ray's Grafana provisioning folder")
    db.add_argument("--push", metavar="URL", help="Grafana server to upload to, e.g. http://127.0.0.1:3000")
    db.add_argument("--prometheus-url", default="http://127.0.0.1:9090",
                    help="URL of the Prometheus datasource Grafana queries (from the Grafana server's side); "
                         "default: %(default)s")
    db.add_argument("--datasource-name", default="tide-prometheus",
                    help="name of the datasource to create or update (uid tide-prometheus); default: %(default)s")
    db.add_argument("--token-env", default="GRAFANA_TOKEN", metavar="NAME",
                    help="environment variable holding the Grafana token; default: %(default)s")
    db.add_argument("--timeout", type=float, default=10.0, help="seconds per HTTP request; default: %(default)s")
    db.set_defaults(func=run)
    return db
