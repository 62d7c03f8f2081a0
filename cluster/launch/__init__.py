"""Getting an actor graph onto machines: topologies, joining Ray or simulating racks, rack labels.

- ``topology``: topology YAML -> ``ActorGraph`` (stages x expert shards pinned to racks);
- ``connect``: join a running Ray cluster, or start an embedded one (with one labelled
  raylet per rack when the graph needs racks) -- the one place that decides;
- ``local_racks``: the simulated racks (labelled raylets on this machine);
- ``rack_label``: a machine's rack from the rack map of ``cluster/cluster.yaml`` (``ray up``);
- ``link_model``: reading a link-model calibration file.
"""
