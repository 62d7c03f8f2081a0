"""A real two-rack Ray cluster with token auth, and the training job submitted with the CLI users run.

The fixture starts what ``cluster/cluster.yaml`` starts, on this machine: a head
(``ray start --head --labels rack=r0``, dashboard on 127.0.0.1) and a second node
(``ray start --address ... --labels rack=r1``), both with ``RAY_AUTH_MODE=token`` and
a token the test generates into a temporary file (``RAY_AUTH_TOKEN_PATH``; the
user's ``~/.ray/auth_token`` is never read or written). Every port is chosen free
at run time and each node has its own ``--temp-dir``, so the cluster coexists with
any other Ray on the machine.

Start/stop: each node is ``ray start --block`` in its own session (process group).
In Ray 2.60 ``--block`` registers a SIGTERM handler (``ray._private.node.Node.
_register_shutdown_hooks``) that drains the node (up to
``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S``, set to 0 here: nothing to drain in a test),
kills every process it started (GCS, raylet, dashboard, agents, ...) and exits 1;
those processes also die with it by ``PR_SET_PDEATHSIG`` (Linux fate sharing).
Teardown sends SIGTERM to each group, escalates to SIGKILL only if the group is
still there after a grace period, kills any straggler among the processes seen
under the node by pid, and then checks that no process on the machine still
refers to the cluster's temporary directory. It never runs ``ray stop``, which
would stop every Ray cluster on the machine.

Then: the job API refuses requests without the token (401) or with a wrong one
(403), also through ``ray job submit``; with the token, ``ray job submit
--working-dir . -- python -m cluster.train tests/cluster/job_tiny.yaml`` trains 2
pipeline stages placed on the two racks and leaves its metrics and checkpoint in a
temporary directory; the uploaded working directory holds the code and none of
.venv/, runs/ or the cluster's secrets.
"""

from __future__ import annotations

import json
import math
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import pytest

pytest.importorskip("ray")  # puts Ray's vendored psutil on sys.path
import psutil  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv whose `ray` and `python` the cluster runs
START_TIMEOUT_S = 180  # a hang guard for start-up on a loaded 2-core machine, not a performance bound
JOB_TIMEOUT_S = 600


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on every interface right now (held open together while choosing)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind(("", 0))
            ports.append(s.getsockname()[1])
        return ports


def _free_range(size: int, taken: set[int]) -> int:
    """The first port of ``size`` consecutive free ports below the ephemeral range (for worker ports)."""
    for _ in range(200):
        base = random.randrange(20000, 32000 - size)
        if any(p in taken for p in range(base, base + size)):
            continue
        try:
            with ExitStack() as stack:
                for p in range(base, base + size):
                    s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    s.bind(("", p))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {size} consecutive free ports found")


