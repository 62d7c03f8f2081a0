"""Execute a pipeline schedule on one stage actor: microbatches, waves, gradient reductions.

``PipelineRunner.forward_backward(batch, loss_cfg)`` runs one training step's
forward and backward passes for this process's (stage, expert shard):

- the global batch ``[B,S]`` is split over the D data-parallel replicas and the
  E expert shards of each (actor (d, e) takes sequences ``[k*B/(D*E),
  (k+1)*B/(D*E))``, ``k = d*E + e``; the expert shards of a replica are data
  parallel for everything but the experts), then into M microbatches;
- the per-stage action list of ``comm.schedule`` (1F1B by default) is executed;
  each microbatch is streamed between stages in W **waves** (slices of its
  sequences): a stage runs wave w's forward as soon as it arrives and sends its
  output on at once, so stage s+1 starts on wave 1 while wave 2 is still being
  computed or in flight; backward does the same in the other direction. W = 1
  is the no-overlap baseline. Receives are posted up front on the comm threads;
- gradients are made global in buckets that are all-reduced *during* the last
  backward of the step (``comm.data_parallel.GradBuckets``): replicated
  parameters over the stage's actors in every replica, routed experts over their
  copies in the other replicas (inside a replica they already hold their full
  gradient: all-to-all backward); after backward, the indexer KL is normalised by
  the global KL row count and the indexers' gradients reduced, and the
  first/last-stage embedding copies summed over the tied-embedding group;
- ``clip_grad_norm(max_norm)`` computes the global norm (every parameter counted
  once) and clips like ``torch.nn.utils.clip_grad_norm_``;
- ``update_router_biases(speed)`` applies auxiliary-loss-free balancing with the
  global expert loads of the step;
- ``route(batch, cfg)`` is a forward-only pass of the same schedule that returns the
  routing every MoE of this stage picks for this shard's sequences: anticipatory
  routing computes it for a later step's batch and passes it back as ``forced``.

Loss and gradients equal the single-process ``model.training.compute_losses`` on
the whole batch (tested to 1e-5 in float32). A one-process run is this runner on a
1 x 1 mesh: the same schedule code, reductions over a group of one.

Letters: B batch, b microbatch, S sequence, N hc streams, E hidden.
"""

from __future__ import annotations

import math
from concurrent.futures import Future

import torch
import torch.distributed as dist

from .data_parallel import DEFAULT_BUCKET_MB, GradBuckets
from .expert_parallel import ExpertParallel
from .link_model import LinkModel
from .schedule import gpipe, one_f_one_b
from .trace import Tracer
from .transport import CommThread, Mesh, PipeLinks

SCHEDULES = {"1f1b": one_f_one_b, "gpipe": gpipe}


def split_batch(batch: dict, parts: int, index: int) -> dict:
    """Sequences ``[index*B/parts, (index+1)*B/parts)`` of every ``[B, ...]`` tensor of ``batch``
    (a batch, or anything keyed like one: the forced routing of its sequences)."""
    B = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
    lo, hi = B * index // parts, B * (index + 1) // parts
    return {k: v[lo:hi] for k, v in batch.items() if isinstance(v, torch.Tensor)}


