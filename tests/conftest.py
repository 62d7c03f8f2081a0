"""Test configuration: run from the repository root, float32, deterministic seeds."""

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def repo_root() -> str:
    """Absolute path of the repository root (where ``python -m cli`` runs)."""
    return ROOT


@pytest.fixture(scope="module")
def two_racks():
    """A local Ray cluster with two labelled raylets (rack=r0, rack=r1; 2 logical CPUs each), per test module."""
    import ray

    from cluster.launch.local_racks import start_local_racks

    racks = start_local_racks({"r0": 2, "r1": 2})
    yield racks
    ray.shutdown()
    racks.shutdown()
