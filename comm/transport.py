"""Transport on torch.distributed: the process groups of an ``ActorGraph`` and shaped p2p.

``build_mesh(graph, rank)`` (every process, same order) creates:

- one group per *directed* pipeline link and kind -- activations ``s -> s+1`` and
  gradients ``s+1 -> s`` of each expert shard's pipeline -- so every group has
  exactly one sending and one receiving thread;
- per replica and stage an expert group (the stage's expert shards: all-to-all
  dispatch / combine); per stage a dense group over that stage's actors in every
  replica (gradient all-reduce of the replicated parameters, router loads);
- per (stage, shard), with D > 1 data-parallel replicas, a replica group over its
  D copies (the routed experts' gradient all-reduce, ZeRO-1 parameter broadcasts);
- the tied-embedding group (first and last stage, every shard and replica) when
  the last stage holds an embedding copy for MTP;
- the default group (all actors) for step-wide scalars.

Communication runs on background threads (``CommThread``: one per link and
direction, one for the expert all-to-alls), each op optionally held for its
link-model time first (``comm.link_model``), so compute on the main thread
overlaps it; torch releases the GIL inside gloo/nccl calls and sleeps.
gloo on CPU, nccl on GPU: the backend is the default group's.

Letters: P pipeline stages, E expert shards per stage.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .link_model import LinkModel
from .trace import Tracer


@dataclass
class Mesh:
    """This process's place in the actor graph and its process groups.

    ``rank_of[(stage, ep_rank)]`` gives the global rank of a (stage, shard) of this
    process's own replica; ``replica_ranks`` the global ranks of this (stage, shard)
    in replicas 0..D-1. Group handles are None for groups this process is not a
    member of (and ``replica`` when D = 1).
    """

    rank: int
    world: int
    stage: int
    ep_rank: int
    num_stages: int
    ep_size: int
    rank_of: dict[tuple[int, int], int]
    link_class_to: dict[int, str]  # peer rank -> link class ("intra-rack" / "inter-rack")
    act_send: object = None  # group of link (stage -> stage+1) activations
    act_recv: object = None  # group of link (stage-1 -> stage) activations
    grad_send: object = None  # group of link (stage -> stage-1) gradients
    grad_recv: object = None  # group of link (stage+1 -> stage) gradients
    expert: object = None  # this replica's stage: all-to-all dispatch / combine
    dense: object = None  # this stage in every replica (D x E ranks): replicated-parameter grads, router loads
    embed: object = None  # first + last stage of every replica: the tied embedding's gradient
    embed_ranks: list[int] = field(default_factory=list)
    dp_rank: int = 0
    dp_size: int = 1
    replica: object = None  # this (stage, shard) in every replica (D ranks): expert grads, ZeRO-1 broadcasts
    replica_ranks: list[int] = field(default_factory=list)
    dense_size: int = 1  # ranks in ``dense``

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.num_stages - 1

    def peer(self, stage: int) -> int:
        """Global rank of ``stage`` in this process's pipeline (same replica and expert shard)."""
        return self.rank_of[(stage, self.ep_rank)]


def build_mesh(graph, rank: int, *, tied_embedding: bool = True) -> Mesh:
    """Create every process group of ``graph`` (an ``cluster.launch.topology.ActorGraph``).

    Must be called by every process of the default group, in the same order,
    after ``dist.init_process_group`` with ``world_size == len(graph.actors)``.
    ``tied_embedding``: create the first/last-stage embedding group (needed when
    the model has MTP and more than one stage).

    Raises ValueError when the default group's size does not match the graph.
    """
    world = dist.get_world_size()
    if world != len(graph.actors):
        raise ValueError(f"the process group has {world} ranks, the actor graph {len(graph.actors)} actors")
    me = next(a for a in graph.actors if a.rank == rank)
    P, E = graph.num_stages, len(graph.expert_groups[0])
    D = getattr(graph, "data_parallel", 1)
    at = {(getattr(a, "dp_rank", 0), a.stage, a.ep_rank): a.rank for a in graph.actors}
    d_me = getattr(me, "dp_rank", 0)
    rank_of = {(s, e): at[(d_me, s, e)] for s in range(P) for e in range(E)}
    rack = {a.rank: a.rack for a in graph.actors}
    mesh = Mesh(rank=rank, world=world, stage=me.stage, ep_rank=me.ep_rank, num_stages=P, ep_size=E,
                rank_of=rank_of,
                link_class_to={r: ("intra-rack" if rack[r] == me.rack else "inter-rack") for r in rack},
                dp_rank=d_me, dp_size=D, replica_ranks=[at[(d, me.stage, me.ep_rank)] for d in range(D)],
                dense_size=D * E)
    for d in range(D):
        for e in range(E):
            for s in range(P - 1):
                a, b = at[(d, s, e)], at[(d, s + 1, e)]
                g_act = dist.new_group([a, b])
                g_grad = dist.new_group([a, b])
                if rank == a:
                    mesh.act_send, mesh.grad_recv = g_act, g_grad
                if rank == b:
                    mesh.act_recv, mesh.grad_send = g_act, g_grad
        for s in range(P):
            g_exp = dist.new_group([at[(d, s, e)] for e in range(E)])
            if (d, s) == (d_me, me.stage):
                mesh.expert = g_exp
    for s in range(P):
        g_dense = dist.new_group(sorted(at[(d, s, e)] for d in range(D) for e in range(E)))
        if me.stage == s:
            mesh.dense = g_dense
    if D > 1:
        for s in range(P):
            for e in range(E):
                g_rep = dist.new_group([at[(d, s, e)] for d in range(D)])
                if (s, e) == (me.stage, me.ep_rank):
                    mesh.replica = g_rep
    if tied_embedding and P > 1:
        ranks = sorted(at[(d, s, e)] for d in range(D) for s in (0, P - 1) for e in range(E))
        g = dist.new_group(ranks)
        if rank in ranks:
            mesh.embed, mesh.embed_ranks = g, ranks
    return mesh


