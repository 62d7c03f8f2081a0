"""Ray actors that own one pipeline stage each.

A ``StageWorker`` holds a layer slice of the model, an expert shard, the matching
optimizer shard and the decode state, and manages its lifecycle under Ray Train
or Ray Serve. Actors are deliberately thin: numerics live in ``model`` and data
movement in ``comm``. Imported by ``cluster`` and ``deploy`` only.
"""
