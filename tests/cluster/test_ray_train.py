"""End to end under Ray Train on a local cluster: a worker failure is restarted and resumes."""

from __future__ import annotations

import json

import pytest

from tests.cluster.test_trainer import tiny_config

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # its own cluster
    yield
    ray.shutdown()


def test_torchtrainer_run_survives_a_worker_failure(local_ray, tmp_path):
    from cluster import checkpoint as ckpt
    from cluster.train import run

    cfg = tiny_config(tmp_path, "ray", fail_at_step=4, ray={"num_workers": 1, "cpus_per_worker": 1,
                                                            "max_failures": 1},
                      curriculum=[{"name": "a", "seq_len": 64, "batch_tokens": 256, "steps": 4, "attention": "dense"},
                                  {"name": "b", "seq_len": 64, "batch_tokens": 256, "steps": 3,
                                   "attention": "sparse"}])
    path = tmp_path / "train.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    summary = run(str(path))
    run_dir = tmp_path / "ray"
    assert (run_dir / ".injected_failure_done").exists()  # the first attempt did die at step 4
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(7))  # resumed from the step-3 checkpoint, nothing twice
    assert ckpt.checkpoint_step(ckpt.latest_checkpoint(run_dir / "checkpoints")) == 7
    assert summary["checkpoint"].endswith("step-00000007") and summary["steps"] == 7
    assert summary["final_metrics"]["step"] == 6
    assert (run_dir / "loss.png").is_file() and (run_dir / "run_info.json").is_file()
