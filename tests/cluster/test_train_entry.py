"""`cluster.train.load_for_run` refuses what would lose a run before starting anything."""

import pytest
import yaml

from cluster import train
from tests.cluster.test_trainer import tiny_config


def test_relative_storage_path_inside_a_ray_job_working_dir_is_refused(tmp_path, monkeypatch):
    job_dir = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    job_dir.mkdir(parents=True)
    cfg = tiny_config(tmp_path, "job")
    cfg["storage_path"] = "runs"
    (job_dir / "c.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(job_dir)
    with pytest.raises(ValueError, match="temporary copy.*--storage-path"):
        train.load_for_run("c.yaml")
    assert not (job_dir / "runs").exists()


def test_sigterm_stops_a_run_like_ctrl_c_and_leaves_no_ray_processes(tmp_path):
    """What a scheduler sends (SIGTERM) takes the Ctrl-C path: exit 130 with the resume hint, the
    embedded cluster stopped (no Ray process of the run left), the committed checkpoints intact."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from cluster.checkpoint import store

    def descendants(pid: int) -> set[int]:
        parent = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    stat = (d / "stat").read_text()
                except OSError:
                    continue
                parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        out, todo = set(), [pid]
        while todo:
            p = todo.pop()
            kids = [c for c, pp in parent.items() if pp == p]
            out.update(kids)
            todo.extend(kids)
        return out

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    cfg = tiny_config(tmp_path, "term", checkpoint={"every_steps": 2, "keep": 2})
    cfg["curriculum"][0]["steps"] = 500
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "cluster.train", str(tmp_path / "c.yaml")], cwd=root,
                            env=dict(os.environ, PYTHONPATH=str(root)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    ckpts = tmp_path / "term" / "checkpoints"
    deadline = time.monotonic() + 240
    while not (ckpts.is_dir() and store.list_checkpoints(ckpts)) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(1)
    children = descendants(proc.pid)
    assert children  # the embedded cluster's raylet, GCS, workers
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted; run the same command again to resume" in err
    time.sleep(5)
    left = [p for p in children if alive(p)]
    assert not left, [Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in left]
    assert all(store.verify_checkpoint(p) == [] for p in store.list_checkpoints(ckpts))
