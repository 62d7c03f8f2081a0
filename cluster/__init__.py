"""Cluster-level orchestration: everything between the model and a cluster of racks.

- ``launch``: topologies -> actor graphs, joining Ray or simulating racks, link models, rack labels;
- ``data``: corpora, byte-level BPE, the token stream and the resumable loader;
- ``checkpoint``: the crash-safe store and the sharded layout of a model in it;
- ``training``: the training config and the one training loop over the actor graph;
- ``ops``: the metrics catalogue and link calibration;
- ``train`` (``python -m cluster.train CONFIG``): a run as ``ray job submit`` runs it.

``cluster`` may import ``actors``, ``comm``, ``model`` and ``kernels``; it imports neither
``deploy`` nor the command-line interface (``cli``), which sit above it (``docs/design.md`` §2).
"""
