"""The ``tide`` command-line interface: one module per command.

- ``tide demo``: run a DeepSeek-V4 flavor on real text (byte-level tokens): loss, greedy generation,
  timings, parameter counts and decode-state size (:mod:`cli.demo`).
- ``tide train CONFIG``: curriculum training on the run's actor graph, ``--then-serve`` to serve and
  ask the result once (:mod:`cli.train`).
- ``tide export RUN|CHECKPOINT OUT``: a training checkpoint as an HF-format directory (:mod:`cli.export`).
- ``tide plan CONFIG``: a pipeline config's actor graph and schedule, starting nothing (:mod:`cli.plan`).
- ``tide calibrate``: measure the inter-/intra-rack links and write the link model (:mod:`cli.calibrate`).
- ``tide serve PATH``: OpenAI-compatible endpoints under Ray Serve (:mod:`cli.serve`).
- ``tide verify``: Z3 proofs of the Triton kernels' index arithmetic (:mod:`cli.verify`).
- ``tide cache-bytes``: the decode-state (KV cache) accounting of a flavor as JSON (:mod:`cli.cache_bytes`).
- ``tide config show FLAVOR`` / ``tide config check PATH``: print a flavor as YAML / validate a model
  YAML (:mod:`cli.config`).
- ``tide dashboards [--push URL]``: write the Grafana dashboards (and upload them) (:mod:`cli.dashboards`).

Run as ``tide ...`` once installed, or ``python -m cli ...`` from the repository root
(:func:`cli.main.main`). User errors print one ``tide: error: ...`` line and exit with 2.

Import direction: ``cli`` sits above everything else -- it may import ``deploy``, ``cluster``,
``actors``, ``comm``, ``model`` and ``kernels``; nothing imports ``cli``.
"""
