"""Execute a pipeline schedule on one stage actor: microbatches, waves, gradient reductions (issue 4).

``PipelineRunner.forward_backward(batch, loss_cfg)`` runs one training step's
forward and backward passes for this process's (stage, expert shard):

- the global batch ``[B,S]`` is split over the expert shards (shard e takes
  sequences ``[e*B/E, (e+1)*B/E)``; the expert-parallel group is data parallel
  for everything but the experts), then into M microbatches;
- the per-stage action list of ``comm.schedule`` (1F1B by default) is executed;
  each microbatch is streamed between stages in W **waves** (slices of its
  sequences): a stage runs wave w's forward as soon as it arrives and sends its
  output on at once, so stage s+1 starts on wave 1 while wave 2 is still being
  computed or in flight; backward does the same in the other direction. W = 1
  is the no-overlap baseline. Receives are posted up front on the comm threads;
- gradients are then made global: the indexer KL normalised by the global KL row
  count, replicated parameters all-reduced over the expert-parallel group, the
  first/last-stage embedding copies over the tied-embedding group; routed experts
  already hold their full gradient (all-to-all backward);
- ``clip_grad_norm(max_norm)`` computes the global norm (every parameter counted
  once) and clips like ``torch.nn.utils.clip_grad_norm_``;
- ``update_router_biases(speed)`` applies auxiliary-loss-free balancing with the
  global expert loads of the step.

Loss and gradients equal the single-process ``model.training.compute_losses`` on
the whole batch (tested to 1e-5 in float32).

Letters: B batch, b microbatch, S sequence, N hc streams, E hidden.
"""

from __future__ import annotations

import math
from concurrent.futures import Future

import torch
import torch.distributed as dist

from .expert_parallel import ExpertParallel
from .link_model import LinkModel
from .schedule import gpipe, one_f_one_b
from .trace import Tracer
from .transport import CommThread, Mesh, PipeLinks

SCHEDULES = {"1f1b": one_f_one_b, "gpipe": gpipe}
METRIC_KEYS = ("ce", "mtp", "balance", "kl_sum", "kl_rows")


def split_batch(batch: dict, parts: int, index: int) -> dict:
    """Sequences ``[index*B/parts, (index+1)*B/parts)`` of every ``[B, ...]`` tensor of ``batch``."""
    B = batch["input_ids"].shape[0]
    lo, hi = B * index // parts, B * (index + 1) // parts
    return {k: v[lo:hi] for k, v in batch.items() if isinstance(v, torch.Tensor)}


