"""Training checkpoints: the crash-safe store and the layout of a sharded model in it.

- ``store``: atomic, verified checkpoint directories (safetensors + JSON, sha256 manifest
  written last, commit by rename; never pickle);
- ``sharded``: one tensor group per (pipeline stage, expert shard) inside a checkpoint;
  any layout loads into any other, and one-process checkpoints of earlier versions load too.

``python -m cluster.checkpoint verify PATH...`` checks checkpoints from a shell.
"""
