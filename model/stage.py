"""One pipeline stage of the DeepSeek-V4 decoder (issue 4): a layer slice and an expert shard.

A ``PipelineStage`` owns the decoder layers ``[start, end)`` of a ``Transformer``;
the first stage also owns the token embedding, the last one the hyper-head, the
final norm, the LM head and the MTP module (plus its own copy of the embedding,
which MTP reads: the copies are kept equal by summing their gradients, as
Megatron does for tied embeddings). Of every MoE layer it keeps only the routed
experts ``[expert_lo, expert_hi)`` of its expert shard; routers, shared experts and
attention are replicated over the stage's expert shards (each shard sees
different sequences -- the expert-parallel group is data parallel for them).

Parameter names are the full model's (``layers.5.mlp.experts.gate_up_proj``), so
a stage's ``state_dict`` is a slice of the model's and checkpoints re-shard by
name (``shard_state_dict`` / ``merge_state_dicts``).

This module is single-process: expert dispatch/combine across shards is
injected through ``MoE.expert_parallel`` (``comm.expert_parallel``).

Losses are written as *sums* divided by batch-global counts (``LossNorms``), so
that stages and shards that each see part of a batch add up to exactly the
single-process ``model.training.compute_losses`` (sequence-wise balance loss
and token-mean cross-entropies both decompose this way). The indexer KL is
returned unnormalised: its gradient reaches only the indexers, whose gradients
the caller divides by the global KL row count afterwards.

Letters: B batch, S sequence, N hc streams, E hidden, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import Attention
from .moe import MoE
from .state import ModelState, advance, check_rows, layer_state, start_positions
from .training import IGNORE, LossConfig, _reset_kl, sequence_balance_loss
from .transformer import Transformer

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


@dataclass
class LossNorms:
    """Batch-global denominators, so that partial sums over microbatches and shards
    add up to the single-process means: ``ce_tokens`` (labels != -100),
    ``mtp_tokens`` (MTP targets != -100), ``sequences`` (for the sequence-wise balance loss)."""

    ce_tokens: int
    mtp_tokens: int
    sequences: int

    @staticmethod
    def of(batch: dict) -> LossNorms:
        """Denominators of a whole (global) batch dict with ``labels [B,S]``."""
        labels = batch["labels"]
        mtp = labels[:, 1:].clone()
        mtp[labels[:, :-1] == IGNORE] = IGNORE
        return LossNorms(int((labels != IGNORE).sum()), int((mtp != IGNORE).sum()), int(labels.shape[0]))


class PipelineStage(nn.Module):
    """Layers ``[start, end)`` of a ``Transformer`` and experts ``[expert_lo, expert_hi)``.

    Build with ``PipelineStage.from_model(model, start, end, first, last, ep_rank, ep_size)``
    (the model's modules are taken over, routed experts sliced). ``forward``:

    - first stage: ``inp`` is None; embeds ``input_ids [B,S]`` into ``hc_mult`` streams;
    - other stages: ``inp`` is the previous stage's streams ``[B,S,N,E]``;
    - returns streams ``[B,S,N,E]``, or on the last stage the hidden state after the
      hyper-head ``[B,S,E]`` (before the final norm), as ``Transformer.forward_hidden``;
    - with ``state`` (``new_state``; inference) positions continue from ``state.pos``
      and the state advances, as ``Transformer.forward`` with a ``ModelState`` (or a
      list of per-row states: a ragged batch).
    """

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
                    setattr(ex, name, nn.Parameter(getattr(ex, name).detach()[lo:hi].clone()))
        return st

    # ------------------------------------------------------------------ parts
    @staticmethod
    def loss_norms(batch: dict) -> LossNorms:
        """``LossNorms.of(batch)``: the global batch's denominators."""
        return LossNorms.of(batch)

    @staticmethod
    def is_expert_param(name: str) -> bool:
        """``model.stage.is_expert_param``: a routed-expert tensor (sharded, dim 0 = expert)."""
        return is_expert_param(name)

    def moes(self) -> list[MoE]:
        """Every MoE of this stage (its layers', then MTP's)."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    def routed_moes(self) -> list[tuple[int, MoE]]:
        """``(layer index, MoE)`` of the decoder layers with learned routing (not MTP)."""
        return [(int(i), blk.mlp) for i, blk in self.layers.items() if not blk.mlp.gate.hashed]

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
    def forward(self, inp: torch.Tensor | None, input_ids: torch.Tensor,
                doc_ids: torch.Tensor | None = None, state: ModelState | None = None) -> torch.Tensor:
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
        for j, blk in enumerate(self.layers.values()):
            streams = blk(streams, input_ids, pos0, layer_state(state, j), doc_ids)
        advance(state, input_ids.shape[1])
        return self.hc_head(streams) if self.last else streams

    def logits(self, hidden_BSE: torch.Tensor) -> torch.Tensor:
        """LM-head logits ``[B,S,V]`` of the last stage's ``forward`` output (final norm + head)."""
        return self.lm_head(self.norm(hidden_BSE))

    def losses(self, out: torch.Tensor, batch: dict, norms: LossNorms, cfg: LossConfig) -> tuple[torch.Tensor, dict]:
        """This stage's share of the training objective for one (micro)batch after ``forward``.

        ``out`` is ``forward``'s result, ``batch`` the microbatch (``input_ids``,
        ``labels``, optional ``doc_ids``, all ``[b,S]``). Returns ``(loss, sums)``:
        ``loss`` is a scalar to backpropagate (CE and MTP on the last stage, the
        balance loss of this stage's routed layers, all over ``norms``; plus the
        *unnormalised* indexer KL sum, see the module docstring) or None when
        nothing here needs a gradient; ``sums`` holds float partial sums
        ``ce``, ``mtp``, ``balance`` (already divided by ``norms``), ``kl_sum``, ``kl_rows``.
        """
        ids, labels, docs = batch["input_ids"], batch["labels"], batch.get("doc_ids")
        b, S = ids.shape
        terms: list[torch.Tensor] = []
        sums: dict[str, float] = {}
        if self.last:
            logits = self.lm_head(self.norm(out))
            ce = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                   ignore_index=IGNORE, reduction="sum") / max(norms.ce_tokens, 1)
            terms.append(ce)
            sums["ce"] = float(ce.detach())
            if cfg.mtp_weight > 0 and len(self.mtp) and S > 2:
                nxt = ids[:, 1:]
                h = self.mtp[0](out[:, :-1], self.embed_tokens(nxt), nxt,
                                doc_ids=docs[:, :-1] if docs is not None else None)
                mlog = self.lm_head(h)
                target = labels[:, 1:].clone()
                target[labels[:, :-1] == IGNORE] = IGNORE
                mtp = torch.nn.functional.cross_entropy(mlog.float().reshape(-1, mlog.shape[-1]), target.reshape(-1),
                                                        ignore_index=IGNORE, reduction="sum") / max(norms.mtp_tokens, 1)
                terms.append(cfg.mtp_weight * mtp)
                sums["mtp"] = float(mtp.detach())
        if cfg.balance_weight > 0:
            routed = self.routed_moes()
            if routed:
                bal = torch.stack([sequence_balance_loss(m, b, S) for _, m in routed]).sum() * (b / norms.sequences)
                terms.append(cfg.balance_weight * bal)
                sums["balance"] = float(bal.detach())
        kls = [(a.kl_sum, a.kl_rows) for a in self.attentions() if a.kl_sum is not None and a.kl_rows]
        if kls:
            kl_sum = sum(k for k, _ in kls)
            terms.append(cfg.indexer_kl_weight * kl_sum)
            sums["kl_sum"] = float(kl_sum.detach())
            sums["kl_rows"] = float(sum(n for _, n in kls))
        _reset_kl(self)
        if cfg.mode == "indexer_warmup":  # the main model is frozen: only the KL trains (the indexers)
            terms = terms[-1:] if kls else []
        terms = [t for t in terms if t.requires_grad]
        return (torch.stack(terms).sum() if terms else None), sums

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
