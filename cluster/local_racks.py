"""An embedded local Ray cluster that simulates racks: one labelled raylet per rack (issue 4).

``start_local_racks({"r0": 2, "r1": 2})`` starts a head node without CPUs plus
one node per rack with ``rack=<name>`` as its label and the given CPUs (logical:
they may exceed the machine's cores), then connects this process to it. On a
real cluster the same labels come from ``ray start --labels rack=r0``.
"""

from __future__ import annotations

import ray


def start_local_racks(cpus_per_rack: dict[str, float], *, object_store_mb: int = 256):
    """Start the simulated racks and ``ray.init`` to them; returns the ``ray.cluster_utils.Cluster``
    (``shutdown()`` it when done). Raises ValueError for an empty rack map."""
    from ray.cluster_utils import Cluster

    if not cpus_per_rack:
        raise ValueError("need at least one rack")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0,
                                                            "object_store_memory": object_store_mb << 20})
    for rack, cpus in cpus_per_rack.items():
        cluster.add_node(num_cpus=cpus, labels={"rack": rack}, object_store_memory=object_store_mb << 20)
    cluster.wait_for_nodes()
    import logging

    # the INFO lines would say "Connecting to existing Ray cluster": it is the one just started
    ray.init(address=cluster.address, log_to_driver=True, logging_level=logging.WARNING)
    return cluster
