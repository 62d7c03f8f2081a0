"""Data parallelism across replicas of the actor graph: bucketed gradient all-reduce that starts
during backward, and ZeRO-1 optimizer sharding with whole-parameter ownership.

**Gradient buckets** (:class:`GradBuckets`). A step's gradient of a replicated tensor is the sum
of what every copy computed on its share of the global batch (each share's loss is already
normalised by the *global* token counts, so a sum, not a mean, is the full-batch gradient). The
tensors of one stage are grouped, in reverse model order (roughly the order backward finishes
them, as in PyTorch DDP, Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data
Parallel Training"), into buckets of about ``bucket_bytes``; a bucket holds tensors of one process
group only (the replicated tensors of a stage are summed over the stage's actors in every replica,
``Mesh.dense``; routed experts over their copies in the other replicas, ``Mesh.replica``). During
the step's **last** backward call (the last wave of the last microbatch: no later contribution can
reach a gradient) a ``post_accumulate_grad`` hook on every tensor moves its finished gradient
into its bucket (``.grad`` becomes a view of the bucket, so the gradients are held once); the
moment a bucket is full and every bucket before it has gone, it is all-reduced on a
communication thread while backward carries on with earlier layers. After
backward, :meth:`GradBuckets.finish` sends the buckets whose tensors got no gradient in that last
call (their gradient is what earlier microbatches accumulated, or zeros), in bucket order, and
waits. Buckets always go in the same order on every rank, so the collectives match whatever order
the hooks fire in. Each bucket carries one presence flag per tensor, so a tensor that got no
gradient on any rank keeps ``grad = None`` (the optimizer skips it, as in one process).

**ZeRO-1** (:func:`assign_owners`, :func:`broadcast_from_owners`; Rajbhandari et al. 2020, "ZeRO:
Memory Optimizations Toward Training Trillion Parameter Models", stage 1). Every tensor of a
(stage, shard) is owned by one of its D replicas, whole (Muon orthogonalises the full matrix, so a
parameter cannot be split), balanced by optimizer-state size. Only the owner keeps the tensor's
optimizer state and steps it (all replicas hold the same reduced gradient); then each replica
broadcasts the tensors it owns to the others, so optimizer memory per actor falls as 1/D while
parameters and gradients stay whole.

comm/ imports no model code: tensors, names and groups are passed in.
"""

from __future__ import annotations

from concurrent.futures import Future
from contextlib import nullcontext

import torch
import torch.distributed as dist

from .trace import Tracer
from .transport import CommThread

DEFAULT_BUCKET_MB = 25.0  # PyTorch DDP's default bucket_cap_mb


def assign_owners(sizes: dict[str, int], replicas: int) -> dict[str, int]:
    """Whole-tensor owners: ``name -> replica in [0, replicas)``, balancing the summed ``sizes``
    (e.g. optimizer-state elements per parameter). Largest first, each to the least-loaded replica
    (ties: the lowest replica; equal sizes in name order): deterministic, so every replica computes
    the same map.

    Raises:
        ValueError: ``replicas < 1`` or a negative size.
    """
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    bad = {n: s for n, s in sizes.items() if s < 0}
    if bad:
        raise ValueError(f"negative sizes: {bad}")
    load = [0] * replicas
    owners = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        d = min(range(replicas), key=lambda r: (load[r], r))
        owners[name] = d
        load[d] += sizes[name]
    return owners


class _Bucket:
    def __init__(self, group, size: int, dtype: torch.dtype, link_class: str):
        self.group, self.size, self.dtype, self.link_class = group, size, dtype, link_class
        self.params: list[torch.Tensor] = []
        self.offsets: list[int] = []
        self.numel = 0

    def add(self, p: torch.Tensor) -> None:
        self.offsets.append(self.numel)
        self.params.append(p)
        self.numel += p.numel()

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


