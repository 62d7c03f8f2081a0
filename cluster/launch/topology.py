"""Topology: racks, pipeline stages and expert parallelism -> an ``ActorGraph``.

A topology YAML::

    racks: [r0, r1]            # node label rack=<name> (`ray start --labels rack=r0`); optional for a 1 x 1 graph
    pipeline_stages: 2
    expert_parallel: 2         # actors per stage; a stage's experts are sharded across them
    placement: {0: r0, 1: r1}  # stage -> rack; default: stages spread over racks in order
    cpus_per_actor: 1
    gpus_per_actor: 0          # 1: each stage actor gets a GPU and the transport is nccl (else gloo on CPU)

``build_graph(topology, num_layers)`` gives the ``ActorGraph``: one actor per
(stage, expert shard), each pinned to its stage's rack by a label selector (a
stage never straddles racks), contiguous layer slices per stage, the pipeline
groups (same expert shard across consecutive stages), the expert groups (all
actors of a stage) and every link with its class (intra- or inter-rack), which
the link model uses to shape transfers. Stage identity comes from this graph and
the rack label, never from a rank order.

A run without a ``parallel`` section is the 1 x 1 graph of :func:`single_actor`:
one actor holding the whole model, on no particular rack.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RACK_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")  # Ray (Kubernetes-style) label values


@dataclass(frozen=True)
class ActorSpec:
    """One stage actor: global ``rank``, ``stage``, expert shard ``ep_rank``, its ``rack``."""

    rank: int
    stage: int
    ep_rank: int
    rack: str | None  # None: any node (a 1 x 1 graph without racks)

    @property
    def label_selector(self) -> dict[str, str]:
        return {} if self.rack is None else {"rack": self.rack}


@dataclass(frozen=True)
class Link:
    src: int
    dst: int
    kind: str  # "pipeline" (activations / gradients) or "expert" (dispatch / combine)
    link_class: str  # "intra-rack" or "inter-rack"


@dataclass
class ActorGraph:
    """Stages, actors, their groups and links (see module docstring)."""

    actors: list[ActorSpec]
    layer_slices: list[tuple[int, int]]  # stage -> [start, end) of decoder layers
    pipeline_groups: list[list[int]]  # per expert shard: ranks of stages 0..P-1
    expert_groups: list[list[int]]  # per stage: ranks of its expert shards
    links: list[Link] = field(default_factory=list)
    cpus_per_actor: float = 1
    gpus_per_actor: float = 0

    @property
    def num_stages(self) -> int:
        return len(self.layer_slices)

    def actor(self, stage: int, ep_rank: int) -> ActorSpec:
        return next(a for a in self.actors if a.stage == stage and a.ep_rank == ep_rank)

    def cpus_per_rack(self, extra: dict[str, float] | None = None) -> dict[str | None, float]:
        """CPUs the actors need on each rack (plus ``extra`` per rack, e.g. a Serve replica);
        key None: actors that may run on any node."""
        need: dict[str | None, float] = {}
        for a in self.actors:
            need[a.rack] = need.get(a.rack, 0) + self.cpus_per_actor
        for rack, c in (extra or {}).items():
            need[rack] = need.get(rack, 0) + c
        return need

    def stage_of_rack(self, rack: str) -> list[int]:
        """Stages hosted by ``rack`` (how a worker derives its stage from its node label)."""
        return sorted({a.stage for a in self.actors if a.rack == rack})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Topology:
    racks: list[str] | None
    pipeline_stages: int = 1
    expert_parallel: int = 1
    placement: dict[int, str] | None = None
    cpus_per_actor: float = 1
    gpus_per_actor: float = 0

    def rack_of(self, stage: int) -> str | None:
        if self.racks is None:
            return None
        if self.placement is not None:
            return self.placement[stage]
        # spread stages over racks in order, consecutive stages sharing a rack when there are fewer racks
        return self.racks[stage * len(self.racks) // self.pipeline_stages]


def load_topology(source: str | Path | dict) -> Topology:
    """Parse and validate a topology (YAML path or dict). Raises ValueError naming the problem."""
    from model.safe_io import read_yaml_mapping

    data, where = read_yaml_mapping(source, "topology")
    allowed = {"racks", "pipeline_stages", "expert_parallel", "placement", "cpus_per_actor", "gpus_per_actor"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    racks = data.get("racks")
    P, E = data.get("pipeline_stages", 1), data.get("expert_parallel", 1)
    if racks is None and (P, E) == (1, 1) and data.get("placement") is None:
        pass  # one actor, any node
    elif not isinstance(racks, list) or not racks or not all(isinstance(r, str) and r for r in racks):
        raise ValueError(f"{where}: racks must be a non-empty list of rack names (it may be left out only for "
                         f"1 pipeline stage x 1 expert shard)")
    if racks is not None and len(set(racks)) != len(racks):
        raise ValueError(f"{where}: duplicate rack names in {racks}")
    bad_names = [r for r in racks or () if not RACK_NAME.fullmatch(r)]
    if bad_names:
        raise ValueError(f"{where}: rack names {bad_names} cannot be Ray node label values: use 1-63 letters, "
                         f"digits, '-', '_' or '.', starting and ending with a letter or digit")
    for key in ("pipeline_stages", "expert_parallel"):
        v = data.get(key, 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}: {key} must be an int >= 1, got {v!r}")
    cpus = data.get("cpus_per_actor", 1)
    if isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or cpus <= 0:
        raise ValueError(f"{where}: cpus_per_actor must be > 0, got {cpus!r}")
    gpus = data.get("gpus_per_actor", 0)
    if gpus not in (0, 1) or isinstance(gpus, bool):
        raise ValueError(f"{where}: gpus_per_actor must be 0 (CPU, gloo) or 1 (one GPU per stage actor, nccl), "
                         f"got {gpus!r}")
    placement = data.get("placement")
    if placement is not None:
        if not isinstance(placement, dict):
            raise ValueError(f"{where}: placement must map stage -> rack")
        bad_items = [(k, v) for k, v in placement.items()
                     if isinstance(k, bool) or not isinstance(k, int) and not (isinstance(k, str) and k.isdigit())
                     or not isinstance(v, str)]
        if bad_items:
            raise ValueError(f"{where}: placement must map stage numbers to rack names (e.g. {{0: r0, 1: r1}}), "
                             f"got {bad_items}")
        placement = {int(k): v for k, v in placement.items()}
        if sorted(placement) != list(range(P)):
            raise ValueError(f"{where}: placement must name a rack for every stage 0..{P - 1}, got {sorted(placement)}")
        bad = sorted({v for v in placement.values() if v not in racks})
        if bad:
            raise ValueError(f"{where}: placement uses unknown rack(s) {bad}; racks: {racks}")
    return Topology(racks=racks, pipeline_stages=P, expert_parallel=E, placement=placement,
                    cpus_per_actor=float(cpus), gpus_per_actor=gpus)


def single_actor(cpus: float = 2, gpus: int = 0) -> Topology:
    """The topology of a one-process run: 1 stage x 1 expert shard on any node."""
    return Topology(racks=None, pipeline_stages=1, expert_parallel=1, cpus_per_actor=float(cpus), gpus_per_actor=gpus)


def split_layers(num_layers: int, stages: int) -> list[tuple[int, int]]:
    """Contiguous, balanced ``[start, end)`` layer slices (earlier stages get the extra layer)."""
    if num_layers < stages:
        raise ValueError(f"cannot split {num_layers} layers over {stages} pipeline stages (need >= 1 each)")
    base, extra = divmod(num_layers, stages)
    out, start = [], 0
    for s in range(stages):
        n = base + (1 if s < extra else 0)
        out.append((start, start + n))
        start += n
    return out


def build_graph(topo: Topology, num_layers: int, n_routed_experts: int | None = None) -> ActorGraph:
    """The ``ActorGraph`` of ``topo`` for a model with ``num_layers`` decoder layers.

    Raises:
        ValueError: too few layers for the stages, or experts not divisible by
            ``expert_parallel``.
    """
    P, E = topo.pipeline_stages, topo.expert_parallel
    if n_routed_experts is not None and n_routed_experts % E:
        raise ValueError(f"n_routed_experts ({n_routed_experts}) must be divisible by expert_parallel ({E})")
    slices = split_layers(num_layers, P)
    actors = [ActorSpec(rank=s * E + e, stage=s, ep_rank=e, rack=topo.rack_of(s)) for s in range(P) for e in range(E)]
    rank = {(a.stage, a.ep_rank): a for a in actors}
    pipeline_groups = [[rank[(s, e)].rank for s in range(P)] for e in range(E)]
    expert_groups = [[rank[(s, e)].rank for e in range(E)] for s in range(P)]

    def cls(a: ActorSpec, b: ActorSpec) -> str:
        return "intra-rack" if a.rack == b.rack else "inter-rack"

    links = [Link(rank[(s, e)].rank, rank[(s + 1, e)].rank, "pipeline", cls(rank[(s, e)], rank[(s + 1, e)]))
             for e in range(E) for s in range(P - 1)]
    links += [Link(rank[(s, i)].rank, rank[(s, j)].rank, "expert", "intra-rack")
              for s in range(P) for i in range(E) for j in range(E) if i != j]
    return ActorGraph(actors, slices, pipeline_groups, expert_groups, links, topo.cpus_per_actor,
                      topo.gpus_per_actor)
