"""Training: the run's config, the one training loop over the actor graph, anticipatory routing.

- ``config``: the training YAML -> ``TrainConfig`` (curriculum as data, validated);
- ``trainer``: ``Trainer`` (curriculum, spikes, rollback, anticipatory routing, metrics,
  checkpoints) and ``train`` (connect, run with restarts, summarise);
- ``routing``: when anticipatory routing routes ahead and which steps use it;
- ``plots``: ``loss.png``.
"""