class CommThread:
    """One background thread running communication ops in submission order.

    ``submit(fn, nbytes, link_class, name, cat, **args)`` holds the op for its
    link-model time (when the model is enabled), runs ``fn()`` and records a trace
    span covering both; returns a ``Future`` of ``fn``'s result. Ops of one thread
    never reorder, which is what keeps collectives matched across ranks.
    """

    def __init__(self, name: str, link: LinkModel | None = None, tracer: Tracer | None = None):
        self.name = name
        self.link = link or LinkModel()
        self.tracer = tracer
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tide-{name}")

    def submit(self, fn, nbytes: int = 0, link_class: str = "intra-rack", name: str = "", cat: str = "comm",
               **args) -> Future:
        def run():
            t0 = time.time()
            self.link.delay(nbytes, link_class)
            out = fn()
            if self.tracer is not None and self.tracer.enabled:
                self.tracer.add(name or cat, cat, self.name, t0, time.time(), bytes=nbytes, **args)
            return out
        return self._pool.submit(run)

    def wait(self, fut: Future, name: str = "wait", **args):
        """``fut.result()``, traced as a ``wait`` span on the compute thread (exposed communication)."""
        if self.tracer is None or not self.tracer.enabled or fut.done():
            return fut.result()
        t0 = time.time()
        out = fut.result()
        self.tracer.add(name, "wait", "compute", t0, time.time(), **args)
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class PipeLinks:
    """Shaped, traced point-to-point transfers between neighbouring stages.

    ``send_act`` / ``recv_act`` move activations forward, ``send_grad`` /
    ``recv_grad`` gradients backward; each direction has its own group and
    thread, so sends never wait behind receives. Receives need the shape (stages
    know their neighbours' wave shapes). All return Futures.
    """

    def __init__(self, mesh: Mesh, link: LinkModel | None = None, tracer: Tracer | None = None):
        self.mesh = mesh
        self.threads = {k: CommThread(k, link, tracer) for k in ("p2p-send-act", "p2p-recv-act",
                                                                   "p2p-send-grad", "p2p-recv-grad")}

    def _send(self, thread: str, t: torch.Tensor, dst_stage: int, group, tag: int, cat: str, **args) -> Future:
        dst = self.mesh.peer(dst_stage)
        t = t.detach().contiguous()
        return self.threads[thread].submit(lambda: dist.send(t, dst, group=group, tag=tag), nbytes(t),
                                           self.mesh.link_class_to[dst], name=f"{cat} ->{dst_stage}", cat=cat,
                                           **args)

    def _recv(self, thread: str, shape, dtype, device, src_stage: int, group, tag: int, cat: str, **args) -> Future:
        src = self.mesh.peer(src_stage)
        buf = torch.empty(shape, dtype=dtype, device=device)

        def run():
            dist.recv(buf, src, group=group, tag=tag)
            return buf
        # the sender holds the link time; the receiver's span is its wait for the data
        return self.threads[thread].submit(run, 0, name=f"{cat} <-{src_stage}", cat=cat, **args)

    def send_act(self, t, tag, **args):
        return self._send("p2p-send-act", t, self.mesh.stage + 1, self.mesh.act_send, tag, "send", kind="act", **args)

    def recv_act(self, shape, dtype, device, tag, **args):
        return self._recv("p2p-recv-act", shape, dtype, device, self.mesh.stage - 1, self.mesh.act_recv, tag, "recv",
                          **args)

    def send_grad(self, t, tag, **args):
        return self._send("p2p-send-grad", t, self.mesh.stage - 1, self.mesh.grad_send, tag, "send", kind="grad",
                          **args)

    def recv_grad(self, shape, dtype, device, tag, **args):
        return self._recv("p2p-recv-grad", shape, dtype, device, self.mesh.stage + 1, self.mesh.grad_recv, tag,
                          "recv", **args)

    def close(self) -> None:
        for t in self.threads.values():
            t.close()
