"""Expert parallelism inside a rack: wave-pipelined dispatch / expert compute / combine.

A stage's routed experts are split over its ``ep_size`` expert shards (shard r
owns global experts ``[r*E', (r+1)*E')``). For one MoE call on N tokens with top-K
routing every shard:

1. sorts its N*K (token, expert) pairs by global expert id (the single-process
   grouped-GEMM order, ``model.moe.Experts``), exchanges per-expert counts with
   one small all-to-all;
2. processes its local experts in W *waves* (contiguous groups of local experts),
   as in DeepSeek-V4's MegaMoE: the all-to-all **dispatch** of wave i+1 runs on
   the communication thread while the experts of wave i compute, and the
   **combine** (all-to-all back) of a finished wave overlaps the remaining
   waves' compute. W = 1 is the no-overlap baseline;
3. weights the returned expert outputs by the router weights and scatters them
   to their tokens (``index_add``) exactly as the single-process layer does.

Only unweighted expert outputs travel; the router weights stay on the token's
shard, so their gradient is local. Backward mirrors forward: gradient dispatch
of wave i+1 overlaps the expert backward of wave i, whose input gradients are
combined back while later waves compute.

All all-to-alls of a stage go through one ``CommThread`` in program order; every
shard of a stage runs the same layers and waves in the same order (the pipeline
schedule is the same on every shard), and autograd orders the MoE layers'
backwards by data dependency (layer l's output feeds layer l+1's MoE), so the
collectives always match across shards.

Letters: N tokens, K experts per token, D hidden, R received rows, E' local experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .transport import CommThread, nbytes


def wave_bounds(n_local: int, waves: int) -> list[int]:
    """Local-expert boundaries of ``waves`` contiguous waves: ``[0, ..., n_local]``.

    Raises ValueError unless ``1 <= waves <= n_local``.
    """
    if not 1 <= waves <= n_local:
        raise ValueError(f"expert waves must be between 1 and the experts per shard ({n_local}), got {waves}")
    return [n_local * w // waves for w in range(waves + 1)]


class _Plan:
    """Per-call bookkeeping: which sorted pairs go where in each wave, and the receive layout."""

    def __init__(self, send_counts: torch.Tensor, recv_counts: torch.Tensor, bounds: list[int]):
        # send_counts[r, e]: my pairs for shard r's local expert e; recv_counts[src, e]: pairs src sends my expert e
        send_counts, recv_counts = send_counts.cpu(), recv_counts.cpu()  # bookkeeping on the host
        ep, n_local = send_counts.shape
        starts = torch.cumsum(send_counts.reshape(-1), 0) - send_counts.reshape(-1)
        starts = starts.view(ep, n_local)
        self.waves = []
        for w in range(len(bounds) - 1):
            b0, b1 = bounds[w], bounds[w + 1]
            send_idx = [torch.arange(int(starts[r, b0]), int(starts[r, b0]) + int(send_counts[r, b0:b1].sum()))
                        for r in range(ep)]
            send_splits = [int(send_counts[r, b0:b1].sum()) for r in range(ep)]
            recv_splits = [int(recv_counts[s, b0:b1].sum()) for s in range(ep)]
            local = torch.arange(b0, b1)
            eid = torch.cat([torch.repeat_interleave(local - b0, recv_counts[s, b0:b1]) for s in range(ep)])
            perm = torch.argsort(eid, stable=True)
            grouped_counts = recv_counts[:, b0:b1].sum(0).tolist()
            self.waves.append(dict(b0=b0, b1=b1, send_idx=torch.cat(send_idx).long(), send_splits=send_splits,
                                   recv_splits=recv_splits, perm=perm, counts=grouped_counts))


class ExpertParallel:
    """Routed-expert computation across a stage's expert shards (see module docstring).

    Install as ``MoE.expert_parallel`` on every MoE of a stage whose ``experts``
    hold this shard's slice. ``__call__(x [N,D], indices [N,K] global ids,
    weights [N,K], experts) -> [N,D]``; differentiable in x, weights and the
    local expert weights.

    Args:
        group: the stage's expert process group (``Mesh.expert``).
        ep_rank, ep_size: this shard and the number of shards.
        n_experts: routed experts of the model (all shards).
        waves: W, expert waves per MoE call (1 = no overlap).
        comm: the ``CommThread`` all-to-alls run on (shared by the stage's MoE layers).
    Raises:
        ValueError: n_experts not divisible by ep_size, or waves out of range.
    """

    def __init__(self, group, ep_rank: int, ep_size: int, n_experts: int, waves: int, comm: CommThread,
                 link_class: str = "intra-rack"):
        if n_experts % ep_size:
            raise ValueError(f"n_routed_experts ({n_experts}) must be divisible by expert_parallel ({ep_size})")
        self.group, self.ep_rank, self.ep_size = group, ep_rank, ep_size
        self.n_experts, self.n_local = n_experts, n_experts // ep_size
        self.bounds = wave_bounds(self.n_local, waves)
        self.comm = comm
        self.link_class = link_class

    # -------------------------------------------------------------- all-to-all
    def _a2a(self, inp: torch.Tensor, out_rows: list[int], in_rows: list[int], cat: str, wave: int):
        out = inp.new_empty((sum(out_rows),) + tuple(inp.shape[1:]))
        inp = inp.contiguous()

        def run():
            dist.all_to_all_single(out, inp, out_rows, in_rows, group=self.group)
            return out
        return self.comm.submit(run, nbytes(inp), self.link_class, name=f"{cat} w{wave}", cat=cat, wave=wave)

    def __call__(self, x_ND: torch.Tensor, indices_NK: torch.Tensor, weights_NK: torch.Tensor, experts):
        N, K = indices_NK.shape
        flat_e = indices_NK.reshape(-1)
        order = torch.argsort(flat_e, stable=True)
        token_of = order // K
        counts = torch.bincount(flat_e, minlength=self.n_experts)
        fut = self._a2a(counts.view(-1, 1), [self.n_local] * self.ep_size, [self.n_local] * self.ep_size,
                        "dispatch", -1)
        recv_counts = self.comm.wait(fut, "wait counts").view(self.ep_size, self.n_local)
        plan = _Plan(counts.view(self.ep_size, self.n_local), recv_counts, self.bounds)
        track = torch.is_grad_enabled() and (x_ND.requires_grad or experts.gate_up_proj.requires_grad
                                            or experts.down_proj.requires_grad)
        y_sorted = _ExpertWaves.apply(x_ND[token_of], experts.gate_up_proj, experts.down_proj, self, experts, plan,
                                      track)
        w_sorted = weights_NK.reshape(-1)[order].to(x_ND.dtype)
        return torch.zeros_like(x_ND).index_add_(0, token_of, y_sorted * w_sorted.unsqueeze(-1))


class _ExpertWaves(torch.autograd.Function):
    """``x_sorted [N*K, D]`` -> unweighted expert outputs ``[N*K, D]`` through the wave pipeline."""

    @staticmethod
    def forward(ctx, x_sorted, gate_up, down, ep: ExpertParallel, experts, plan: _Plan, track: bool):
        gu = gate_up.detach().requires_grad_(track)
        dn = down.detach().requires_grad_(track)
        saved = []

        def compute(w, wv, x_recv):
            with torch.enable_grad():
                xg = x_recv[wv["perm"]].detach().requires_grad_(track)
                yg = experts.grouped(xg, wv["counts"], gu[wv["b0"]:wv["b1"]], dn[wv["b0"]:wv["b1"]])
            saved.append((xg, yg))
            y_recv = torch.empty_like(yg.detach())
            y_recv[wv["perm"]] = yg.detach()
            return y_recv

        y_sorted = _run_waves(ep, plan, x_sorted, compute)
        ctx.ep, ctx.plan, ctx.saved, ctx.gu, ctx.dn = ep, plan, saved, gu, dn
        return y_sorted

    @staticmethod
    def backward(ctx, g_sorted):
        ep, plan, saved, gu, dn = ctx.ep, ctx.plan, ctx.saved, ctx.gu, ctx.dn
        g_gu = torch.zeros_like(gu)
        g_dn = torch.zeros_like(dn)

        def compute(w, wv, g_recv):
            xg, yg = saved[w]
            gx_recv = torch.zeros_like(g_recv)
            if yg.requires_grad and yg.numel():
                gxg, a, b = torch.autograd.grad(yg, (xg, gu, dn), g_recv[wv["perm"]], allow_unused=True)
                if gxg is not None:
                    gx_recv[wv["perm"]] = gxg
                if a is not None:
                    g_gu.add_(a)
                if b is not None:
                    g_dn.add_(b)
            return gx_recv

        gx_sorted = _run_waves(ep, plan, g_sorted.contiguous(), compute)
        ctx.saved = None
        return gx_sorted, g_gu, g_dn, None, None, None, None


def _run_waves(ep: ExpertParallel, plan: _Plan, src_sorted: torch.Tensor, compute) -> torch.Tensor:
    """The wave pipeline shared by forward and backward.

    For each wave w: all-to-all the rows of ``src_sorted [N*K, D]`` bound for wave w's
    experts (dispatch; wave w+1's is issued before wave w computes), ``compute(w, wave,
    received [R, D]) -> [R, D]`` in received order, all-to-all the result back
    (combine, overlapping later waves). Returns ``[N*K, D]`` in ``src_sorted``'s row order.
    """
    def dispatch(w):
        wv = plan.waves[w]
        return ep._a2a(src_sorted[wv["send_idx"]], wv["recv_splits"], wv["send_splits"], "dispatch", w)

    W = len(plan.waves)
    out = torch.zeros_like(src_sorted)
    pending = dispatch(0)
    combines = []
    for w in range(W):
        nxt = dispatch(w + 1) if w + 1 < W else None
        wv = plan.waves[w]
        result = compute(w, wv, ep.comm.wait(pending, "wait dispatch", wave=w))
        combines.append(ep._a2a(result, wv["send_splits"], wv["recv_splits"], "combine", w))
        pending = nxt
    for w, fut in enumerate(combines):
        out[plan.waves[w]["send_idx"]] = ep.comm.wait(fut, "wait combine", wave=w)
    return out


class ReplicatedExperts:
    """Expert parallelism for serving: every shard of a stage holds *all* rows of the batch.

    Decode batches are small and ragged (any number of sequences, each with its own
    decode state), so instead of splitting rows over the shards and exchanging tokens
    (``ExpertParallel``'s all-to-all), each shard runs the stage's attention and dense
    parts for every row, computes the routed experts it owns for the tokens routed to
    them, and one ``all_reduce`` (sum) over the stage's expert group adds the shards'
    contributions. Any batch size works and a sequence's decode state lives on every
    shard of its stage (replicated, freed together). Forward only (``no_grad``).

    ``__call__(x [N,D], indices [N,K] global expert ids, weights [N,K], experts) -> [N,D]``
    with ``experts`` this shard's slice (``n_experts / ep_size`` experts from
    ``ep_rank * n_local``).

    Raises:
        ValueError: n_experts not divisible by ep_size.
    """

    def __init__(self, group, ep_rank: int, ep_size: int, n_experts: int):
        if n_experts % ep_size:
            raise ValueError(f"n_routed_experts ({n_experts}) must be divisible by expert_parallel ({ep_size})")
        self.group, self.ep_rank, self.ep_size = group, ep_rank, ep_size
        self.n_local = n_experts // ep_size
        self.lo = ep_rank * self.n_local

    @torch.no_grad()
    def __call__(self, x_ND: torch.Tensor, indices_NK: torch.Tensor, weights_NK: torch.Tensor, experts):
        K = indices_NK.shape[1]
        flat_e = indices_NK.reshape(-1) - self.lo
        mine = ((flat_e >= 0) & (flat_e < self.n_local)).nonzero().squeeze(1)  # (token, slot) pairs routed here
        local_e = flat_e[mine]
        pairs = mine[torch.argsort(local_e, stable=True)]
        counts = torch.bincount(local_e, minlength=self.n_local).tolist()
        token_of = pairs // K
        y = experts.grouped(x_ND[token_of], counts, experts.gate_up_proj, experts.down_proj)
        y = y * weights_NK.reshape(-1)[pairs].to(x_ND.dtype).unsqueeze(-1)
        out = torch.zeros_like(x_ND).index_add_(0, token_of, y)
        if self.ep_size > 1:
            dist.all_reduce(out, group=self.group)
        return out
