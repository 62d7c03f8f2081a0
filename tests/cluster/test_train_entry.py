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