class PipelineRunner:
    """Runs ``stage`` (this process's ``model.stage.PipelineStage``, or anything with its interface:
    ``forward``, ``losses``, ``loss_norms``, ``combine_metrics``, ``expert_loads``,
    ``update_router_biases``, ``mtp_forward``, ``runs_mtp``, ``model_order_parameters``,
    ``is_expert_param``, ``moes``,
    ``indexer_parameters``, ``embed_tokens``, ``args``, ``expert_lo/hi``, ``METRIC_KEYS``) in the
    pipeline described by ``mesh``. comm/ imports no model code: the stage is passed in.

    Args:
        microbatches: M per expert shard per step.
        waves: W, activation/gradient waves per microbatch (each wave >= 1 sequence).
        expert_waves: expert waves per MoE call (default: ``waves``, capped at the
            experts per shard).
        schedule: ``"1f1b"`` or ``"gpipe"``.
        link: link model shaping every transfer (default: off).
        tracer: records compute and communication spans (``comm.trace``).
        block_call: how the stage runs each block (``model.remat.checkpointed``: activation
            checkpointing); None: a plain call.
        bucket_mb: gradient all-reduce bucket size in MiB (``comm.data_parallel.GradBuckets``).
    Raises:
        ValueError: unknown schedule, waves < 1.
    """

    def __init__(self, stage, mesh: Mesh, *, microbatches: int = 1, waves: int = 1,
                 expert_waves: int | None = None, schedule: str = "1f1b", link: LinkModel | None = None,
                 tracer: Tracer | None = None, block_call=None, bucket_mb: float = DEFAULT_BUCKET_MB):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
        if waves < 1 or microbatches < 1:
            raise ValueError(f"waves and microbatches must be >= 1, got {waves}, {microbatches}")
        self.stage, self.mesh = stage, mesh
        self.M, self.W = microbatches, waves
        self.block_call = block_call
        # One process, one microbatch, one wave: the step is a single forward and backward, so the
        # indexer KL is normalised inside the loss (its row count is known before backward) and
        # the gradient norm is torch's own -- a plain PyTorch training step, bit for bit.
        self.whole = mesh.world == 1 and microbatches == 1 and waves == 1
        self.actions = SCHEDULES[schedule](mesh.num_stages, microbatches)[mesh.stage]
        self.tracer = tracer if tracer is not None else Tracer(mesh.rank, enabled=False)
        self.links = PipeLinks(mesh, link, self.tracer)
        self.a2a = CommThread("a2a", link, self.tracer)
        self.dp = CommThread("grad-reduce", link, self.tracer)
        self.bucket_bytes = bucket_mb * 2**20
        self.buckets: GradBuckets | None = None
        n_local = stage.expert_hi - stage.expert_lo
        self.expert_waves = min(expert_waves or waves, n_local)
        self.ep = None
        if mesh.ep_size > 1:
            self.ep = ExpertParallel(mesh.expert, mesh.ep_rank, mesh.ep_size, stage.args.n_routed_experts,
                                     self.expert_waves, self.a2a)
        for moe in stage.moes():
            moe.expert_parallel = self.ep
        self.loads: dict[str, torch.Tensor] = {}
        self.kl_rows = 0.0

    # ------------------------------------------------------------- helpers
    def _span(self, name, **args):
        return self.tracer.span(name, cat="compute", tid="compute", **args)

    def _waves(self, mb: dict) -> list[dict]:
        b = mb["input_ids"].shape[0]
        if b < self.W:
            raise ValueError(f"a microbatch of {b} sequence(s) cannot be split into {self.W} waves; "
                             f"use waves <= sequences per microbatch")
        return [split_batch(mb, self.W, w) for w in range(self.W)]

    def _act_shape(self, wave: dict) -> tuple[int, ...]:
        b, S = wave["input_ids"].shape
        return (b, S, self.stage.args.hc_mult, self.stage.args.hidden_size)

    def _track_loads(self, routing: dict) -> None:
        for k, c in self.stage.expert_loads(routing).items():
            self.loads[k] = self.loads.get(k, 0) + c

    def _microbatches(self, batch: dict) -> tuple[dict, list[list[dict]]]:
        """The step's ``batch`` on this process's device, this shard's part of it and that part's
        waves per microbatch (``[m][w]``). Raises ValueError when it does not divide."""
        mesh, st = self.mesh, self.stage
        B = batch["input_ids"].shape[0]
        if B % (mesh.dp_size * mesh.ep_size * self.M):
            raise ValueError(f"batch of {B} sequences is not divisible by data-parallel replicas ({mesh.dp_size}) x "
                             f"expert shards ({mesh.ep_size}) x microbatches ({self.M})")
        device = next(st.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        local = split_batch(batch, mesh.dp_size * mesh.ep_size, mesh.dp_rank * mesh.ep_size + mesh.ep_rank)
        return batch, [self._waves(split_batch(local, self.M, m)) for m in range(self.M)]

    def _forced(self, forced: dict | None, m: int, w: int) -> dict | None:
        """Wave ``(m, w)``'s rows of this shard's forced routing (``key -> [b_local, S', K]``),
        flattened to ``key -> [b*S', K]`` as the MoE takes it."""
        if forced is None:
            return None
        part = split_batch(split_batch(forced, self.M, m), self.W, w)
        return {k: v.reshape(-1, v.shape[-1]) for k, v in part.items()}

    # ----------------------------------------------------------- one step
    def forward_backward(self, batch: dict, cfg, forced: dict | None = None) -> dict:
        """Forward + backward of one global ``batch`` (every process passes the same batch).

        ``forced``: anticipatory routing for this shard's sequences, ``key -> [b_local, S', K]``
        (what ``route`` returned for this batch, earlier). Leaves globally reduced gradients in
        the stage's parameters (accumulated into existing ``.grad``; zero them first). Returns
        the step's global metrics: ``loss``, ``ce``, ``mtp``, ``balance``, ``indexer_kl`` (those
        that apply) and ``kl_rows``, identical on every process.
        Raises ValueError when the batch cannot be split into shards x microbatches x waves.
        """
        mesh, st = self.mesh, self.stage
        norms = st.loss_norms(batch)
        batch, mbs = self._microbatches(batch)
        device = next(st.parameters()).device
        dtype = next(st.parameters()).dtype
        self.loads, sums = {}, dict.fromkeys(st.METRIC_KEYS, 0.0)
        present = set()
        tag = lambda m, w: m * self.W + w  # noqa: E731
        recv_act: dict[tuple[int, int], Future] = {}
        recv_grad: dict[tuple[int, int], Future] = {}
        for act in self.actions:  # post every receive up front, in the order the peer sends
            if act.kind in ("RECV_ACT", "RECV_GRAD"):
                post, into = ((self.links.recv_act, recv_act) if act.kind == "RECV_ACT"
                              else (self.links.recv_grad, recv_grad))
                for w, wave in enumerate(mbs[act.mb]):
                    into[act.mb, w] = post(self._act_shape(wave), dtype, device, tag(act.mb, w), mb=act.mb, wave=w)
        sends: list[Future] = []
        live: dict[tuple[int, int], tuple] = {}
        self.buckets = self._grad_buckets()
        last_b = next(a.mb for a in reversed(self.actions) if a.kind == "B")
        last_bw = (last_b, len(mbs[last_b]) - 1)  # the step's last backward call: no later gradient
        for act in self.actions:
            m = act.mb
            if act.kind == "F":
                for w, wave in enumerate(mbs[m]):
                    inp = None
                    if not mesh.first:
                        inp = self.a2a.wait(recv_act.pop((m, w)), "wait act", mb=m, wave=w, kind="act",
                                            peer=mesh.peer(mesh.stage - 1))
                        inp.requires_grad_(torch.is_grad_enabled() and cfg.mode != "indexer_warmup")
                    with self._span(f"F{m}.{w}", mb=m, wave=w):
                        f = self._forced(forced, m, w)
                        out, aux = st(inp, wave["input_ids"], wave.get("doc_ids"), forced=f, call=self.block_call)
                        rows = None
                        if self.whole and aux.kl is not None:  # the step's only forward: its KL rows are all
                            rows = float(aux.kl.rows) or None
                        loss, part, routing = st.losses(out, aux, wave, norms, cfg, forced=f, call=self.block_call,
                                                        kl_rows=rows)
                        self._track_loads(routing)
                    for k, v in part.items():
                        sums[k] += v
                        present.add(k)
                    if not mesh.last:
                        sends.append(self.links.send_act(out, tag(m, w), mb=m, wave=w))
                    live[m, w] = (inp, out, loss)
            elif act.kind == "B":
                for w in range(len(mbs[m])):
                    inp, out, loss = live.pop((m, w))
                    g = None
                    if not mesh.last:
                        g = self.a2a.wait(recv_grad.pop((m, w)), "wait grad", mb=m, wave=w, kind="grad",
                                          peer=mesh.peer(mesh.stage + 1))
                    with self._span(f"B{m}.{w}", mb=m, wave=w):
                        tensors, grads = [], []
                        if loss is not None:
                            tensors.append(loss)
                            grads.append(torch.ones_like(loss))
                        if g is not None and out.requires_grad:
                            tensors.append(out)
                            grads.append(g)
                        if (m, w) == last_bw:
                            self.buckets.arm()
                        if tensors:
                            torch.autograd.backward(tensors, grads)
                    if not mesh.first:
                        gi = inp.grad if inp.grad is not None else torch.zeros_like(inp)
                        sends.append(self.links.send_grad(gi, tag(m, w), mb=m, wave=w))
            # RECV_* are posted up front, SEND_* right after each wave's compute
        for f in sends:
            self.a2a.wait(f, "wait sends")
        return self._finish(sums, present, cfg)

    # ------------------------------------------------------ reductions
    def _finish(self, sums: dict, present: set, cfg) -> dict:
        st = self.stage
        keys = st.METRIC_KEYS
        flags = [1.0 if k in present else 0.0 for k in keys]
        device = next(st.parameters()).device  # nccl reduces device tensors only
        vec = torch.tensor([sums[k] for k in keys] + flags, dtype=torch.float64, device=device)
        with self.tracer.span("allreduce metrics", cat="allreduce", tid="collective"):
            dist.all_reduce(vec)
        tot = dict(zip(keys, vec[:len(keys)].tolist(), strict=True))
        have = {k for k, f in zip(keys, vec[len(keys):].tolist(), strict=True) if f > 0}
        self.kl_rows = tot["kl_rows"]
        self.buckets.finish()  # the bucketed all-reduces started during the last backward
        if self.kl_rows > 0 and not self.whole:  # (one forward: the loss was already normalised)
            for p in st.indexer_parameters():
                if p.grad is not None:
                    p.grad.div_(self.kl_rows)
        self._reduce_late()
        return st.combine_metrics(tot, have, cfg)

    def _tied_embedding(self) -> bool:
        return self.mesh.embed is not None and self.stage.embed_tokens is not None

    def _late_ids(self) -> set[int]:
        """Parameters reduced after backward, not in the buckets: the indexers (their gradient is
        divided by the global KL row count first, known only after the metrics' all-reduce; the
        order of division and sum is kept) and the tied embedding (its own group)."""
        st = self.stage
        late = {id(p) for p in st.indexer_parameters()}
        if self._tied_embedding():
            late.add(id(st.embed_tokens.weight))
        return late

    def _grad_buckets(self) -> GradBuckets:
        """This step's buckets over the stage's trainable parameters, reverse model order."""
        mesh, st = self.mesh, self.stage
        late = self._late_ids()
        expert = {id(p) for n, p in st.named_parameters() if st.is_expert_param(n)}
        dp_class = "inter-rack" if any(mesh.link_class_to[r] == "inter-rack" for r in mesh.replica_ranks) \
            else "intra-rack"
        params = []
        for p in reversed(st.model_order_parameters()):
            if id(p) in late or not p.requires_grad:
                continue
            if id(p) in expert and mesh.ep_size > 1:  # (one shard: the replica group is the dense one)
                params.append((p, mesh.replica, mesh.dp_size, dp_class))
            else:
                params.append((p, mesh.dense, mesh.dense_size, dp_class))
        return GradBuckets(params, self.dp, self.bucket_bytes, self.tracer)

    def _reduce_late(self) -> None:
        mesh, st = self.mesh, self.stage
        with self.tracer.span("allreduce late grads", cat="allreduce", tid="collective"):
            embed = st.embed_tokens.weight if self._tied_embedding() else None
            idx = [p for p in st.indexer_parameters() if p.grad is not None and p is not embed]
            if mesh.dense_size > 1 and idx:
                flat = torch.cat([p.grad.reshape(-1) for p in idx])
                dist.all_reduce(flat, group=mesh.dense)
                at = 0
                for p in idx:
                    p.grad.copy_(flat[at:at + p.numel()].view_as(p.grad))
                    at += p.numel()
            if embed is not None and embed.requires_grad:  # frozen (indexer warm-up) on every rank alike
                # every rank of the group must join, with zeros where the copy got no gradient
                g = embed.grad if embed.grad is not None else torch.zeros_like(embed)
                dist.all_reduce(g, group=mesh.embed)
                embed.grad = g

    def clip_grad_norm(self, max_norm: float | None) -> float:
        """Global gradient norm (each parameter counted once), clipped to ``max_norm`` like
        ``torch.nn.utils.clip_grad_norm_`` (``None`` or inf: no clipping). Returns the norm before clipping."""
        mesh, st = self.mesh, self.stage
        if mesh.world == 1:  # nothing to reduce: torch's clip (float32 norms per tensor, then their norm)
            params = [p for p in st.model_order_parameters() if p.grad is not None]
            limit = max_norm if max_norm is not None else float("inf")
            return float(torch.nn.utils.clip_grad_norm_(params, limit)) if params else 0.0
        sq = torch.zeros((), dtype=torch.float64, device=next(st.parameters()).device)
        for n, p in st.named_parameters():
            if p.grad is None:
                continue
            if st.is_expert_param(n):
                own = True
            elif st.embed_tokens is not None and p is st.embed_tokens.weight and self._tied_embedding():
                own = mesh.first and mesh.ep_rank == 0
            else:
                own = mesh.ep_rank == 0
            if own and mesh.dp_rank == 0:  # the replicas hold the same reduced gradients
                sq += p.grad.double().pow(2).sum()
        dist.all_reduce(sq)
        norm = math.sqrt(float(sq))
        if max_norm is not None and math.isfinite(max_norm):
            coef = max_norm / (norm + 1e-6)
            if coef < 1:
                for p in st.parameters():
                    if p.grad is not None:
                        p.grad.mul_(coef)
        return norm

    @torch.no_grad()
    def update_router_biases(self, speed: float | None = 1e-3) -> dict[str, float]:
        """Aux-loss-free balancing with the step's global loads (``model.losses.bias_update``):
        this shard's loads are summed over the stage's expert shards first. ``speed`` None:
        the loads' coefficients of variation only. Returns ``{"load_cv/<layer>": cv}``."""
        loads = {}
        for k, load in self.loads.items():
            load = load.float()
            if self.mesh.dense_size > 1:  # every shard and replica of the stage: the step's global loads
                dist.all_reduce(load, group=self.mesh.dense)
            loads[k] = load
        return self.stage.update_router_biases(loads, speed)

    # ----------------------------------------------------- anticipatory routing
    @torch.no_grad()
    def route(self, batch: dict, cfg) -> dict[str, torch.Tensor]:
        """The routing this stage's MoEs pick for this shard's sequences of ``batch`` with the
        current parameters: a forward-only pass of the schedule (activations stream between the
        stages as in training; no loss, no backward). Every process passes the same batch.

        Returns ``key -> [b_local, S', K]`` int64 expert ids (``S' = S - 1`` for the MTP block,
        run when ``cfg`` trains it), the form ``forward_backward(forced=)`` takes.
        """
        mesh, st = self.mesh, self.stage
        _, mbs = self._microbatches(batch)
        device = next(st.parameters()).device
        dtype = next(st.parameters()).dtype
        tag = lambda m, w: m * self.W + w  # noqa: E731
        recv: dict[tuple[int, int], Future] = {}
        order = [a.mb for a in self.actions if a.kind == "F"]
        if not mesh.first:
            for m in order:
                for w, wave in enumerate(mbs[m]):
                    recv[m, w] = self.links.recv_act(self._act_shape(wave), dtype, device, tag(m, w), mb=m, wave=w)
        parts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        sends: list[Future] = []
        for m in order:
            for w, wave in enumerate(mbs[m]):
                ids, docs = wave["input_ids"], wave.get("doc_ids")
                b, S = ids.shape
                inp = None if mesh.first else self.a2a.wait(recv.pop((m, w)), "wait act", mb=m, wave=w, kind="act",
                                                             peer=mesh.peer(mesh.stage - 1))
                with self._span(f"R{m}.{w}", mb=m, wave=w):
                    out, aux = st(inp, ids, docs)
                    got = {k: r.indices.view(b, S, -1) for k, r in aux.routing.items()}
                    if st.runs_mtp(cfg, S):
                        _, r = st.mtp_forward(out, ids, docs)
                        got[st.MTP_KEY] = r.indices.view(b, S - 1, -1)
                parts[m, w] = got
                if not mesh.last:
                    sends.append(self.links.send_act(out, tag(m, w), mb=m, wave=w))
        for f in sends:
            self.a2a.wait(f, "wait sends")
        keys = parts[0, 0].keys() if parts else ()
        return {k: torch.cat([parts[m, w][k] for m in range(self.M) for w in range(len(mbs[m]))]) for k in keys}

    def close(self) -> None:
        self.links.close()
        self.a2a.close()
        self.dp.close()