def _node_ports(taken: set[int]) -> list[str]:
    """Every port option one ``ray start`` binds, besides the GCS / dashboard / client ones."""
    metrics, manager, objects, agent, agent_grpc, env_agent = _free_ports(6)
    base = _free_range(40, taken | {metrics, manager, objects, agent, agent_grpc, env_agent})
    taken |= {metrics, manager, objects, agent, agent_grpc, env_agent, *range(base, base + 40)}
    return [f"--metrics-export-port={metrics}", f"--node-manager-port={manager}", f"--object-manager-port={objects}",
            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={env_agent}", f"--min-worker-port={base}", f"--max-worker-port={base + 39}"]


class LocalCluster:
    """Head + one worker node started with ``ray start --block`` (see module docstring)."""

    def __init__(self):
        # short: Ray's unix socket paths live under it (108-byte limit)
        self.root = Path(tempfile.mkdtemp(prefix="tide-ray-", dir="/tmp"))
        self.token_file = self.root / "token"
        self.token_file.write_text(secrets.token_hex(32))
        self.token_file.chmod(0o600)
        self.home = self.root / "home"  # HOME of the CLI clients: no ~/.ray/auth_token there
        self.home.mkdir()
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []
        self.seen: dict[int, tuple[str, float]] = {}  # pid -> (name, start time) of every process under our nodes
        gcs, dashboard, client = _free_ports(3)
        self.gcs_port, self.dashboard_port, self.client_port = gcs, dashboard, client
        self.taken = {gcs, dashboard, client}
        self.dashboard = f"http://127.0.0.1:{dashboard}"

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()

    def env(self, **extra: str) -> dict[str, str]:
        """This process's environment without any RAY_* variable (someone else's cluster, token or mode)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1", **extra)
        return env

    def node_env(self) -> dict[str, str]:
        # drain timeout 0: on SIGTERM the node stops at once (nothing to drain in a test)
        return self.env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_file),
                        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")

    def _start(self, name: str, args: list[str]) -> None:
        log = self.root / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([str(BIN / "ray"), "start", "--block", *args, f"--temp-dir={self.root / name}",
                                     "--disable-usage-stats"], env=self.node_env(), stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append((name, proc, log))

    def start(self) -> None:
        self._start("head", ["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={self.client_port}",
                             "--num-cpus=1", "--labels=rack=r0", *_node_ports(self.taken)])
        self.wait(lambda: self.get("/api/version")[0] == 200, "the head's dashboard to answer")
        self._start("worker", [f"--address=127.0.0.1:{self.gcs_port}", "--num-cpus=1", "--labels=rack=r1",
                               *_node_ports(self.taken)])
        self.wait(lambda: sorted(self.racks()) == ["r0", "r1"], "both nodes (rack=r0, rack=r1) to be alive")

    def wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            for name, proc, log in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"`ray start` of the {name} exited with {proc.returncode} while waiting for "
                                       f"{what}:\n{log.read_text()[-3000:]}")
            self._remember_processes()
            try:
                if ready():
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        logs = "\n".join(f"--- {n}:\n{log.read_text()[-2000:]}" for n, _, log in self.procs)
        raise RuntimeError(f"timed out after {START_TIMEOUT_S} s waiting for {what}\n{logs}")

    def get(self, path: str, token: str | None = "cluster") -> tuple[int, str]:
        """GET the dashboard; ``token``: "cluster" (the right one), None (no header) or a literal token."""
        req = urllib.request.Request(self.dashboard + path)
        if token is not None:
            req.add_header("Authorization", f"Bearer {self.token if token == 'cluster' else token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def racks(self) -> list[str]:
        status, body = self.get("/api/v0/nodes?detail=1&limit=100")
        if status != 200:
            return []
        nodes = json.loads(body)["data"]["result"]["result"]
        return [n.get("labels", {}).get("rack") for n in nodes if n.get("state") == "ALIVE"]

    def _remember_processes(self) -> None:
        for _, proc, _ in self.procs:
            try:
                for p in psutil.Process(proc.pid).children(recursive=True):
                    self.seen.setdefault(p.pid, (p.name(), p.create_time()))
            except psutil.Error:
                pass

    def stop(self) -> list[str]:
        """Stop the nodes (worker first); returns what had to be killed the hard way or is left over."""
        self._remember_processes()
        notes = []
        for name, proc, _ in reversed(self.procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # the session leader's pid is the group id
            except ProcessLookupError:
                continue
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                notes.append(f"{name}: `ray start --block` ignored SIGTERM for 60 s; SIGKILL")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # its children leave the group shortly after it
                try:
                    os.killpg(proc.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
            else:
                notes.append(f"{name}: processes left in its group after SIGTERM; SIGKILL")
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
        time.sleep(0.5)
        for pid, (pname, started) in self.seen.items():  # by pid (and start time): processes of this cluster
            try:
                p = psutil.Process(pid)
                if (p.name(), p.create_time()) == (pname, started) and p.status() != psutil.STATUS_ZOMBIE:
                    notes.append(f"straggler {pname} (pid {pid}); SIGKILL")
                    p.kill()
            except psutil.Error:
                pass
        time.sleep(0.5)
        root = str(self.root)
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(root in a for a in p.info["cmdline"] or []) and p.status() != psutil.STATUS_ZOMBIE:
                    notes.append(f"LEFT OVER: pid {p.pid}: {' '.join(p.info['cmdline'])[:200]}")
            except psutil.Error:
                pass
        return notes


@pytest.fixture(scope="module")
def cluster():
    if not (BIN / "ray").is_file():
        pytest.skip(f"no `ray` CLI next to {sys.executable}")
    c = LocalCluster()
    try:
        c.start()
        yield c
    finally:
        notes = c.stop()
        shutil.rmtree(c.root, ignore_errors=True)
        left = [n for n in notes if n.startswith("LEFT OVER")]
        assert not left, "Ray processes of the test cluster survived its shutdown:\n" + "\n".join(left)
        if notes:
            print("cluster shutdown notes:\n" + "\n".join(notes))


def _submit(cluster: LocalCluster, env: dict[str, str], *entrypoint: str) -> subprocess.CompletedProcess:
    """``ray job submit --working-dir .`` from the repository root, as a user runs it; waits for the end."""
    return subprocess.run([str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--working-dir", ".",
                           "--", *entrypoint], cwd=ROOT, env={**env, "HOME": str(cluster.home)},
                          capture_output=True, text=True, timeout=JOB_TIMEOUT_S)


def test_the_job_api_refuses_requests_without_the_token(cluster):
    assert cluster.get("/api/jobs/", token=None)[0] == 401
    assert cluster.get("/api/jobs/", token="0" * 64)[0] == 403
    status, body = cluster.get("/api/jobs/")
    assert status == 200 and isinstance(json.loads(body), list)

    # a client that forgot RAY_AUTH_MODE=token and has no token (HOME without ~/.ray/auth_token)
    r = _submit(cluster, cluster.env(), "python", "-c", "print('must not run')")
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "Missing authentication token" in out and "must not run" not in out, out[-3000:]
    # a wrong token
    r = _submit(cluster, cluster.env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64), "python", "-c",
                "print('must not run')")
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "Invalid authentication token" in out and "must not run" not in out, out[-3000:]
    assert json.loads(cluster.get("/api/jobs/")[1]) == []  # nothing was submitted


def test_training_job_submitted_with_ray_job_submit(cluster):
    runs = cluster.root / "runs"
    env = cluster.env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(cluster.token_file))
    r = _submit(cluster, env, "python", "-m", "cluster.train", "tests/cluster/job_tiny.yaml", "--storage-path",
                str(runs))
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "succeeded" in out, out[-5000:]
    # the two stages ran on the two racks' nodes (the job joined this cluster; it did not simulate racks)
    assert "joined Ray cluster" in out and "stage 0 shard 0 on rack r0" in out and "stage 1 shard 0 on rack r1" in out

    run_dir = runs / "job-tiny"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [row["step"] for row in rows] == [0, 1, 2]
    assert all(math.isfinite(row["ce"]) and row["ce"] > 0 for row in rows)
    ckpt = run_dir / "checkpoints" / "step-00000003"
    assert sorted(p.name for p in ckpt.glob("*.safetensors")) == ["stage0-ep0.safetensors", "stage1-ep0.safetensors"]

    # what `--working-dir .` uploaded (unpacked on each node): the code, no venv / runs / secrets
    pkgs = [p for p in (cluster.root / "head").glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*")
            if p.is_dir() and (p / "cluster" / "train.py").is_file()]
    assert pkgs, "the job's working_dir package was not found under the head's temp dir"
    for pkg in pkgs:
        for never in (".venv", "runs", "dist", "cluster/secrets"):
            assert not (pkg / never).exists(), f"{never} was uploaded with the working dir"
        assert (pkg / "tests" / "cluster" / "job_tiny.yaml").is_file()


def test_tide_serve_joining_the_cluster_checks_the_key_it_read(cluster):
    """`tide serve` reads TIDE_API_KEY in the shell it runs in; the replica it starts on a joined cluster
    runs in the raylet's environment, which has no such variable. The key must still be enforced (the
    replica gets a salted digest, never the key) and never printed; a second `tide serve` on the same
    cluster is refused instead of replacing the first (and its key)."""
    import requests

    from tests.deploy.util import write_tiny_hf

    hf = cluster.root / "hf"
    write_tiny_hf(hf, cluster.root / "tok")
    key = "tk-" + secrets.token_urlsafe(24)
    port = _free_ports(1)[0]
    env = cluster.env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(cluster.token_file), TIDE_API_KEY=key,
                      HOME=str(cluster.home))
    assert "TIDE_API_KEY" not in cluster.node_env()  # the nodes never saw it
    log = cluster.root / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(BIN / "tide"), "serve", str(hf), "--address", f"127.0.0.1:{cluster.gcs_port}",
                                 "--port", str(port), "--threads", "1"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "tide: serving" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        url = f"http://127.0.0.1:{port}/v1/completions"
        body = {"model": "hf", "prompt": "def f(x):", "max_tokens": 2, "temperature": 0}
        assert requests.post(url, json=body, timeout=60).status_code == 401
        assert requests.post(url, json=body, headers={"Authorization": "Bearer wrong"}, timeout=60).status_code == 401
        r = requests.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)
        assert r.status_code == 200, r.text
        # a second tide serve (without a key) on the same cluster must refuse, not replace the first one
        second = subprocess.run([str(BIN / "tide"), "serve", str(hf), "--address", f"127.0.0.1:{cluster.gcs_port}",
                                 "--port", str(_free_ports(1)[0])], cwd=ROOT, capture_output=True, text=True,
                                env={k: v for k, v in env.items() if k != "TIDE_API_KEY"}, timeout=START_TIMEOUT_S)
        assert second.returncode == 2 and "Ray Serve already runs on this cluster" in second.stderr, \
            second.stdout[-2000:] + second.stderr[-2000:]
        assert requests.post(url, json=body, timeout=60).status_code == 401  # the first still serves, key on
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: tide serve shuts Serve down on the cluster and exits
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    text = log.read_text(errors="replace")
    assert "API key on (from $TIDE_API_KEY)" in text
    assert key not in text
