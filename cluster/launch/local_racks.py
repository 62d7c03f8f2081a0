"""An embedded local Ray cluster that simulates racks: one labelled raylet per rack.

``start_local_racks({"r0": 2, "r1": 2})`` starts a head node without CPUs plus
one node per rack with ``rack=<name>`` as its label and the given CPUs (logical:
they may exceed the machine's cores), then connects this process to it. On a
real cluster the same labels come from ``ray start --labels rack=r0``.

``reachable_ray_address()`` tells whether the address Ray's ``"auto"`` would
join (the ``ray_current_cluster`` file) answers, so that a stale file left by a
killed cluster does not make ``ray.init("auto")`` wait for a dead GCS.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import ray


def _address_file() -> Path:
    return Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"


def reachable_ray_address(timeout_s: float = 2.0) -> str | None:
    """The address in Ray's ``ray_current_cluster`` file if its GCS accepts a TCP connection, else None."""
    f = _address_file()
    try:
        addr = f.read_text().strip().splitlines()[0]
        host, port = addr.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return addr
    except (OSError, ValueError, IndexError):
        return None


class LocalRacks:
    """The running simulated racks; ``shutdown()`` disconnects, stops them and restores Ray's address file."""

    def __init__(self, cluster, previous_address: str | None):
        self.cluster, self.previous_address = cluster, previous_address

    def shutdown(self) -> None:
        if ray.is_initialized():
            ray.shutdown()
        self.cluster.shutdown()
        if self.previous_address is not None:  # the embedded head replaced (and then removed) the user's file
            try:
                _address_file().write_text(self.previous_address)
            except OSError:
                pass


def start_local_racks(cpus_per_rack: dict[str, float], *, object_store_mb: int = 256) -> LocalRacks:
    """Start the simulated racks and ``ray.init`` to them (``shutdown()`` the result when done).

    Interrupted or failed start-up stops whatever was started. Raises ValueError for an empty rack map.
    """
    from ray.cluster_utils import Cluster

    if not cpus_per_rack:
        raise ValueError("need at least one rack")
    try:
        previous = _address_file().read_text() if _address_file().is_file() else None
    except OSError:
        previous = None
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0,
                                                                "object_store_memory": object_store_mb << 20})
        for rack, cpus in cpus_per_rack.items():
            cluster.add_node(num_cpus=cpus, labels={"rack": rack}, object_store_memory=object_store_mb << 20)
        cluster.wait_for_nodes()
        # the INFO lines would say "Connecting to existing Ray cluster": it is the one just started
        ray.init(address=cluster.address, log_to_driver=True, logging_level=logging.WARNING)
    except BaseException:  # KeyboardInterrupt included: never leave raylets (and a stale address file) behind
        if cluster is not None:
            try:
                if ray.is_initialized():
                    ray.shutdown()
                LocalRacks(cluster, previous).shutdown()
            except Exception:  # noqa: BLE001 - the start-up error below is the one to report
                pass
        raise
    return LocalRacks(cluster, previous)
