"""One pipeline stage of the DeepSeek-V4 decoder: a layer slice and an expert shard.

A ``PipelineStage`` owns the decoder layers ``[start, end)`` of a ``Transformer``;
the first stage also owns the token embedding, the last one the hyper-head, the
final norm, the LM head and the MTP module (plus its own copy of the embedding,
which MTP reads: the copies are kept equal by summing their gradients, as
Megatron does for tied embeddings). Of every MoE layer it keeps only the routed
experts ``[expert_lo, expert_hi)`` of its expert shard; routers, shared experts and
attention are replicated over the stage's expert shards (each shard sees
different sequences -- the expert-parallel group is data parallel for them).
A one-process run is the stage that holds everything (``PipelineStage.whole``).

Parameter names are the full model's (``layers.5.mlp.experts.gate_up_proj``), so
a stage's ``state_dict`` is a slice of the model's and checkpoints re-shard by
name (``shard_state_dict`` / ``merge_state_dicts``).

This module is single-process: expert dispatch/combine across shards is
injected through ``MoE.expert_parallel`` (``comm.expert_parallel``). The forward
runs the layers through ``model.transformer.run_blocks``, the path the full model
uses, and returns the routing and indexer KL as values (``ForwardAux``);
:meth:`PipelineStage.losses` applies the objective of ``model.losses``.

Letters: B batch, S sequence, N hc streams, E hidden, V vocab.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .attention import Attention
from .init import INIT_ATTR, init_rule, materialize
from .losses import (
    METRIC_KEYS,
    LossConfig,
    LossNorms,
    bias_update,
    combine_metrics,
    expert_load,
    mtp_targets,
    sequence_balance_loss,
    token_ce_sum,
)
from .moe import MoE, Router, Routing
from .state import ModelState, advance, check_rows, start_positions
from .transformer import BlockCall, ForwardAux, Transformer, meta_device, run_blocks

MTP_KEY = "mtp.0"  # routing / forced-routing key of the MTP block's MoE (its parameter prefix)
EXPERT_TENSORS = ("gate_up_proj", "down_proj")


def is_expert_param(name: str) -> bool:
    """True for routed-expert tensors (``...mlp.experts.{gate_up_proj,down_proj}``), whose dim 0 is the expert.

    Optimizer state keys ``<param name>::<state key>`` (``model.optim.optimizer_state_by_name``)
    are judged by their parameter name; a 0-d state of an expert parameter (AdamW
    ``step``) has no expert dim: slicing and merging treat 0-d tensors as replicated.
    """
    name = name.split("::", 1)[0]
    return ".experts." in name and name.rsplit(".", 1)[-1] in EXPERT_TENSORS


def shard_range(n_experts: int, ep_rank: int, ep_size: int) -> tuple[int, int]:
    """Global expert ids ``[lo, hi)`` of expert shard ``ep_rank`` of ``ep_size``.

    Raises ValueError when ``n_experts`` is not divisible by ``ep_size``.
    """
    if ep_size < 1 or not 0 <= ep_rank < ep_size:
        raise ValueError(f"expert shard {ep_rank} of {ep_size} is out of range")
    if n_experts % ep_size:
        raise ValueError(f"n_routed_experts ({n_experts}) must be divisible by the expert-parallel size ({ep_size})")
    per = n_experts // ep_size
    return ep_rank * per, (ep_rank + 1) * per


class PipelineStage(nn.Module):
    """Layers ``[start, end)`` of a ``Transformer`` and experts ``[expert_lo, expert_hi)``.

    Build with ``PipelineStage.from_model(model, start, end, first, last, ep_rank, ep_size)``
    (the model's modules are taken over, routed experts sliced) or ``PipelineStage.whole(model)``.
    ``forward(inp, input_ids, doc_ids, state, forced=, call=)`` returns ``(out, ForwardAux)``:

    - first stage: ``inp`` is None; embeds ``input_ids [B,S]`` into ``hc_mult`` streams;
    - other stages: ``inp`` is the previous stage's streams ``[B,S,N,E]``;
    - ``out`` is streams ``[B,S,N,E]``, or on the last stage the hidden state after the
      hyper-head ``[B,S,E]`` (before the final norm), as ``Transformer.forward_hidden``;
    - with ``state`` (``new_state``; inference) positions continue from ``state.pos``
      and the state advances, as ``Transformer.forward`` with a ``ModelState`` (or a
      list of per-row states: a ragged batch);
    - ``forced``: anticipatory routing, ``"layers.<i>" -> [B*S, K]`` expert ids;
      ``call``: how each block is run (``model.remat.checkpointed``: activation checkpointing).
    """

    MTP_KEY = MTP_KEY
    METRIC_KEYS = METRIC_KEYS  # the partial sums ``losses`` returns (reduced by the runner)

    def __init__(self, args, start: int, end: int, first: bool, last: bool, expert_lo: int, expert_hi: int):
        super().__init__()
        self.args = args
        self.start, self.end, self.first, self.last = start, end, first, last
        self.expert_lo, self.expert_hi = expert_lo, expert_hi
        self.embed_tokens: nn.Module | None = None
        self.layers = nn.ModuleDict()
        self.hc_head = self.norm = self.lm_head = None
        self.mtp = nn.ModuleList()

    @classmethod
    def from_model(cls, model: Transformer, start: int, end: int, first: bool, last: bool,
                   ep_rank: int = 0, ep_size: int = 1) -> PipelineStage:
        """Take layers ``[start, end)`` (and the ends' modules) of ``model``; keep expert shard ``ep_rank``.

        The model must not be used afterwards (its modules are shared, experts replaced).
        Raises ValueError for an empty or out-of-range slice or an indivisible expert count.
        """
        L = len(model.layers)
        if not 0 <= start < end <= L:
            raise ValueError(f"layer slice [{start}, {end}) is not inside the model's {L} layers")
        if first != (start == 0) or last != (end == L):
            raise ValueError(f"first/last ({first}, {last}) disagree with the slice [{start}, {end}) of {L} layers")
        lo, hi = shard_range(model.args.n_routed_experts, ep_rank, ep_size)
        st = cls(model.args, start, end, first, last, lo, hi)
        if first or (last and len(model.mtp)):
            st.embed_tokens = model.embed_tokens
        for i in range(start, end):
            st.layers[str(i)] = model.layers[i]
        if last:
            st.hc_head, st.norm, st.lm_head, st.mtp = model.hc_head, model.norm, model.lm_head, model.mtp
        if (lo, hi) != (0, model.args.n_routed_experts):
            for moe in st.moes():
                ex = moe.experts
                for name in EXPERT_TENSORS:
                    full_t = getattr(ex, name)
                    part = nn.Parameter(full_t.detach()[lo:hi].clone())
                    if init_rule(full_t) is not None:
                        setattr(part, INIT_ATTR, init_rule(full_t))
                    setattr(ex, name, part)
        return st

    @classmethod
    def build(cls, args, start: int, end: int, ep_rank: int = 0, ep_size: int = 1, *, seed: int = 0,
              device: torch.device | str | None = None) -> PipelineStage:
        """Stage ``[start, end)`` / expert shard ``ep_rank`` of ``ep_size``, holding only its own tensors.

        The full model is built on the ``meta`` device (no memory), sliced, and only this
        stage's parameters are materialised on ``device`` with layout-independent values
        (``model.init``: from ``(seed, full name)``, expert rows from their global expert
        id), so every layout starts from the parameters ``Transformer.build(args, seed)`` has.

        Raises:
            ValueError: as ``from_model``.
        """
        with meta_device():
            full = Transformer(args)
        st = cls.from_model(full, start, end, start == 0, end == args.num_hidden_layers, ep_rank, ep_size)
        del full
        return materialize(st, seed, device, expert_lo=st.expert_lo)

    @classmethod
    def whole(cls, model: Transformer) -> PipelineStage:
        """The stage holding all of ``model`` (a one-process run); shares the model's modules."""
        return cls.from_model(model, 0, len(model.layers), True, True)

    # ------------------------------------------------------------------ parts
    @staticmethod
    def loss_norms(batch: dict) -> LossNorms:
        """``LossNorms.of(batch)``: the global batch's denominators."""
        return LossNorms.of(batch)

    @staticmethod
    def is_expert_param(name: str) -> bool:
        """``model.stage.is_expert_param``: a routed-expert tensor (sharded, dim 0 = expert)."""
        return is_expert_param(name)

    def model_order_parameters(self) -> list[nn.Parameter]:
        """This stage's parameters in the full ``Transformer``'s order (embedding, layers, hyper-head,
        norm, LM head, MTP): what a one-process loop over ``model.parameters()`` iterates."""
        rank = {"embed_tokens": 0, "layers": 1, "hc_head": 2, "norm": 3, "lm_head": 4, "mtp": 5}
        named = list(self.named_parameters())
        order = sorted(range(len(named)), key=lambda i: (rank[named[i][0].split(".", 1)[0]], i))
        return [named[i][1] for i in order]

    def moes(self) -> list[MoE]:
        """Every MoE of this stage (its layers', then MTP's)."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    def gate(self, key: str) -> Router:
        """The router of the MoE named ``key`` (``"layers.<i>"`` or ``MTP_KEY``)."""
        if key == MTP_KEY:
            return self.mtp[0].block.mlp.gate
        return self.layers[key.split(".", 1)[1]].mlp.gate

    def attentions(self) -> list[Attention]:
        return [m for m in self.modules() if isinstance(m, Attention)]

    # ----------------------------------------------------------------- state
    def new_state(self, batch: int = 1, dtype: torch.dtype | None = None, device=None) -> ModelState:
        """An empty decode state of this stage's layers (and its MTP block on the last stage)
        for ``batch`` sequences; ``forward(..., state=...)`` advances it (``model.state``)."""
        p = next(self.parameters())
        dtype, device = dtype or p.dtype, device or p.device
        st = ModelState([blk.self_attn.new_state(batch, dtype, device) for blk in self.layers.values()])
        if len(self.mtp):
            st.mtp = self.mtp[0].block.self_attn.new_state(batch, dtype, device)
        return st

    # ---------------------------------------------------------------- forward
    def forward(self, inp: torch.Tensor | None, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
                state: ModelState | None = None, *, forced: Mapping[str, torch.Tensor] | None = None,
                call: BlockCall | None = None) -> tuple[torch.Tensor, ForwardAux]:
        if self.first:
            x = self.embed_tokens(input_ids)
            streams = x.unsqueeze(2).expand(-1, -1, self.args.hc_mult, -1).contiguous()
        else:
            if inp is None or inp.dim() != 4 or inp.shape[:2] != input_ids.shape:
                raise ValueError(f"stage {self.start}..{self.end} needs streams [B,S,N,E] matching input_ids "
                                 f"{tuple(input_ids.shape)}, got {None if inp is None else tuple(inp.shape)}")
            streams = inp
        check_rows(state, input_ids.shape[0], input_ids.shape[1], self.args.max_position_embeddings)
        pos0 = start_positions(state)
        streams, aux = run_blocks(((f"layers.{i}", blk) for i, blk in self.layers.items()), streams, input_ids,
                                  pos0, state, doc_ids, forced, call)
        advance(state, input_ids.shape[1])
        return (self.hc_head(streams) if self.last else streams), aux

    def logits(self, hidden_BSE: torch.Tensor) -> torch.Tensor:
        """LM-head logits ``[B,S,V]`` of the last stage's ``forward`` output (final norm + head)."""
        return self.lm_head(self.norm(hidden_BSE))

    def mtp_forward(self, hidden_BSE: torch.Tensor, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None, *,
                    forced: Mapping[str, torch.Tensor] | None = None, call: BlockCall | None = None
                    ) -> tuple[torch.Tensor, Routing]:
        """The MTP block on the last stage: ``(hidden [B,S-1,E] predicting tokens i+2, its Routing)``."""
        nxt = input_ids[:, 1:]
        return self.mtp[0](hidden_BSE[:, :-1], self.embed_tokens(nxt), nxt,
                           doc_ids=doc_ids[:, :-1] if doc_ids is not None else None,
                           forced_indices=None if forced is None else forced.get(MTP_KEY), call=call)

    def runs_mtp(self, cfg: LossConfig, seq_len: int) -> bool:
        """Whether ``losses`` runs the MTP block for this config and sequence length."""
        return self.last and cfg.mtp_weight > 0 and len(self.mtp) > 0 and seq_len > 2

    def losses(self, out: torch.Tensor, aux: ForwardAux, batch: dict, norms: LossNorms, cfg: LossConfig, *,
               forced: Mapping[str, torch.Tensor] | None = None, call: BlockCall | None = None,
               kl_rows: float | None = None) -> tuple[torch.Tensor | None, dict, dict[str, Routing]]:
        """This stage's share of the training objective (``model.losses``) for one (micro)batch.

        ``out``, ``aux``: ``forward``'s result; ``batch`` the microbatch (``input_ids``,
        ``labels``, optional ``doc_ids``, all ``[b,S]``); ``norms`` the global batch's.
        Returns ``(loss, sums, routing)``:

        - ``loss``: a scalar to backpropagate (CE and MTP on the last stage, the balance loss
          of this stage's learned-routing MoEs, all over ``norms``; plus the indexer KL sum,
          divided by ``kl_rows`` when given, else unnormalised: the caller divides the
          indexers' gradients by the global row count), or None when nothing here needs a gradient;
        - ``sums``: float partial sums ``ce``, ``mtp``, ``balance`` (already divided by
          ``norms``), ``kl_sum``, ``kl_rows`` -- those this stage produced;
        - ``routing``: the routing of every MoE that ran (the layers', and the MTP block's when
          ``cfg.mtp_balance``), for the expert loads of the bias update.
        """
        ids, labels, docs = batch["input_ids"], batch["labels"], batch.get("doc_ids")
        b, S = ids.shape
        terms: list[torch.Tensor] = []
        sums: dict[str, float] = {}
        routing = dict(aux.routing)
        balanced: list[tuple[Routing, int]] = [(r, S) for r in aux.routing.values() if r.learned]
        if self.last:
            ce = token_ce_sum(self.logits(out), labels) / max(norms.ce_tokens, 1)
            terms.append(ce)
            sums["ce"] = float(ce.detach())
            if self.runs_mtp(cfg, S):
                h, r = self.mtp_forward(out, ids, docs, forced=forced, call=call)
                mtp = token_ce_sum(self.lm_head(h), mtp_targets(labels)) / max(norms.mtp_tokens, 1)
                terms.append(cfg.mtp_weight * mtp)
                sums["mtp"] = float(mtp.detach())
                if cfg.mtp_balance:
                    routing[MTP_KEY] = r
                    balanced.append((r, S - 1))
        if cfg.balance_weight > 0 and balanced:
            bal = torch.stack([sequence_balance_loss(r, b, n) for r, n in balanced]).sum() * (b / norms.sequences)
            terms.append(cfg.balance_weight * bal)
            sums["balance"] = float(bal.detach())
        kl = aux.kl
        rows = float(kl.rows) if kl is not None else 0.0
        if rows > 0:
            terms.append(cfg.indexer_kl_weight * (kl.total if kl_rows is None else kl.total / kl_rows))
            sums["kl_sum"] = float(kl.total.detach())
            sums["kl_rows"] = rows
        if cfg.mode == "indexer_warmup":  # the main model is frozen: only the KL trains (the indexers)
            terms = terms[-1:] if rows > 0 else []
        terms = [t for t in terms if t.requires_grad]
        return (torch.stack(terms).sum() if terms else None), sums, routing

    @staticmethod
    def combine_metrics(totals: dict[str, float], present: set[str], cfg: LossConfig) -> dict[str, float]:
        """``model.losses.combine_metrics``: the step's metrics from the global sums."""
        return combine_metrics(totals, present, cfg)

    def expert_loads(self, routing: dict[str, Routing]) -> dict[str, torch.Tensor]:
        """Tokens per expert ``[n_routed_experts]`` of every MoE in ``routing`` (one microbatch)."""
        return {k: expert_load(r, self.args.n_routed_experts) for k, r in routing.items()}

    @torch.no_grad()
    def update_router_biases(self, loads: dict[str, torch.Tensor], speed: float | None) -> dict[str, float]:
        """The auxiliary-loss-free bias update (``model.losses.bias_update``) of every MoE in
        ``loads`` (the step's *global* tokens per expert). Returns ``{"load_cv/<layer>": cv}``
        (``load_cv/mtp`` for the MTP block)."""
        return {"load_cv/" + ("mtp" if k == MTP_KEY else k.split(".", 1)[1]): bias_update(self.gate(k), load, speed)
                for k, load in loads.items()}

    def indexer_parameters(self) -> list[nn.Parameter]:
        return [p for a in self.attentions() if a.compressor is not None and hasattr(a.compressor, "indexer")
                for p in a.compressor.indexer.parameters()]

    # ------------------------------------------------------------ checkpoints
    def shard_state_dict(self, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This stage's tensors from a full-model state dict (experts sliced to this shard).

        Raises ValueError naming missing keys or mismatched shapes.
        """
        own = self.state_dict()
        out, missing = {}, []
        for name, ref in own.items():
            t = full.get(name)
            if t is None:
                missing.append(name)
                continue
            if is_expert_param(name) and t.dim() > 0:
                t = t[self.expert_lo:self.expert_hi]
            if t.shape != ref.shape:
                raise ValueError(f"checkpoint tensor {name} has shape {tuple(t.shape)}, this stage needs "
                                 f"{tuple(ref.shape)}")
            out[name] = t
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensor(s) of this stage, e.g. {missing[:3]}")
        return out


def merge_state_dicts(shards: list[tuple[dict[str, torch.Tensor], int]], n_experts: int) -> dict[str, torch.Tensor]:
    """Full-model tensors from stage shards ``[(state_dict, expert_lo), ...]``.

    Replicated (and 0-d) tensors are taken once; routed-expert tensors are concatenated in
    global expert order. Raises ValueError when an expert range is missing or
    covered twice.
    """
    full: dict[str, torch.Tensor] = {}
    parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for sd, lo in shards:
        for name, t in sd.items():
            if is_expert_param(name) and t.dim() > 0:
                parts.setdefault(name, []).append((lo, t))
            else:
                full.setdefault(name, t)
    for name, pieces in parts.items():
        pieces.sort(key=lambda p: p[0])
        at = 0
        for lo, t in pieces:
            if lo != at:
                raise ValueError(f"{name}: expert shards do not tile [0, {n_experts}) (gap or overlap at {at}, "
                                 f"next shard starts at {lo})")
            at += t.shape[0]
        if at != n_experts:
            raise ValueError(f"{name}: expert shards cover {at} of {n_experts} experts")
        full[name] = torch.cat([t for _, t in pieces])
    return full