class GradBuckets:
    """One step's bucketed gradient all-reduce (see the module docstring).

    Args:
        params: ``(tensor, group, group_size, link_class)`` of every parameter to reduce, in the
            order the buckets should fill (reverse model order); only ``requires_grad`` ones.
            ``group_size`` 1 entries are skipped (nothing to reduce). Each (group, dtype) fills
            its own bucket; buckets go out in the order they were opened.
        comm: the ``CommThread`` the all-reduces run on.
        bucket_bytes: bucket capacity (a single larger tensor gets a bucket of its own).
        tracer: spans ``allreduce b<i>`` (cat ``allreduce``) on the comm thread's row.

    Use: :meth:`arm` right before the step's last backward call, :meth:`finish` after it.
    Every rank of every group must build its buckets from the same parameter list (names and
    shapes), which holds for the replicas and shards of one stage.
    """

    def __init__(self, params: list[tuple[torch.Tensor, object, int, str]], comm: CommThread,
                 bucket_bytes: float = DEFAULT_BUCKET_MB * 2**20, tracer: Tracer | None = None):
        self.comm, self.tracer = comm, tracer
        self.buckets: list[_Bucket] = []  # in creation order: the order they go out
        open_: dict[tuple, _Bucket] = {}  # one bucket filling per (group, dtype)
        for p, group, size, link_class in params:
            if size <= 1 or not p.requires_grad:
                continue
            key = (id(group), p.dtype)
            b = open_.get(key)
            nb = p.numel() * p.element_size()
            if b is None or (b.params and b.nbytes + nb > bucket_bytes):
                b = open_[key] = _Bucket(group, size, p.dtype, link_class)
                self.buckets.append(b)
            b.add(p)
        self.where = {id(p): (i, j) for i, b in enumerate(self.buckets) for j, p in enumerate(b.params)}
        self._handles: list = []
        self._reset()

    def _reset(self) -> None:
        self.flat = [None] * len(self.buckets)
        self.filled = [set() for _ in self.buckets]
        self.futs: list[Future | None] = [None] * len(self.buckets)
        self.sent = 0

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for b in self.buckets for p in b.params]

    # ------------------------------------------------------------- filling
    def _buf(self, i: int) -> torch.Tensor:
        if self.flat[i] is None:
            b = self.buckets[i]
            self.flat[i] = torch.zeros(b.numel + len(b.params), dtype=b.dtype, device=b.params[0].device)
        return self.flat[i]

    def _fill(self, i: int, j: int) -> None:
        """Move parameter j's gradient into bucket i; from now on ``.grad`` is a view of the bucket
        (PyTorch DDP's ``gradient_as_bucket_view``): no second copy of the gradients is held, and the
        all-reduce leaves the sum in place."""
        b, buf = self.buckets[i], self._buf(i)
        p, at = b.params[j], b.offsets[j]
        view = buf[at:at + p.numel()].view_as(p)
        if p.grad is not None:
            view.copy_(p.grad)
            buf[b.numel + j] = 1
        p.grad = view
        self.filled[i].add(j)

    def _send(self, i: int) -> None:
        b, buf = self.buckets[i], self._buf(i)
        n = b.size
        wire = buf.numel() * buf.element_size() * 2 * (n - 1) // n  # a ring all-reduce's bytes per rank

        def run():
            dist.all_reduce(buf, group=b.group)
            return buf
        self.futs[i] = self.comm.submit(run, wire, b.link_class, name=f"allreduce b{i}", cat="allreduce",
                                        bucket=i, tensors=len(b.params))
        self.sent = i + 1

    def _hook(self, p: torch.Tensor) -> None:
        i, j = self.where[id(p)]
        self._fill(i, j)
        while self.sent < len(self.buckets) and len(self.filled[self.sent]) == len(self.buckets[self.sent].params):
            self._send(self.sent)

    # --------------------------------------------------------------- public
    def arm(self) -> None:
        """Start watching: every parameter's next gradient accumulation fills its bucket, and full
        buckets go out in order. Call right before the step's last backward."""
        self._reset()
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]

    def finish(self) -> None:
        """Send the buckets not sent yet (in order; tensors without a gradient in the last backward
        contribute what they hold, or zeros) and wait for all: every ``.grad`` (a view of its bucket)
        then holds the sum (a tensor with no gradient on any rank gets ``grad = None``)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for i in range(self.sent, len(self.buckets)):
            for j in range(len(self.buckets[i].params)):
                if j not in self.filled[i]:
                    self._fill(i, j)
            self._send(i)
        for i, b in enumerate(self.buckets):
            buf = self.comm.wait(self.futs[i], "wait allreduce", bucket=i)
            for j, p in enumerate(b.params):
                if buf[b.numel + j] <= 0:
                    p.grad = None  # no rank had a gradient for it
        self._reset()


@torch.no_grad()
def broadcast_from_owners(params: list[tuple[str, torch.Tensor]], owners: dict[str, int], dp_rank: int,
                          replica_ranks: list[int], group, tracer: Tracer | None = None) -> None:
    """ZeRO-1's parameter broadcast: for each replica d in order, the tensors it owns (``owners``,
    in ``params`` order, flattened per dtype) go from ``replica_ranks[d]`` to every other replica
    over ``group`` (this (stage, shard)'s replica group). Every replica calls it with the same
    ``params`` names and ``owners``.
    """
    D = len(replica_ranks)
    if D <= 1:
        return
    with tracer.span("broadcast params", cat="allreduce", tid="collective") if tracer is not None else nullcontext():
        for d in range(D):
            mine = [p for n, p in params if owners[n] == d]
            for dtype in sorted({p.dtype for p in mine}, key=str):
                ts = [p for p in mine if p.dtype == dtype]
                if d == dp_rank:
                    flat = torch.cat([p.reshape(-1) for p in ts])
                else:
                    flat = torch.empty(sum(p.numel() for p in ts), dtype=dtype, device=ts[0].device)
                dist.broadcast(flat, src=replica_ranks[d], group=group)
                if d != dp_rank:
                    at = 0
                    for p in ts:
                        p.copy_(flat[at:at + p.numel()].view_as(p))
                        at += p.numel()
