"""Cluster-level orchestration: topology, curriculum, data and entry points.

``cluster`` turns a cluster YAML into an ``ActorGraph`` (racks, nodes, pipeline
stages, placement groups), holds the training curriculum (a list of stages looked
up by step), the data pipeline and the Ray Train entry points, and provides the
``tide`` command-line interface (:mod:`cluster.cli`). It may import ``actors``,
``comm``, ``model`` and ``kernels``; nothing below it imports ``cluster``.
"""
