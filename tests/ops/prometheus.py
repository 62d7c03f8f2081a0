"""A real Prometheus server for the tests (Debian's ``prometheus`` package, which ``make test``
installs through ``scripts/system-packages.sh``).

Ray's ``ray metrics launch-prometheus`` downloads Prometheus and fails offline, so the
tests start the distribution's binary themselves, scraping every Ray node's metrics
export port (what Ray's own ``prometheus.yml`` finds through its service-discovery file).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import requests
import yaml

from comm.launch import free_port


def prometheus_binary() -> str:
    """Path of the ``prometheus`` binary.

    Raises:
        RuntimeError: not installed (the test is a real check: it fails rather than skips).
    """
    exe = shutil.which("prometheus")
    if exe is None:
        raise RuntimeError("the Prometheus server is not installed: `apt-get install prometheus` "
                           "(Debian's package; `make test` installs it through scripts/system-packages.sh)")
    return exe


class Prometheus:
    """A Prometheus server on 127.0.0.1 scraping ``targets`` (``host:port``) every second."""

    def __init__(self, targets: list[str], workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
               "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": targets}]}]}
        conf = workdir / "prometheus.yml"
        conf.write_text(yaml.safe_dump(cfg))
        self.log = open(workdir / "prometheus.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [prometheus_binary(), f"--config.file={conf}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {(workdir / 'prometheus.log').read_text()[-2000:]}")
            try:
                if requests.get(self.url + "/-/ready", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("prometheus did not become ready in 60 s")
            time.sleep(0.3)

    def query(self, promql: str) -> list[dict]:
        """Instant query through the HTTP API (``/api/v1/query``); the result vector."""
        r = requests.get(self.url + "/api/v1/query", params={"query": promql}, timeout=10)
        r.raise_for_status()
        body = r.json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def series_names(self, since: float, prefix: str = "ray_tide_") -> set[str]:
        """Names of the series with ``prefix`` that Prometheus saw since ``since`` (Unix time), including
        ones gone since (a finished job's gauges): the ``/api/v1/series`` API over that range."""
        r = requests.get(self.url + "/api/v1/series", params={"match[]": f'{{__name__=~"{prefix}.*"}}',
                                                               "start": since, "end": time.time()}, timeout=10)
        r.raise_for_status()
        return {s["__name__"] for s in r.json()["data"]}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
