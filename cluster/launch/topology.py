"""Topology: racks, data-parallel replicas, pipeline stages and expert parallelism -> an ``ActorGraph``.

A topology YAML::

    racks: [r0, r1]            # node label rack=<name> (`ray start --labels rack=r0`); optional for a 1 x 1 graph
    data_parallel: 1           # D replicas of the whole P x E graph (default 1)
    pipeline_stages: 2
    expert_parallel: 2         # actors per stage; a stage's experts are sharded across them
    placement: {0: r0, 1: r1}  # stage -> rack; default: stages spread over racks in order
    cpus_per_actor: 1
    gpus_per_actor: 0          # 1: each stage actor gets a GPU and the transport is nccl (else gloo on CPU)

``build_graph(topology, num_layers)`` gives the ``ActorGraph``: one actor per
(replica, stage, expert shard), each pinned to its stage's rack by a label
selector (a stage never straddles racks), contiguous layer slices per stage, the
pipeline groups (same replica and expert shard across consecutive stages), the
expert groups (all actors of one replica's stage), the replica groups (the D
copies of one (stage, shard): gradient all-reduce, ZeRO-1 optimizer sharding)
and every link with its class (intra- or inter-rack), which the link model uses
to shape transfers. Stage identity comes from this graph and the rack label,
never from a rank order.

Replicas on racks: the D x P *stage instances* (replica d, stage s) are laid over
the racks in order, instance ``d * P + s`` on rack ``racks[(d * P + s) * R // (D * P)]``
(R racks), so with R = D x P every instance has a rack of its own, with R = D
every replica fills one rack (its pipeline traffic stays inside the rack; only the
once-per-step gradient all-reduce crosses racks), and with fewer racks consecutive
instances share one. ``placement`` overrides it: a mapping ``stage -> rack`` puts
every replica's stage s on that rack; a list of D such mappings places each
replica separately. Global ranks are ``d * P * E + s * E + e``.

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
    """One stage actor: global ``rank``, ``stage``, expert shard ``ep_rank``, its ``rack``, its
    data-parallel replica ``dp_rank``."""

    rank: int
    stage: int
    ep_rank: int
    rack: str | None  # None: any node (a 1 x 1 graph without racks)
    dp_rank: int = 0

    @property
    def label_selector(self) -> dict[str, str]:
        return {} if self.rack is None else {"rack": self.rack}


@dataclass(frozen=True)
class Link:
    src: int
    dst: int
    kind: str  # "pipeline" (activations / gradients), "expert" (dispatch / combine), "data-parallel" (grads)
    link_class: str  # "intra-rack" or "inter-rack"


@dataclass
class ActorGraph:
    """Stages, actors, their groups and links (see module docstring)."""

    actors: list[ActorSpec]
    layer_slices: list[tuple[int, int]]  # stage -> [start, end) of decoder layers
    pipeline_groups: list[list[int]]  # per (replica, expert shard), replica-major: ranks of stages 0..P-1
    expert_groups: list[list[int]]  # per (replica, stage), replica-major: ranks of its expert shards
    links: list[Link] = field(default_factory=list)
    cpus_per_actor: float = 1
    gpus_per_actor: float = 0
    data_parallel: int = 1
    replica_groups: list[list[int]] = field(default_factory=list)  # per (stage, shard): ranks of replicas 0..D-1

    @property
    def num_stages(self) -> int:
        return len(self.layer_slices)

    @property
    def expert_parallel(self) -> int:
        return len(self.expert_groups[0])

    def actor(self, stage: int, ep_rank: int, dp_rank: int = 0) -> ActorSpec:
        return next(a for a in self.actors if a.stage == stage and a.ep_rank == ep_rank and a.dp_rank == dp_rank)

    def shape(self) -> str:
        """``"D x P x E"`` in words, e.g. ``"2 replicas x 2 stages x 2 expert shards"``."""
        P, E, D = self.num_stages, self.expert_parallel, self.data_parallel
        words = f"{P} stage(s) x {E} expert shard(s)"
        return f"{D} data-parallel replicas x {words}" if D > 1 else words

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
    placement: dict[int, str] | list[dict[int, str]] | None = None
    cpus_per_actor: float = 1
    gpus_per_actor: float = 0
    data_parallel: int = 1

    def rack_of(self, stage: int, replica: int = 0) -> str | None:
        """The rack of ``replica``'s ``stage`` (see the module docstring)."""
        if self.racks is None:
            return None
        if isinstance(self.placement, list):
            return self.placement[replica][stage]
        if self.placement is not None:
            return self.placement[stage]
        # spread the D x P stage instances over racks in order, consecutive ones sharing a rack
        # when there are fewer racks
        P = self.pipeline_stages
        return self.racks[(replica * P + stage) * len(self.racks) // (self.data_parallel * P)]


def load_topology(source: str | Path | dict) -> Topology:
    """Parse and validate a topology (YAML path or dict). Raises ValueError naming the problem."""
    from model.safe_io import read_yaml_mapping

    data, where = read_yaml_mapping(source, "topology")
    allowed = {"racks", "data_parallel", "pipeline_stages", "expert_parallel", "placement", "cpus_per_actor",
               "gpus_per_actor"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    racks = data.get("racks")
    P, E = data.get("pipeline_stages", 1), data.get("expert_parallel", 1)
    D = data.get("data_parallel", 1)
    if racks is None and (P, E, D) == (1, 1, 1) and data.get("placement") is None:
        pass  # one actor, any node
    elif not isinstance(racks, list) or not racks or not all(isinstance(r, str) and r for r in racks):
        raise ValueError(f"{where}: racks must be a non-empty list of rack names (it may be left out only for "
                         f"1 replica x 1 pipeline stage x 1 expert shard)")
    if racks is not None and len(set(racks)) != len(racks):
        raise ValueError(f"{where}: duplicate rack names in {racks}")
    bad_names = [r for r in racks or () if not RACK_NAME.fullmatch(r)]
    if bad_names:
        raise ValueError(f"{where}: rack names {bad_names} cannot be Ray node label values: use 1-63 letters, "
                         f"digits, '-', '_' or '.', starting and ending with a letter or digit")
    for key in ("data_parallel", "pipeline_stages", "expert_parallel"):
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
        if isinstance(placement, list):
            if len(placement) != D:
                raise ValueError(f"{where}: a placement list gives one stage -> rack mapping per data-parallel "
                                 f"replica: data_parallel is {D}, the list has {len(placement)}")
            placement = [_stage_racks(m, P, racks, f"{where}: placement[{d}]") for d, m in enumerate(placement)]
        else:
            placement = _stage_racks(placement, P, racks, f"{where}: placement")
    return Topology(racks=racks, pipeline_stages=P, expert_parallel=E, placement=placement,
                    cpus_per_actor=float(cpus), gpus_per_actor=gpus, data_parallel=D)


def _stage_racks(placement, P: int, racks: list[str], where: str) -> dict[int, str]:
    """A validated ``stage -> rack`` mapping (stage keys may be digit strings)."""
    if not isinstance(placement, dict):
        raise ValueError(f"{where} must map stage -> rack, e.g. {{0: r0, 1: r1}} (or, with data_parallel > 1, "
                         f"be a list of such mappings, one per replica: [{{0: r0, 1: r1}}, {{0: r1, 1: r0}}]); "
                         f"got {placement!r}")
    bad_items = [(k, v) for k, v in placement.items()
                 if isinstance(k, bool) or not isinstance(k, int) and not (isinstance(k, str) and k.isdigit())
                 or not isinstance(v, str)]
    if bad_items:
        raise ValueError(f"{where} must map stage numbers to rack names (e.g. {{0: r0, 1: r1}}), got {bad_items}")
    placement = {int(k): v for k, v in placement.items()}
    if sorted(placement) != list(range(P)):
        raise ValueError(f"{where} must name a rack for every stage 0..{P - 1}, got {sorted(placement)}")
    bad = sorted({v for v in placement.values() if v not in racks})
    if bad:
        raise ValueError(f"{where} uses unknown rack(s) {bad}; racks: {racks}")
    return placement


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
    P, E, D = topo.pipeline_stages, topo.expert_parallel, topo.data_parallel
    if n_routed_experts is not None and n_routed_experts % E:
        raise ValueError(f"n_routed_experts ({n_routed_experts}) must be divisible by expert_parallel ({E})")
    slices = split_layers(num_layers, P)
    actors = [ActorSpec(rank=(d * P + s) * E + e, stage=s, ep_rank=e, rack=topo.rack_of(s, d), dp_rank=d)
              for d in range(D) for s in range(P) for e in range(E)]
    rank = {(a.dp_rank, a.stage, a.ep_rank): a for a in actors}
    pipeline_groups = [[rank[(d, s, e)].rank for s in range(P)] for d in range(D) for e in range(E)]
    expert_groups = [[rank[(d, s, e)].rank for e in range(E)] for d in range(D) for s in range(P)]
    replica_groups = [[rank[(d, s, e)].rank for d in range(D)] for s in range(P) for e in range(E)]

    def cls(a: ActorSpec, b: ActorSpec) -> str:
        return "intra-rack" if a.rack == b.rack else "inter-rack"

    links = [Link(rank[(d, s, e)].rank, rank[(d, s + 1, e)].rank, "pipeline",
                  cls(rank[(d, s, e)], rank[(d, s + 1, e)]))
             for d in range(D) for e in range(E) for s in range(P - 1)]
    links += [Link(rank[(d, s, i)].rank, rank[(d, s, j)].rank, "expert", "intra-rack")
              for d in range(D) for s in range(P) for i in range(E) for j in range(E) if i != j]
    links += [Link(rank[(a, s, e)].rank, rank[(b, s, e)].rank, "data-parallel",
                   cls(rank[(a, s, e)], rank[(b, s, e)]))
              for s in range(P) for e in range(E) for a in range(D) for b in range(D) if a != b]
    return ActorGraph(actors, slices, pipeline_groups, expert_groups, links, topo.cpus_per_actor,
                      topo.gpus_per_actor, data_parallel=D, replica_groups=replica_groups)


def one_replica(graph: ActorGraph) -> ActorGraph:
    """Replica 0 of ``graph`` as a graph of its own (D = 1; ranks unchanged, they are replica 0's):
    what serving runs (a replica of the training graph; Serve scales replicas itself)."""
    actors = [a for a in graph.actors if a.dp_rank == 0]
    keep = {a.rank for a in actors}
    E = graph.expert_parallel
    return ActorGraph(actors, list(graph.layer_slices), graph.pipeline_groups[:E],
                      graph.expert_groups[:graph.num_stages],
                      [lk for lk in graph.links if lk.src in keep and lk.dst in keep], graph.cpus_per_actor,
                      graph.gpus_per_actor, data_parallel=1, replica_groups=[[r] for r in sorted(keep)])
