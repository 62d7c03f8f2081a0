"""Communication between pipeline stages and expert shards.

Transport over ``torch.distributed`` (p2p and ``all_to_all``: gloo on CPU, nccl on
GPU), a link model that shapes latency and bandwidth to emulate inter-rack links,
pipeline schedules expressed as action lists (1F1B / DualPipe-style), the wave
scheduler that overlaps expert dispatch/combine with compute, timeline traces and
an nccl-tests runner/parser for calibration. Depends on ``torch.distributed``
only; never imports ray.
"""
