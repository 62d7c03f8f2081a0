"""deploy/serve.yaml: valid for `serve deploy` (Ray's own schema), local-only, and its placement
bundles are exactly what the deployment computes for its topology."""

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deploy.serve import placement_options
from model import ModelArgs

ROOT = Path(__file__).resolve().parents[2]


def _config() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())


def test_serve_yaml_is_a_valid_serve_deploy_config():
    cfg = ServeDeploySchema.model_validate(_config())  # Ray's validator for `serve deploy`
    assert cfg.http_options.host == "127.0.0.1"
    assert [a.import_path for a in cfg.applications] == ["deploy.serve:build"]


def test_serve_yaml_placement_matches_its_topology():
    app = _config()["applications"][0]
    dep = app["deployments"][0]
    args = ModelArgs.flavor("debug")  # the model `make run` trains (runs/pipeline)
    want = placement_options(app["args"]["topology"], args.num_hidden_layers, args.n_routed_experts)
    assert dep["placement_group_bundles"] == want["placement_group_bundles"]
    assert dep["placement_group_bundle_label_selector"] == want["placement_group_bundle_label_selector"]
    assert dep["placement_group_strategy"] == want["placement_group_strategy"]
    assert dep["ray_actor_options"]["num_cpus"] == want["placement_group_bundles"][0]["CPU"]


def test_serve_build_rejects_bad_arguments(tmp_path):
    from deploy.serve import build

    with pytest.raises(ValueError, match="needs path"):
        build({})
    with pytest.raises(ValueError, match="unknown argument"):
        build({"path": str(tmp_path), "replicas": 2})
    with pytest.raises(ValueError, match="not a run directory|neither"):
        build({"path": str(tmp_path)})
