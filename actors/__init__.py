"""Ray actors that own one pipeline stage each.

A ``StageWorker`` holds a layer slice of the model, an expert shard, the matching
optimizer shard, the routing cached for anticipatory routing and the decode states;
the training loop (``cluster.training``) and Ray Serve (``deploy``) drive the same class. Actors are deliberately thin: numerics live in ``model`` and data
movement in ``comm``. Imported by ``cluster`` and ``deploy`` only.
"""