class PipelineRunner:
    """Runs ``stage`` (this process's ``model.stage.PipelineStage``, or anything with its interface:
    ``forward``, ``losses``, ``loss_norms``, ``is_expert_param``, ``moes``, ``indexer_parameters``,
    ``layers``, ``embed_tokens``, ``args``, ``expert_lo/hi``) in the pipeline described by ``mesh``.
    comm/ imports no model code: the stage is passed in.

    Args:
        microbatches: M per expert shard per step.
        waves: W, activation/gradient waves per microbatch (each wave >= 1 sequence).
        expert_waves: expert waves per MoE call (default: ``waves``, capped at the
            experts per shard).
        schedule: ``"1f1b"`` or ``"gpipe"``.
        link: link model shaping every transfer (default: off).
        tracer: records compute and communication spans (``comm.trace``).
    Raises:
        ValueError: unknown schedule, waves < 1.
    """

    def __init__(self, stage, mesh: Mesh, *, microbatches: int = 1, waves: int = 1,
                 expert_waves: int | None = None, schedule: str = "1f1b", link: LinkModel | None = None,
                 tracer: Tracer | None = None):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
        if waves < 1 or microbatches < 1:
            raise ValueError(f"waves and microbatches must be >= 1, got {waves}, {microbatches}")
        self.stage, self.mesh = stage, mesh
        self.M, self.W = microbatches, waves
        self.actions = SCHEDULES[schedule](mesh.num_stages, microbatches)[mesh.stage]
        self.tracer = tracer if tracer is not None else Tracer(mesh.rank, enabled=False)
        self.links = PipeLinks(mesh, link, self.tracer)
        self.a2a = CommThread("a2a", link, self.tracer)
        n_local = stage.expert_hi - stage.expert_lo
        self.expert_waves = min(expert_waves or waves, n_local)
        self.ep = None
        if mesh.ep_size > 1:
            self.ep = ExpertParallel(mesh.expert, mesh.ep_rank, mesh.ep_size, stage.args.n_routed_experts,
                                     self.expert_waves, self.a2a)
        for moe in stage.moes():
            moe.expert_parallel = self.ep
        self.loads: dict[int, torch.Tensor] = {}
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

    def _track_loads(self) -> None:
        for i, blk in self.stage.layers.items():
            idx = blk.mlp.last_indices
            if idx is not None:
                c = torch.bincount(idx.reshape(-1), minlength=self.stage.args.n_routed_experts)
                self.loads[int(i)] = self.loads.get(int(i), 0) + c

    # ----------------------------------------------------------- one step
    def forward_backward(self, batch: dict, cfg) -> dict:
        """Forward + backward of one global ``batch`` (every process passes the same batch).

        Leaves globally reduced gradients in the stage's parameters (accumulated into
        existing ``.grad``; zero them first). Returns the step's global metrics:
        ``loss``, ``ce``, ``mtp``, ``balance``, ``indexer_kl`` (those that apply) and
        ``kl_rows``, identical on every process.
        Raises ValueError when the batch cannot be split into shards x microbatches x waves.
        """
        mesh, st = self.mesh, self.stage
        B = batch["input_ids"].shape[0]
        if B % (mesh.ep_size * self.M):
            raise ValueError(f"batch of {B} sequences is not divisible by expert shards ({mesh.ep_size}) x "
                             f"microbatches ({self.M})")
        norms = st.loss_norms(batch)
        device = next(st.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        local = split_batch(batch, mesh.ep_size, mesh.ep_rank)
        mbs = [self._waves(split_batch(local, self.M, m)) for m in range(self.M)]
        dtype = next(st.parameters()).dtype
        self.loads, sums = {}, dict.fromkeys(METRIC_KEYS, 0.0)
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
                        out = st(inp, wave["input_ids"], wave.get("doc_ids"))
                        self._track_loads()
                        loss, part = st.losses(out, wave, norms, cfg)
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
        flags = [1.0 if k in present else 0.0 for k in METRIC_KEYS]
        device = next(st.parameters()).device  # nccl reduces device tensors only
        vec = torch.tensor([sums[k] for k in METRIC_KEYS] + flags, dtype=torch.float64, device=device)
        with self.tracer.span("allreduce metrics", cat="allreduce", tid="collective"):
            dist.all_reduce(vec)
        tot = dict(zip(METRIC_KEYS, vec[:len(METRIC_KEYS)].tolist(), strict=True))
        have = {k for k, f in zip(METRIC_KEYS, vec[len(METRIC_KEYS):].tolist(), strict=True) if f > 0}
        self.kl_rows = tot["kl_rows"]
        if self.kl_rows > 0:
            for p in st.indexer_parameters():
                if p.grad is not None:
                    p.grad.div_(self.kl_rows)
        self._allreduce_grads()
        metrics, total = {}, 0.0
        if "ce" in have:
            metrics["ce"] = tot["ce"]
            total = tot["ce"]
        if "mtp" in have:
            metrics["mtp"] = tot["mtp"]
            total += cfg.mtp_weight * tot["mtp"]
        if "balance" in have:
            metrics["balance"] = tot["balance"]
            total += cfg.balance_weight * tot["balance"]
        if self.kl_rows > 0:
            kl = tot["kl_sum"] / self.kl_rows
            metrics["indexer_kl"] = kl
            total = cfg.indexer_kl_weight * kl if cfg.mode == "indexer_warmup" else total + cfg.indexer_kl_weight * kl
        elif cfg.mode == "indexer_warmup":
            raise ValueError("indexer_warmup needs CSA layers with visible compressed entries "
                             "(sequence longer than the CSA compression rate)")
        metrics["loss"] = total
        metrics["kl_rows"] = self.kl_rows
        return metrics

    def _tied_embedding(self) -> bool:
        return self.mesh.embed is not None and self.stage.embed_tokens is not None

    def _allreduce_grads(self) -> None:
        mesh, st = self.mesh, self.stage
        with self.tracer.span("allreduce grads", cat="allreduce", tid="collective"):
            embed = st.embed_tokens.weight if self._tied_embedding() else None
            dense = [p for n, p in st.named_parameters()
                     if p.grad is not None and not st.is_expert_param(n) and p is not embed]
            if mesh.ep_size > 1 and dense:
                flat = torch.cat([p.grad.reshape(-1) for p in dense])
                dist.all_reduce(flat, group=mesh.dense)
                at = 0
                for p in dense:
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
            if own:
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
    def update_router_biases(self, speed: float = 1e-3) -> dict[str, float]:
        """Aux-loss-free balancing with the step's global loads (as ``model.training.update_router_biases``)."""
        out = {}
        for i, blk in self.stage.layers.items():
            load = self.loads.get(int(i))
            if load is None:
                continue
            load = load.float()
            if self.mesh.ep_size > 1:
                dist.all_reduce(load, group=self.mesh.dense)
            out[f"load_cv/{i}"] = float(load.std(unbiased=False) / load.mean().clamp(min=1e-9))
            if not blk.mlp.gate.hashed and speed > 0:
                blk.mlp.gate.e_score_correction_bias.add_(speed * torch.sign(load.mean() - load))
        return out

    def close(self) -> None:
        self.links.close()
        self.a2a.close()
