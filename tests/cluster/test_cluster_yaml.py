"""cluster/cluster.yaml: valid for Ray's launcher, nothing bound to all interfaces, token auth, racks.

- Ray's own loader accepts the file: ``_bootstrap_config`` (what ``ray up`` runs:
  ``prepare_config`` -- the local provider's preparation and the defaults -- then the
  JSON-schema ``validate_config``), without touching any machine.
- Every shell command of the config (setup and start, raw and as Ray prepared them) is
  parsed with ``shlex`` into simple commands: no option or variable named ``*host`` may
  take a wildcard address (0.0.0.0, ::, empty, ...), no ``--ray-debugger-external``;
  each ``ray start`` runs with ``RAY_AUTH_MODE=token`` in its environment, the fixed
  metrics port and a ``rack`` label; the head's dashboard (and so the job API) is bound
  to loopback explicitly. The checker is run on mutated copies to show that it fails.
- The token file that ``file_mounts`` ships is ignored by git (and not tracked), and
  excluded from ``ray job submit --working-dir`` uploads by ``.rayignore``.
- The rack map (``provider.racks``) covers every machine exactly once, its names are valid
  ``rack`` label values for ``cluster/launch/topology.py`` and include the racks of
  ``configs/pipeline.yaml``; ``cluster.launch.rack_label`` finds a machine's rack from it.
"""

from __future__ import annotations

import copy
import ipaddress
import os
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster" / "cluster.yaml"
TOKEN_TARGET = "~/.ray/auth_token"  # where Ray's token auth looks by default (RAY_AUTH_MODE=token)


def load() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


# ---------------------------------------------------------------- the command checker


@dataclass
class Invocation:
    """One simple command: its program (basename), arguments and environment (exported + prefix)."""

    program: str
    args: list[str]
    env: dict[str, str]
    assignments: dict[str, str] = field(default_factory=dict)  # every NAME=VALUE seen, exported or not
    source: str = ""

    def options(self) -> list[tuple[str, str | None]]:
        """``--name=value`` / ``--name value`` / ``--flag`` -> (name, value or None), in order."""
        out: list[tuple[str, str | None]] = []
        i = 0
        while i < len(self.args):
            a = self.args[i]
            if a.startswith("--") and len(a) > 2:
                if "=" in a:
                    name, value = a[2:].split("=", 1)
                elif i + 1 < len(self.args) and not self.args[i + 1].startswith("-"):
                    name, value = a[2:], self.args[i + 1]
                    i += 1
                else:
                    name, value = a[2:], None
                out.append((name, value))
            i += 1
        return out

    def option(self, name: str) -> list[str | None]:
        return [v for n, v in self.options() if n == name]


SEPARATORS = {";", "&&", "||", "|", "&", "(", ")", "|&", ";;"}
PREFIX_WORDS = {"env", "nohup", "exec", "sudo", "command", "time", "nice"}


def _is_assignment(word: str) -> bool:
    name, eq, _ = word.partition("=")
    return bool(eq) and name.isidentifier()


