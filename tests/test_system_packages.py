"""scripts/system-packages.sh, which `make test` runs first: it installs the Prometheus server and
promtool when missing (apt-get, through sudo when not root) and otherwise stops naming the package.

Each case runs the real script with PATH limited to a folder of stand-ins (``id``, ``apt-get``,
``sudo``), so the branches for root / non-root / no apt-get / stale package lists are exercised
without touching the machine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "system-packages.sh"
BASH = shutil.which("bash")
TOOLS = ("cat", "env", "chmod", "cp", "touch")  # what the script and the stand-ins call besides the stand-ins



def _bin(tmp_path: Path, *, uid: int = 0, apt: str | None = None, sudo: bool = False,
         present: tuple[str, ...] = ()) -> Path:
    """A PATH folder with the basic tools, a stand-in ``id -u`` printing ``uid``, optionally a stand-in
    ``apt-get`` (``apt="works"``: install creates prometheus + promtool; ``"needs-update"``: install
    fails until ``update`` ran; ``"broken"``: every call fails), a pass-through ``sudo``, and stand-ins for
    the commands in ``present``. Every apt-get / sudo call is appended to ``calls.log``."""
    b = tmp_path / "bin"
    b.mkdir()
    for t in TOOLS:
        os.symlink(shutil.which(t), b / t)
    log = tmp_path / "calls.log"

    def script(name: str, body: str) -> None:
        (b / name).write_text(f"#!{BASH}\n{body}\n")
        (b / name).chmod(0o755)

    script("id", f'[ "$1" = "-u" ] && echo {uid}')
    for c in present:
        script(c, "exit 0")
    if apt is not None:
        make = f'printf "#!{BASH}\\nexit 0\\n" > {b}/prometheus; cp {b}/prometheus {b}/promtool; ' \
               f'chmod +x {b}/prometheus {b}/promtool'
        script("apt-get", f"""echo "apt-get $* uid=$(id -u)" >> {log}
case "{apt}:$1" in
  broken:*) exit 100 ;;
  *:update) touch {tmp_path}/updated; exit 0 ;;
  needs-update:install) [ -e {tmp_path}/updated ] || exit 100; {make} ;;
  works:install) {make} ;;
esac""")
    if sudo:
        script("sudo", f'echo "sudo $1" >> {log}; "$@"')
    return b


def _run(b: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([BASH, str(SCRIPT), *args], env={"PATH": str(b)}, capture_output=True, text=True,
                          timeout=60)


def _calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_nothing_to_do_when_both_commands_are_there(tmp_path):
    b = _bin(tmp_path, apt="broken", present=("prometheus", "promtool"))
    r = _run(b)
    assert r.returncode == 0, r.stderr
    assert _calls(tmp_path) == []


def test_check_only_names_the_missing_command_and_the_package(tmp_path):
    b = _bin(tmp_path, apt="works", present=("prometheus",))
    r = _run(b, "--check")
    assert r.returncode == 1
    assert "promtool" in r.stderr and "package: prometheus" in r.stderr
    assert _calls(tmp_path) == [] and not (b / "promtool").exists()


def test_root_installs_with_apt_get(tmp_path):
    b = _bin(tmp_path, apt="works")
    r = _run(b)
    assert r.returncode == 0, r.stderr
    assert (b / "prometheus").exists() and (b / "promtool").exists()
    calls = _calls(tmp_path)
    assert len(calls) == 1 and calls[0].startswith("apt-get install") and "prometheus" in calls[0]


def test_stale_package_lists_are_refreshed_then_the_install_retried(tmp_path):
    b = _bin(tmp_path, apt="needs-update")
    r = _run(b)
    assert r.returncode == 0, r.stderr
    assert [c.split()[1] for c in _calls(tmp_path)] == ["install", "update", "install"]
    assert (b / "promtool").exists()


def test_non_root_goes_through_sudo(tmp_path):
    b = _bin(tmp_path, uid=1000, apt="works", sudo=True)
    r = _run(b)
    assert r.returncode == 0, r.stderr
    calls = _calls(tmp_path)
    assert calls[0] == "sudo env" and calls[1].startswith("apt-get install"), calls
    assert "via sudo" in r.stderr


@pytest.mark.parametrize("case, why", [
    ({"uid": 1000, "apt": "works"}, "needs root, and sudo was not found"),
    ({"uid": 0}, "apt-get was not found"),
    ({"uid": 0, "apt": "broken"}, "apt-get update failed"),
])
def test_clear_error_naming_the_package_when_it_cannot_install(tmp_path, case, why):
    b = _bin(tmp_path, **case)
    r = _run(b)
    assert r.returncode == 1
    assert why in r.stderr
    assert "package: prometheus" in r.stderr and "apt-get install --no-install-recommends prometheus" in r.stderr
    assert not (b / "prometheus").exists()


def test_make_test_runs_it_and_ci_adds_nothing():
    """`make test` depends on the system-packages target, and .ci/run is that command alone."""
    mk = (ROOT / "Makefile").read_text()
    test_rule = next(ln for ln in mk.splitlines() if ln.startswith("test:"))
    assert "system-packages" in test_rule.split(":", 1)[1].split()
    assert "\tbash scripts/system-packages.sh" in mk
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
          if ln.strip() and not ln.lstrip().startswith("#")]
    assert ci[-1] == "make test" and not any(re.search(r"\b(apt-get|apt|pip|pip3)\b", ln) for ln in ci), ci