def parse_command(cmd: str) -> list[Invocation]:
    """Split a shell command line into simple commands (``shlex``; ``;``, ``&&``, ``||``, pipes and
    subshell parentheses separate them; redirections are dropped). ``export`` assignments carry over
    to later commands of the same line; ``NAME=value cmd`` applies to ``cmd`` only; ``export ...``
    and bare ``NAME=value`` come back as invocations of ``export`` / ``""`` (so they are checked too)."""
    lex = shlex.shlex(cmd, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    tokens = list(lex)
    segments: list[list[str]] = [[]]
    skip_next = False
    for t in tokens:
        if skip_next:
            skip_next = False
            continue
        if t in SEPARATORS:
            segments.append([])
        elif t and set(t) <= set("<>&"):  # a redirection operator: drop it and its target
            skip_next = True
        else:
            segments[-1].append(t)
    exported: dict[str, str] = {}
    shell_vars: dict[str, str] = {}
    out = []
    for words in segments:
        if not words:
            continue
        if words[0] == "export":
            for w in words[1:]:
                if _is_assignment(w):
                    k, _, v = w.partition("=")
                    exported[k] = v
                    shell_vars[k] = v
            out.append(Invocation(program="export", args=words[1:], env=dict(exported),
                                  assignments=dict(shell_vars), source=cmd))
            continue
        prefix: dict[str, str] = {}
        i = 0
        while i < len(words) and (_is_assignment(words[i]) or words[i] in PREFIX_WORDS
                                  or (words[i].startswith("-") and i > 0 and words[i - 1] in PREFIX_WORDS)):
            if _is_assignment(words[i]):
                k, _, v = words[i].partition("=")
                prefix[k] = v
            i += 1
        if i == len(words):  # bare assignments: shell variables, not in any program's environment
            shell_vars.update(prefix)
            out.append(Invocation(program="", args=[], env=dict(exported), assignments=dict(shell_vars), source=cmd))
            continue
        out.append(Invocation(program=os.path.basename(words[i]), args=words[i + 1:], env={**exported, **prefix},
                              assignments={**shell_vars, **prefix}, source=cmd))
    return out


def _host_part(value: str) -> str:
    v = value.strip()
    if v.startswith("[") and "]" in v:  # [::] or [::]:8265
        return v[1:v.index("]")]
    try:
        ipaddress.ip_address(v)
        return v
    except ValueError:
        pass
    return v.rsplit(":", 1)[0] if v.count(":") == 1 else v  # host:port


def is_wildcard(value: str | None) -> bool:
    """An address that binds every interface: 0.0.0.0, ::, [::], 0, * or empty (with or without a port)."""
    if value is None:
        return False
    h = _host_part(value)
    if h in ("", "*", "0", "0.0.0.0", "::"):
        return True
    try:
        return ipaddress.ip_address(h).is_unspecified
    except ValueError:
        return False


def is_loopback(value: str | None) -> bool:
    if value is None:
        return False
    h = _host_part(value)
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


BIND_OPTIONS = {"bind", "listen", "node-ip-address"}  # besides every option whose name ends in "host"


def all_commands(config) -> list[str]:
    """Every string in every ``*commands`` list anywhere in the config (node types included)."""
    found: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if isinstance(k, str) and k.endswith("commands") and isinstance(v, list):
                    found.extend(c for c in v if isinstance(c, str))
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(config)
    return found


def check_commands(config: dict, *, metrics_port: str = "8080") -> list[str]:
    """Violations of the cluster's network and auth rules in ``config``'s commands (empty = fine)."""
    problems: list[str] = []
    ray_starts: list[Invocation] = []
    for cmd in all_commands(config):
        for inv in parse_command(cmd):
            for name, value in inv.options():
                if (name.endswith("host") or name in BIND_OPTIONS) and is_wildcard(value):
                    problems.append(f"--{name}={value} binds all interfaces: {cmd!r}")
                if name == "ray-debugger-external":
                    problems.append(f"--ray-debugger-external opens the debugger to the network: {cmd!r}")
            for k, v in inv.assignments.items():
                if k.upper().endswith("HOST") and is_wildcard(v):
                    problems.append(f"{k}={v} binds all interfaces: {cmd!r}")
            if inv.program == "ray" and inv.args[:1] == ["start"]:
                ray_starts.append(inv)
    heads = [r for r in ray_starts if "--head" in r.args]
    if not heads:
        problems.append("no `ray start --head` command")
    if not [r for r in ray_starts if "--head" not in r.args]:
        problems.append("no worker `ray start --address=...` command")
    for r in ray_starts:
        where = f"`ray start {' '.join(r.args)}`"
        if r.env.get("RAY_AUTH_MODE") != "token":
            problems.append(f"{where} runs without RAY_AUTH_MODE=token in its environment (export it)")
        if r.option("metrics-export-port") != [metrics_port]:
            problems.append(f"{where}: needs --metrics-export-port={metrics_port}")
        labels = r.option("labels")
        if len(labels) != 1 or not labels[0] or not any(kv.startswith("rack=") for kv in labels[0].split(",")):
            problems.append(f"{where}: needs --labels rack=<name>")
    for r in heads:
        hosts = r.option("dashboard-host")
        if len(hosts) != 1 or not is_loopback(hosts[0]):
            problems.append(f"head `ray start` must bind the dashboard / job API to loopback explicitly "
                            f"(--dashboard-host=127.0.0.1), got {hosts or 'no --dashboard-host'}")
    return problems


# ---------------------------------------------------------------- tests


def test_ray_accepts_the_config_as_ray_up_loads_it():
    """``_bootstrap_config`` is ``ray up``'s loader: local-provider preparation, defaults, schema validation."""
    from ray.autoscaler._private.commands import _bootstrap_config
    from ray.autoscaler._private.util import validate_config

    raw = load()
    assert "available_node_types" not in raw and "head_node_type" not in raw  # the local provider refuses them
    prepared = _bootstrap_config(copy.deepcopy(raw), no_config_cache=True)
    validate_config(prepared)  # raises jsonschema.ValidationError naming the field
    assert prepared["provider"]["type"] == "local"
    (node_type,) = prepared["available_node_types"].values()  # one type: labels come from the start commands
    n = len(raw["provider"]["worker_ips"])
    assert node_type["min_workers"] == node_type["max_workers"] == n  # every listed machine stays in
    assert prepared["file_mounts"][TOKEN_TARGET] == "cluster/secrets/ray_token"
    # the prepared config carries the same commands (setup commands merged into head/worker ones)
    assert check_commands(prepared) == []


def test_schema_validation_can_fail():
    from ray.autoscaler._private.commands import _bootstrap_config

    bad = load()
    bad["head_start_ray_commands"] = "ray start --head"  # a string, not a list
    with pytest.raises(Exception, match="is not of type 'array'"):
        _bootstrap_config(bad, no_config_cache=True)


def test_nothing_binds_all_interfaces_and_every_ray_start_uses_token_auth():
    cfg = load()
    assert check_commands(cfg) == []
    starts = [inv for c in all_commands(cfg) for inv in parse_command(c)
              if inv.program == "ray" and inv.args[:1] == ["start"]]
    assert len(starts) == 2  # one head, one worker command
    head = next(s for s in starts if "--head" in s.args)
    assert head.option("dashboard-host") == ["127.0.0.1"] and head.option("dashboard-port") == ["8265"]
    assert "RAY_AUTH_MODE" in head.env and head.env["PATH"].startswith("$HOME/tide-venv/bin")


MUTATIONS = [
    # (description, function that mutates the config in place, text expected in a problem)
    ("dashboard on 0.0.0.0", lambda c: _sub(c, "head_start_ray_commands", "--dashboard-host=127.0.0.1",
                                            "--dashboard-host=0.0.0.0"), "dashboard-host=0.0.0.0"),
    ("dashboard on :: (separate argument)", lambda c: _sub(c, "head_start_ray_commands",
                                                           "--dashboard-host=127.0.0.1", "--dashboard-host '::'"),
     "dashboard-host=::"),
    ("dashboard host dropped (Ray's default)", lambda c: _sub(c, "head_start_ray_commands",
                                                              "--dashboard-host=127.0.0.1", ""), "loopback"),
    ("serve HTTP on all interfaces in a setup command",
     lambda c: c["setup_commands"].append("serve start --http-host [::] --http-port 8000"), "http-host=[::]"),
    ("tide serve on 0.0.0.0:8000 behind env", lambda c: c["head_setup_commands"].append(
        "nohup env OMP_NUM_THREADS=1 tide serve runs/x --host=0.0.0.0 > serve.log 2>&1 &"), "host=0.0.0.0"),
    ("wildcard through an environment variable", lambda c: c["setup_commands"].append(
        "export RAY_SERVE_HTTP_HOST=0.0.0.0"), "RAY_SERVE_HTTP_HOST=0.0.0.0"),
    ("debugger opened", lambda c: _sub(c, "worker_start_ray_commands", "--disable-usage-stats",
                                       "--disable-usage-stats --ray-debugger-external"), "debugger"),
    ("token auth dropped", lambda c: _sub(c, "worker_start_ray_commands", "export RAY_AUTH_MODE=token ", "export "),
     "RAY_AUTH_MODE=token"),
    ("token auth set but not exported", lambda c: _sub(c, "head_start_ray_commands",
                                                       "export RAY_AUTH_MODE=token PATH=",
                                                       "RAY_AUTH_MODE=token && export PATH="), "RAY_AUTH_MODE=token"),
    ("metrics port moved", lambda c: _sub(c, "head_start_ray_commands", "--metrics-export-port=8080",
                                          "--metrics-export-port=9090"), "metrics-export-port"),
    ("rack label dropped", lambda c: _sub(c, "worker_start_ray_commands", '--labels="rack=$RACK"', ""), "rack="),
]


def _sub(cfg: dict, key: str, old: str, new: str) -> None:
    cmds = cfg[key]
    hits = [i for i, c in enumerate(cmds) if old in c]
    assert len(hits) == 1, f"mutation target {old!r} not found exactly once in {key}"
    cmds[hits[0]] = cmds[hits[0]].replace(old, new)


@pytest.mark.parametrize("what,mutate,expected", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_the_checker_catches_a_mutated_config(what, mutate, expected):
    cfg = load()
    cfg.setdefault("head_setup_commands", [])
    mutate(cfg)
    problems = check_commands(cfg)
    assert any(expected in p for p in problems), (what, problems)


def test_wildcard_and_loopback_recognition():
    for v in ("0.0.0.0", "::", "[::]", "0:0:0:0:0:0:0:0", "", "*", "0.0.0.0:8265", "[::]:8265"):
        assert is_wildcard(v), v
    for v in ("127.0.0.1", "localhost", "::1", "10.0.0.10", "127.0.0.1:8265", "node-1", "$RAY_HEAD_IP"):
        assert not is_wildcard(v), v
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and not is_loopback("::")


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)


def test_the_token_file_is_ignored_and_never_tracked():
    if _git("rev-parse", "--is-inside-work-tree").returncode != 0:
        pytest.skip("not a git checkout")
    src = load()["file_mounts"][TOKEN_TARGET]
    assert not Path(src).is_absolute() and src.startswith("cluster/secrets/")
    assert _git("check-ignore", "-q", src).returncode == 0, f"{src} is not gitignored"
    tracked = _git("ls-files", "--", "cluster/secrets").stdout.split()
    assert tracked == [], f"tracked secret files: {tracked}"
    # every other file mount is either tracked (the config itself) or a local build output
    for target, local in load()["file_mounts"].items():
        if target != TOKEN_TARGET:
            assert local == "cluster/cluster.yaml" or _git("check-ignore", "-q", local).returncode == 0, local


def test_working_dir_uploads_skip_the_venv_runs_and_the_token():
    """Ray's working_dir packaging reads .rayignore (always) and .gitignore (unless
    RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1): check with .rayignore alone."""
    from ray._private.runtime_env.packaging import get_excludes_from_ignore_files

    (rayignore,) = get_excludes_from_ignore_files(ROOT, include_gitignore=False)
    for p in (".venv", ".venv/bin/python", "runs", "runs/pipeline/metrics.jsonl", "cluster/secrets",
              "cluster/secrets/ray_token", "dist/tide-src.tar.gz"):
        assert rayignore(ROOT / p), p
    for p in ("cluster/train.py", "configs/pipeline.yaml", "cluster/cluster.yaml", "tests/cluster/job_tiny.yaml"):
        assert not rayignore(ROOT / p), p


def test_rack_map_covers_every_machine_and_matches_the_topologies():
    from cluster.launch.rack_label import load_rack_map
    from cluster.launch.topology import RACK_NAME, load_topology
    from cluster.training.config import load_train_config

    cfg = load()
    racks = load_rack_map(cfg)
    machines = [cfg["provider"]["head_ip"], *cfg["provider"]["worker_ips"]]
    assert len(set(machines)) == len(machines), "head_ip / worker_ips list a machine twice"
    listed = [h for hosts in racks.values() for h in hosts]
    assert sorted(listed) == sorted(machines), "provider.racks must list every machine of head_ip/worker_ips once"
    assert all(RACK_NAME.fullmatch(r) for r in racks)
    for path in ("configs/pipeline.yaml", "tests/cluster/job_tiny.yaml"):
        topo = load_topology(load_train_config(ROOT / path).parallel.topology)
        assert set(topo.racks) <= set(racks), (path, topo.racks, sorted(racks))
    # the start commands read the rack map from the mounted copy of this very file
    (mounted,) = [t for t, local in cfg["file_mounts"].items() if local == "cluster/cluster.yaml"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any(f"cluster.launch.rack_label {mounted}" in c for c in cfg[key]), key


def test_rack_label_finds_the_machines_rack(capsys):
    from cluster.launch.rack_label import load_rack_map, main, rack_of

    racks = load_rack_map(load())
    assert rack_of(racks, {"10.0.0.10"}) == "r0" and rack_of(racks, {"fe80::1", "10.0.1.11"}) == "r1"
    with pytest.raises(ValueError, match="in no rack"):
        rack_of(racks, {"192.0.2.1"})
    with pytest.raises(ValueError, match="several racks"):
        rack_of(racks, {"10.0.0.10", "10.0.1.10"})
    assert main([str(CLUSTER_YAML), "--address", "10.0.1.10"]) == 0
    assert capsys.readouterr().out == "r1\n"
    assert main([str(CLUSTER_YAML), "--address", "192.0.2.1"]) == 2
    assert "add its IP to the rack" in capsys.readouterr().err
    bad = load()
    bad["provider"]["racks"]["r1"].append("10.0.0.11")
    with pytest.raises(ValueError, match="listed in rack r0 and in rack r1"):
        load_rack_map(bad)
    bad["provider"]["racks"] = {"rack 0": ["10.0.0.10"]}
    with pytest.raises(ValueError, match="cannot be a Ray node label"):
        load_rack_map(bad)
    del bad["provider"]["racks"]
    with pytest.raises(ValueError, match="provider.racks must map"):
        load_rack_map(bad)


@pytest.mark.parametrize("loopback", ["localhost", "127.0.0.1", "127.0.1.1", "::1", "LocalHost.", "0.0.0.0"])
def test_rack_map_refuses_loopback_entries(loopback, tmp_path, capsys):
    """A loopback entry is an address of every machine: every node would match its rack."""
    from cluster.launch.rack_label import load_rack_map, main

    cfg = load()
    cfg["provider"]["racks"]["r1"].append(loopback)
    with pytest.raises(ValueError, match=r"provider\.racks\.r1 lists .*a loopback address that every machine has"):
        load_rack_map(cfg)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main([str(path), "--address", "10.0.1.10"]) == 2  # refused even for a machine listed correctly
    assert "loopback" in capsys.readouterr().err


def test_rack_map_lists_exactly_the_machines_of_head_ip_and_worker_ips():
    from cluster.launch.rack_label import load_rack_map

    cfg = load()
    cfg["provider"]["worker_ips"].append("10.0.2.10")  # a new machine not put in a rack
    cfg["provider"]["racks"]["r1"].append("10.0.9.9")  # and a rack entry that is no machine
    with pytest.raises(ValueError) as info:
        load_rack_map(cfg)
    msg = str(info.value)
    assert "exactly once" in msg and "in no rack: 10.0.2.10" in msg, msg
    assert "not in provider.head_ip / worker_ips: 10.0.9.9" in msg, msg
    cfg = load()
    cfg["provider"]["racks"]["r1"].remove("10.0.1.11")
    with pytest.raises(ValueError, match=r"in no rack: 10\.0\.1\.11$"):
        load_rack_map(cfg)
    cfg = load()
    cfg["provider"]["worker_ips"].append("10.0.0.10")  # the head again
    with pytest.raises(ValueError, match=r"listed twice in provider.head_ip / worker_ips: 10\.0\.0\.10"):
        load_rack_map(cfg)
    cfg = load()
    del cfg["provider"]["worker_ips"]
    with pytest.raises(ValueError, match="provider.head_ip .* and provider.worker_ips .* are needed"):
        load_rack_map(cfg)


def test_rack_label_recognises_this_machine(tmp_path, capsys):
    """Without --address the helper matches the machine's own interface addresses (as on a node)."""
    import ipaddress

    from cluster.launch.rack_label import local_addresses, main

    mine = sorted(a for a in local_addresses() if _is_ip(a) and not ipaddress.ip_address(a).is_loopback)
    if not mine:
        pytest.skip("no non-loopback address on this machine")
    cfg = load()
    cfg["provider"].update(racks={"r0": ["10.255.255.1"], "r7": [mine[0]]}, head_ip="10.255.255.1",
                           worker_ips=[mine[0]])
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main([str(path)]) == 0
    assert capsys.readouterr().out == "r7\n"


def _is_ip(a: str) -> bool:
    try:
        ipaddress.ip_address(a)
        return True
    except ValueError:
        return False


def test_start_commands_run_under_bash_with_the_rack_label_and_token_mode(tmp_path):
    """Run the YAML's start commands in bash with a stand-in ``ray`` (records its arguments and
    RAY_AUTH_MODE) and the real ``python -m cluster.launch.rack_label`` on a rack map holding this machine."""
    import ipaddress
    import sys

    from cluster.launch.rack_label import local_addresses

    mine = sorted(a for a in local_addresses() if _is_ip(a) and not ipaddress.ip_address(a).is_loopback)
    if not mine:
        pytest.skip("no non-loopback address on this machine")
    home = tmp_path / "home"
    venv_bin = home / "tide-venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    (venv_bin / "ray").write_text('#!/bin/sh\necho "RAY_AUTH_MODE=$RAY_AUTH_MODE $*" >> "$HOME/calls"\n')
    for f in venv_bin.iterdir():
        f.chmod(0o755)
    cfg = load()
    cfg["provider"].update(racks={"r0": ["10.255.255.1"], "r5": [mine[0]]}, head_ip="10.255.255.1",
                           worker_ips=[mine[0]])
    (home / "tide-cluster.yaml").write_text(yaml.safe_dump(cfg))
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RAY_HEAD_IP": "10.0.0.10",
           "PYTHONPATH": str(ROOT)}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for cmd in cfg[key]:
            r = subprocess.run(["bash", "-c", cmd], cwd=home, env=env, capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, (cmd, r.stderr)
    calls = (home / "calls").read_text().splitlines()
    assert calls[0] == calls[2] == "RAY_AUTH_MODE= stop"
    head, worker = shlex.split(calls[1]), shlex.split(calls[3])
    assert head[:3] == ["RAY_AUTH_MODE=token", "start", "--head"] and "--labels=rack=r5" in head
    assert "--dashboard-host=127.0.0.1" in head and "--metrics-export-port=8080" in head
    assert worker[:2] == ["RAY_AUTH_MODE=token", "start"] and "--address=10.0.0.10:6379" in worker
    assert "--labels=rack=r5" in worker

    # a machine missing from the rack map (and the machine list) does not start Ray at all
    cfg["provider"].update(racks={"r0": ["10.255.255.1"]}, worker_ips=[])
    (home / "tide-cluster.yaml").write_text(yaml.safe_dump(cfg))
    (home / "calls").unlink()
    r = subprocess.run(["bash", "-c", cfg["worker_start_ray_commands"][-1]], cwd=home, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and "is in no rack" in r.stderr and not (home / "calls").exists()

    # the ~/.bashrc line of the setup commands is idempotent
    (bashrc_cmd,) = [c for c in cfg["setup_commands"] if ".bashrc" in c]
    for _ in range(2):
        assert subprocess.run(["bash", "-c", bashrc_cmd], env=env, timeout=60).returncode == 0
    assert (home / ".bashrc").read_text().count("RAY_AUTH_MODE=token") == 1
