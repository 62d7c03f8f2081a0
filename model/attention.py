"""DeepSeek-V4 hybrid attention: sliding window + CSA (with the Lightning Indexer) + HCA.

Source: DeepSeek-V4 report section 2.3 (eqs. 9-23) and docs/model.md §2; weight
layout and numerics follow ``transformers.models.deepseek_v4`` so checkpoints
load unchanged.

Every layer has the sliding-window branch (the last ``sliding_window`` kv
vectors, current token included). CSA layers add compressed entries (one per
m=4 tokens, overlapping two-series compressor) of which each query attends only
to the ``index_topk`` picked by the Lightning Indexer -- the entries are
*gathered*, so attention cost per query is O(window + top-k) however long the
context. HCA layers add heavily compressed entries (one per m'=128 tokens),
attended densely. One softmax spans window + compressed entries + a per-head
sink logit (denominator only).

Shared-KV MQA: one kv head (post-norm, post-RoPE) is both key and value, so the
output's RoPE channels are rotated back by the query position (inverse RoPE).

Letters: B batch, S new tokens, Q query chunk, H heads, D head_dim, R rope
dims, T compressed entries, K selected entries, W window, M compress rate,
C compressor channels (2D for CSA's two series, D for HCA), I indexer heads.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

import kernels

from .config import CSA, HCA, SWA, ModelArgs
from .init import filled, normal_
from .layers import RMSNorm, rms_norm_noweight
from .rope import Rotary, apply_rope
from .state import CompressorState, Growable, LayerState, is_ragged, window_positions


class IndexerKL(NamedTuple):
    """The indexer-training KL of one attention call, returned by ``Attention.forward``.

    ``total``: 0-d float32, KL(teacher || indexer) summed over the query rows that see
    at least one compressed entry (with a gradient to the indexer only); ``rows``: 0-d
    int64, how many such rows. The caller divides by the rows of the whole batch.
    """

    total: torch.Tensor
    rows: torch.Tensor

    def __add__(self, other):  # type: ignore[override]  # sums, not tuple concatenation
        if other is None:
            return self
        return IndexerKL(self.total + other.total, self.rows + other.rows)

    __radd__ = __add__


# Query rows processed together in the attention core; bounds the logits memory
# of long prefills to O(QUERY_CHUNK * (W + K + T/128)) per head. Small chunks also
# cut the masked part of the window band (keys per chunk: QUERY_CHUNK + W - 1):
# 128 beat 256 and 512 by 5% and 12% on an 8K prefill of the `small` flavor.
QUERY_CHUNK = 128


class Compressor(nn.Module):
    """Token-block compressor (HCA: eqs. 20-23; CSA: eqs. 9-12 with overlap).

    Each closed block i of M tokens yields one entry
    ``RMSNorm(sum_j softmax_j(Z_j + B) * C_j)`` (per-channel softmax over the
    block's slots, float32), rotated by RoPE (compress theta) at position ``i*M``.
    With ``overlap`` (CSA) the projections are 2D wide: channels ``[D:]`` are the
    current block's series, ``[:D]`` the series that joins the *next* block's
    window, so entry i pools 2M slots: block i-1's ``[:D]`` and block i's ``[D:]``
    (block -1: zero kv, -inf gate).
    """

    def __init__(self, hidden: int, dim: int, rate: int, overlap: bool, eps: float, std: float):
        super().__init__()
        self.dim, self.rate, self.overlap = dim, rate, overlap
        width = 2 * dim if overlap else dim
        self.kv_proj = nn.Linear(hidden, width, bias=False)
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.position_bias = filled((rate, width), 0.0)
        self.kv_norm = RMSNorm(dim, eps)
        normal_(self.kv_proj.weight, std)
        normal_(self.gate_proj.weight, std)

    def forward(self, x_BSE: torch.Tensor, rotary: Rotary, state: CompressorState | None,
                start_entry: int, doc_ids_BS: torch.Tensor | None = None) -> torch.Tensor:
        """Compress the blocks that close within ``x`` (plus the state's tail).

        Args:
            x_BSE: attention input ``[B, S, hidden]``.
            state: streaming state (updated in place) or ``None`` (stateless: only
                complete blocks of ``x`` starting at position 0 are compressed).
            start_entry: index of the first entry this call may emit (entries are
                rotated at ``(start_entry + i) * M``).
            doc_ids_BS: packed-document ids (stateless only): with overlap, block i-1
                joins entry i only if it starts in the same document as block i.
        Returns:
            new entries ``[B, n, D]`` (post-norm, post-RoPE).
        """
        return self.pool(self.kv_proj(x_BSE), self.gate_proj(x_BSE), rotary, state, start_entry, doc_ids_BS)

    def pool(self, kv: torch.Tensor, gate: torch.Tensor, rotary: Rotary, state: CompressorState | None,
             start_entry: int, doc_ids_BS: torch.Tensor | None = None) -> torch.Tensor:
        """``forward`` after the projections: ``kv``/``gate`` ``[B, S, C]`` -> new entries ``[B, n, D]``."""
        B = kv.shape[0]
        if state is not None and state.tail_kv is not None and state.tail_kv.shape[1]:
            kv = torch.cat([state.tail_kv, kv], dim=1)
            gate = torch.cat([state.tail_gate, gate], dim=1)
        usable = (kv.shape[1] // self.rate) * self.rate
        if state is not None:
            state.tail_kv, state.tail_gate = kv[:, usable:], gate[:, usable:]
        n = usable // self.rate
        if n == 0:
            return kv.new_zeros(B, 0, self.dim)
        if state is None and kernels.use_kernels(kv):  # fused pooling (kernels/compressor.py)
            def fused():
                from kernels.ops import compressor_pool

                prev_ok = None
                if self.overlap and doc_ids_BS is not None:
                    starts = doc_ids_BS[:, : n * self.rate: self.rate]
                    prev_ok = torch.ones_like(starts, dtype=torch.bool)
                    prev_ok[:, 1:] = starts[:, 1:] == starts[:, :-1]
                return compressor_pool(kv, gate, self.position_bias, self.rate, self.overlap, prev_ok).to(kv.dtype)
            pooled = kernels.run("compressor", fused, lambda: None)
            if pooled is not None:
                return self._finish(pooled, rotary, start_entry)
        kv = kv[:, :usable].view(B, n, self.rate, -1)
        gate = gate[:, :usable].view(B, n, self.rate, -1) + self.position_bias
        if self.overlap:
            D = self.dim
            cur_kv, cur_gate = kv[..., D:], gate[..., D:]
            nxt_kv, nxt_gate = kv[..., :D], gate[..., :D]
            if state is not None and state.overlap_kv is not None:
                first_kv, first_gate = state.overlap_kv.unsqueeze(1), state.overlap_gate.unsqueeze(1)
            else:
                first_kv = kv.new_zeros(B, 1, self.rate, D)
                first_gate = gate.new_full((B, 1, self.rate, D), float("-inf"))
            if state is not None:
                state.overlap_kv, state.overlap_gate = nxt_kv[:, -1].clone(), nxt_gate[:, -1].clone()
            prev_kv = torch.cat([first_kv.to(kv.dtype), nxt_kv[:, :-1]], dim=1)
            prev_gate = torch.cat([first_gate.to(gate.dtype), nxt_gate[:, :-1]], dim=1)
            if doc_ids_BS is not None and n > 1:
                starts = doc_ids_BS[:, : n * self.rate: self.rate]  # [B,n] doc of each block's first token
                cross = torch.zeros_like(starts, dtype=torch.bool)
                cross[:, 1:] = starts[:, 1:] != starts[:, :-1]
                prev_gate = prev_gate.masked_fill(cross.view(B, n, 1, 1), float("-inf"))
            kv = torch.cat([prev_kv, cur_kv], dim=2)
            gate = torch.cat([prev_gate, cur_gate], dim=2)
        pooled = (kv * gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)).sum(dim=2)
        return self._finish(pooled, rotary, start_entry)

    def _finish(self, pooled_BnD: torch.Tensor, rotary: Rotary, start_entry: int) -> torch.Tensor:
        """RMSNorm, then RoPE (compress theta) at each entry's first position ``(start_entry + i) * M``."""
        entries = self.kv_norm(pooled_BnD)
        positions = (torch.arange(pooled_BnD.shape[1], device=pooled_BnD.device) + start_entry) * self.rate
        cos, sin = rotary.cos_sin(positions, "compress")
        return apply_rope(entries, cos, sin)


class Indexer(Compressor):
    """Lightning Indexer (report eqs. 13-17): picks the top-k CSA entries per query.

    ``I[t,s] = sum_h w[t,h] * ReLU(q[t,h] . K[s]) * index_head_dim^-0.5`` with
    ``w = weights_proj(x) * index_n_heads^-0.5`` and ``q = q_b_proj(cq)`` RoPE'd
    at the query position (compress theta). ``K`` comes from the indexer's own
    overlapping compressor at ``index_head_dim`` (this class *is* that
    compressor, plus the query side). Only entries ``s < (t+1)//M`` are eligible.
    Cost is O(T) per query with tiny dims; no gradient flows through the selection.
    """

    def __init__(self, args: ModelArgs):
        std = args.initializer_range
        super().__init__(args.hidden_size, args.index_head_dim, args.csa_rate, overlap=True,
                         eps=args.rms_norm_eps, std=std)
        self.n_heads, self.head_dim = args.index_n_heads, args.index_head_dim
        self.topk = args.index_topk
        self.q_b_proj = nn.Linear(args.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.scorer = nn.Module()
        self.scorer.weights_proj = nn.Linear(args.hidden_size, self.n_heads, bias=False)
        for m in (self.q_b_proj, self.scorer.weights_proj):
            normal_(m.weight, std)

    def queries(self, x_BSE: torch.Tensor, cq_BSL: torch.Tensor, q_cos, q_sin):
        """``(q [B,S,I,Di] float32, w [B,S,I] float32)`` for the scorer."""
        B, S, _ = x_BSE.shape
        q = self.q_b_proj(cq_BSL).view(B, S, self.n_heads, self.head_dim)
        q = apply_rope(q, q_cos, q_sin)
        w = self.scorer.weights_proj(x_BSE).float() * self.n_heads ** -0.5
        return q.float(), w

    def scores(self, q_BQID: torch.Tensor, w_BQI: torch.Tensor, keys_BTD: torch.Tensor) -> torch.Tensor:
        """Index scores ``[B, Q, T]`` float32 (no causal masking)."""
        logits = torch.matmul(q_BQID, keys_BTD.float().transpose(-1, -2).unsqueeze(1))  # [B,Q,I,T]
        logits = logits.relu_()
        # sum_h w[h] * relu(.)[h, t] as one batched mat-vec (no [B,Q,I,T] temporaries)
        w = (w_BQI * self.head_dim ** -0.5).unsqueeze(-2)  # [B,Q,1,I]
        return torch.matmul(w, logits).squeeze(-2)

    def select(self, scores_BQT: torch.Tensor, q_pos_Q: torch.Tensor, allowed_BQT: torch.Tensor | None = None):
        """Top-k eligible entries: ``(indices [B,Q,K] int64 clamped >= 0, valid [B,Q,K] bool)``.

        ``q_pos_Q``: query positions ``[Q]``, or ``[B, Q]`` when every row has its own.

        Eligible: causal (``s < (t+1)//M``) and, if given, ``allowed`` (same document).
        ``K = min(index_topk, T)``; slots beyond a query's eligible count are invalid.
        """
        T = scores_BQT.shape[-1]
        k = min(self.topk, T)
        # q_pos [Q] (shared by the rows) or [B, Q] (a ragged batch: each row at its own position)
        limit = ((q_pos_Q + 1) // self.rate).view(-1 if q_pos_Q.dim() == 2 else 1, q_pos_Q.shape[-1], 1)
        eligible = torch.arange(T, device=scores_BQT.device).view(1, 1, -1) < limit
        if allowed_BQT is not None:
            eligible = eligible & allowed_BQT
        masked = scores_BQT.masked_fill(~eligible, float("-inf"))
        if k == 0:
            idx = masked.topk(0, dim=-1).indices
            return idx, idx >= 0
        # Deterministic tie-breaking: every entry above the k-th value is kept, entries equal
        # to it are taken in index order. ReLU makes exact ties (score 0) common, and
        # torch.topk breaks them by an implementation-defined heap order that depends on
        # the row length -- which would make decode, chunked prefill and the full forward
        # pick different entries. (HF uses plain topk: it agrees with us whenever the k-th
        # value is not tied.)
        top = masked.topk(k, dim=-1)
        kth = top.values[..., -1:]
        above = masked > kth
        tied = masked == kth
        room = k - above.sum(-1, keepdim=True)
        chosen = above | (tied & (tied.cumsum(-1) <= room))
        # Where a tie straddles the cut anywhere in the chunk, every row takes the tie-broken
        # choice (in index order); elsewhere topk's order. Both are computed and one is picked
        # on the device, so no host synchronisation decides which.
        straddles = ((masked >= kth).sum(-1) > k).any()
        idx = torch.where(straddles, chosen.to(torch.uint8).topk(k, dim=-1).indices, top.indices)
        valid = torch.gather(eligible.expand_as(masked), -1, idx)
        return torch.where(valid, idx, torch.zeros_like(idx)), valid


class Attention(nn.Module):
    """One V4 attention layer (``layer_type`` in sliding / CSA / HCA).

    ``forward(x [B,S,E], pos0, state=None) -> [B,S,E]`` where ``pos0`` is the
    absolute position of ``x[:, 0]``; ``state`` (a ``LayerState``) is read and
    updated in place for decode / chunked prefill. Without a state the call is a
    full-sequence forward from position 0.
    """

    def __init__(self, args: ModelArgs, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        self.n_heads, self.head_dim = args.num_attention_heads, args.head_dim
        self.window = args.sliding_window
        self.o_groups = args.o_groups
        self.eps = args.rms_norm_eps
        self.rope_kind = "main" if layer_type == SWA else "compress"
        std = args.initializer_range
        E, L, H, D = args.hidden_size, args.q_lora_rank, args.num_attention_heads, args.head_dim
        self.q_a_proj = nn.Linear(E, L, bias=False)
        self.q_a_norm = RMSNorm(L, args.rms_norm_eps)
        self.q_b_proj = nn.Linear(L, H * D, bias=False)
        self.kv_proj = nn.Linear(E, D, bias=False)
        self.kv_norm = RMSNorm(D, args.rms_norm_eps)
        self.o_a_proj = nn.Linear(H * D // args.o_groups, args.o_groups * args.o_lora_rank, bias=False)
        self.o_b_proj = nn.Linear(args.o_groups * args.o_lora_rank, E, bias=False)
        self.sinks = filled(H, 0.0)
        for m in (self.q_a_proj, self.q_b_proj, self.kv_proj, self.o_a_proj, self.o_b_proj):
            normal_(m.weight, std)
        self.rotary = Rotary(args.rope_parameters, args.qk_rope_head_dim)
        self.compressor: Compressor | None = None
        self.rate = args.compress_rate(layer_type)
        if layer_type in (CSA, HCA):
            self.compressor = Compressor(E, D, self.rate, overlap=layer_type == CSA, eps=args.rms_norm_eps, std=std)
        if layer_type == CSA:
            self.compressor.indexer = Indexer(args)
        # Dense mode (training curriculum): CSA attends to every visible entry instead of the top-k.
        self.dense_csa = False
        # Indexer training (curriculum "indexer_warmup" / "sparse"): return the KL divergence
        # between the main attention's distribution over compressed entries (teacher, detached)
        # and the indexer's softmax over the same entries; the indexer's input is detached.
        self.indexer_kl = False

    # ------------------------------------------------------------------ state
    def new_state(self, batch: int, dtype: torch.dtype, device) -> LayerState:
        """An empty ``LayerState`` for ``batch`` sequences."""
        st = LayerState(window=torch.zeros(batch, self.window, self.head_dim, dtype=dtype, device=device))
        if self.compressor is not None:
            st.compressor = CompressorState(Growable(batch, self.head_dim, dtype, device))
        if self.layer_type == CSA:
            st.indexer = CompressorState(Growable(batch, self.compressor.indexer.head_dim, dtype, device))
        return st

    # ---------------------------------------------------------------- forward
    def forward(self, x_BSE: torch.Tensor, pos0: int = 0, state: LayerState | None = None,
                doc_ids_BS: torch.Tensor | None = None) -> tuple[torch.Tensor, IndexerKL | None]:
        """``(output [B,S,E], IndexerKL or None)``; see the class docstring.

        The KL is returned only when ``indexer_kl`` is on and this is a CSA layer with a
        compressed entry to attend to; nothing is kept on the module between calls.

        ``doc_ids_BS`` (training, stateless only): non-decreasing document ids of
        packed sequences; a query sees window keys and compressed entries of its own
        document only. An entry belongs to a document when its whole pooled span does;
        a CSA entry whose previous block starts in another document pools its own block
        only, as the first entry of a sequence does. A document that starts on a block
        boundary therefore gets exactly the logits it would get alone.

        Ragged batch (continuous batching): ``state`` a list of batch-1 ``LayerState``s
        and ``pos0`` a list of their start positions, one per row of ``x``; the
        projections run batched, the window / compressed-entry attention per row.
        """
        if doc_ids_BS is not None and state is not None:
            raise ValueError("doc_ids (sample-level masking) is for stateless training forwards only")
        B, S, _ = x_BSE.shape
        H, D = self.n_heads, self.head_dim
        dev = x_BSE.device
        ragged = is_ragged(state)
        if ragged:  # one batch-1 state and start position per row (continuous batching)
            q_pos = torch.tensor(pos0, device=dev).view(B, 1) + torch.arange(S, device=dev)  # [B,S]
        else:
            q_pos = torch.arange(pos0, pos0 + S, device=dev)  # [S]
        cos, sin = self.rotary.cos_sin(q_pos, self.rope_kind)
        # per-row tables need the head axis made explicit (apply_rope infers it from [S, R/2] only)
        hcos, hsin = (cos.unsqueeze(-2), sin.unsqueeze(-2)) if ragged else (cos, sin)

        cq = self.q_a_norm(self.q_a_proj(x_BSE))
        q = self.q_b_proj(cq).view(B, S, H, D)
        q = apply_rope(rms_norm_noweight(q, self.eps), hcos, hsin)
        kv = apply_rope(self.kv_norm(self.kv_proj(x_BSE)), cos, sin)  # [B,S,D]

        # Projections run batched over all rows; pooling into entries is per sequence.
        proj = iq = iw = None
        if self.compressor is not None:
            proj = [self.compressor.kv_proj(x_BSE), self.compressor.gate_proj(x_BSE), None, None]
            if self.layer_type == CSA and (not self.dense_csa or self.indexer_kl):
                ix = self.compressor.indexer
                x_ix, cq_ix = (x_BSE.detach(), cq.detach()) if self.indexer_kl else (x_BSE, cq)
                proj[2:] = ix.kv_proj(x_ix), ix.gate_proj(x_ix)
                icos, isin = self.rotary.cos_sin(q_pos, "compress")
                if ragged:
                    icos, isin = icos.unsqueeze(-2), isin.unsqueeze(-2)
                iq, iw = ix.queries(x_ix, cq_ix, icos, isin)

        if not ragged:
            comp, sel = self._entries(proj, state, doc_ids_BS)
            entry_doc = None
            if doc_ids_BS is not None and comp is not None and comp.shape[1]:
                # An entry is visible to a query of the same document as its block's first token:
                # causality puts the block's end before the query, so the whole block is in that
                # document, and the compressor dropped the previous block if it started elsewhere.
                entry_doc = doc_ids_BS[:, torch.arange(comp.shape[1], device=dev) * self.rate]  # [B,T]
            out, kl = self._core(q, kv, q_pos, pos0, state, comp, iq, iw, sel, doc_ids_BS, entry_doc)
        else:
            rows = [self._entries(None if proj is None else [t if t is None else t[i:i + 1] for t in proj], st)
                    for i, st in enumerate(state)]  # each sequence's entries (its state updated)
            if S == 1:  # decode: one batched attention over all rows
                out = self._decode_rows(q, kv, q_pos[:, 0], pos0, state, rows, iq, iw)
            else:
                out = torch.empty(B, S, H, D, dtype=q.dtype, device=dev)
                for i, (st, (comp, sel)) in enumerate(zip(state, rows, strict=True)):
                    r = slice(i, i + 1)
                    out[r] = self._core(q[r], kv[r], q_pos[i], pos0[i], st, comp, None if iq is None else iq[r],
                                        None if iw is None else iw[r], sel)[0]
            kl = None  # a ragged batch is inference (decode states): no indexer training
        return self._output(out, hcos, hsin), kl

    def _decode_rows(self, q, kv, pos_B, pos_list, states, rows, iq, iw):
        """One decode token for each row of a ragged batch, attended in one batched pass.

        ``q [B,1,H,D]``, ``kv [B,1,D]``, ``pos_B [B]`` the rows' positions (``pos_list`` as ints), ``states`` their
        ``LayerState``s, ``rows`` their ``(comp [1,T_b,D], indexer keys [1,T_b,Di])`` from
        ``_entries``. The rows' rings are stacked and their compressed entries zero-padded to
        the longest row: padding lies past every row's causal limit ``(pos+1)//M``, so the
        eligibility masks already exclude it and each row gets its unpadded result.
        Writes each row's kv into its ring. Returns ``[B,1,H,D]``.
        """
        B = q.shape[0]
        W = self.window
        ring = torch.cat([st.window for st in states])  # [B,W,D]
        slots = torch.arange(W, device=q.device).view(1, W)
        pos = pos_B.view(B, 1)
        ring_pos = pos - 1 - torch.remainder(pos - 1 - slots, W)  # window_positions per row [B,W]
        keys = torch.cat([ring, kv], dim=1)
        kpos = torch.cat([ring_pos, pos], dim=1)  # [B,W+1]
        win_mask = ((kpos <= pos) & (kpos > pos - W) & (kpos >= 0)).unsqueeze(1)  # [B,1,W+1]
        ctx = None
        if rows[0][0] is not None:
            pad = torch.nn.utils.rnn.pad_sequence
            comp = pad([c[0] for c, _ in rows], batch_first=True)  # [B,Tmax,D]
            if comp.shape[1] == 0:
                comp = q.new_zeros(B, 0, kv.shape[-1])
            if self.layer_type == CSA and not self.dense_csa:
                ikeys = pad([k[0] for _, k in rows], batch_first=True)
                if ikeys.shape[1] == 0:
                    ikeys = q.new_zeros(B, 0, self.compressor.indexer.head_dim)
                scores = self.compressor.indexer.scores(iq, iw, ikeys)  # [B,1,Tmax]
                idx, valid = self.compressor.indexer.select(scores, pos)
                ctx = ("sparse", comp, idx, valid)
            else:
                limit = (pos + 1) // self.rate  # [B,1]
                vis = (torch.arange(comp.shape[1], device=q.device).view(1, -1) < limit).unsqueeze(1)
                ctx = ("dense", comp, vis)
        out, _ = self._attend(q, keys, win_mask, ctx)
        for b, (st, p) in enumerate(zip(states, pos_list, strict=True)):
            st.window[:, p % W] = kv[b].to(st.window.dtype)
        return out

    def _entries(self, proj, state: LayerState | None, doc_ids_BS=None):
        """Compressed entries visible to this call, ``(comp [B,T,D] or None, indexer keys [B,T,Di] or None)``.

        ``proj``: ``[kv, gate, indexer kv, indexer gate]`` projections of this call's tokens
        (None without a compressor; the indexer pair None when the indexer is off). With a
        state, the new entries are appended to it and the whole history is returned.
        """
        if proj is None:
            return None, None
        cstate = state.compressor if state is not None else None
        new = self.compressor.pool(proj[0], proj[1], self.rotary, cstate, cstate.comp.n if cstate else 0, doc_ids_BS)
        if cstate is not None:
            cstate.comp.append(new)
            new = cstate.comp.data
        if proj[2] is None:
            return new, None
        istate = state.indexer if state is not None else None
        inew = self.compressor.indexer.pool(proj[2], proj[3], self.rotary, istate, istate.comp.n if istate else 0,
                                            doc_ids_BS)
        if istate is not None:
            istate.comp.append(inew)
            inew = istate.comp.data
        return new, inew

    def _output(self, out_BSHD: torch.Tensor, cos, sin) -> torch.Tensor:
        """Inverse RoPE at the query positions, then the grouped output projection -> ``[B,S,E]``."""
        B, S = out_BSHD.shape[:2]
        out = apply_rope(out_BSHD, cos, -sin)  # undo the value's RoPE at the query position
        grouped = out.reshape(B, S, self.o_groups, -1)
        w = self.o_a_proj.weight.view(self.o_groups, -1, grouped.shape[-1])  # [G, Ro, H*D/G]
        proj = torch.einsum("bsgi,goi->bsgo", grouped, w).flatten(2)
        return self.o_b_proj(proj)

    def _core(self, q, kv, q_pos, pos0: int, state, comp, iq, iw, sel, doc_ids_BS=None, entry_doc=None):
        """Attention of queries ``q [B,S,H,D]`` (positions ``q_pos [S]`` from ``pos0``) over the window
        (``state``'s ring + this call's ``kv [B,S,D]``) and the compressed entries ``comp [B,T,D]``
        (top-k picked with the indexer's ``iq``/``iw`` against its keys ``sel``); writes this call's
        kv into the ring. Returns ``(out [B,S,H,D] before the inverse RoPE, IndexerKL or None)``."""
        B, S, H, D = q.shape
        dev = q.device
        if state is not None:
            ring, ring_pos = state.window, window_positions(pos0, self.window, dev)
        else:
            ring, ring_pos = kv[:, :0], q_pos[:0]
        out = torch.empty(B, S, H, D, dtype=q.dtype, device=dev)
        kl = None
        for c0 in range(0, S, QUERY_CHUNK):
            c1 = min(S, c0 + QUERY_CHUNK)
            qp = q_pos[c0:c1]
            lo = max(0, c0 - self.window + 1)
            keys = kv[:, lo:c1]
            kpos = q_pos[lo:c1]
            if state is not None and pos0 + c0 - self.window + 1 < pos0:
                keys = torch.cat([ring, keys], dim=1)
                kpos = torch.cat([ring_pos, kpos])
            win_mask = ((kpos.view(1, -1) <= qp.view(-1, 1)) & (kpos.view(1, -1) > qp.view(-1, 1) - self.window)
                        & (kpos.view(1, -1) >= 0)).unsqueeze(0)  # [1,Q,K]
            same_doc = None
            if doc_ids_BS is not None:
                qdoc = doc_ids_BS[:, c0:c1]
                win_mask = win_mask & (doc_ids_BS[:, lo:c1].unsqueeze(1) == qdoc.unsqueeze(2))
                if entry_doc is not None:
                    same_doc = entry_doc.unsqueeze(1) == qdoc.unsqueeze(2)  # [B,Q,T]
            ctx = None
            scores = None
            picked = None
            ix = self.compressor.indexer if self.layer_type == CSA else None
            if sel is not None and not self.dense_csa and not self.indexer_kl and kernels.use_kernels(q):
                def fused(c0=c0, c1=c1, qp=qp, ix=ix):  # called right here: defaults just bind the names
                    from kernels.ops import indexer_topk  # fused scores + masking + top-k (kernels/indexer.py)

                    qdoc = doc_ids_BS[:, c0:c1] if entry_doc is not None else None
                    return indexer_topk(iq[:, c0:c1], iw[:, c0:c1], sel, qp, ix.rate, ix.topk, entry_doc, qdoc)
                res = kernels.run("indexer", fused, lambda: None)
                if res is not None:
                    idx, valid, scores = res
                    picked = (idx, valid)
            if sel is not None and picked is None:
                scores = ix.scores(iq[:, c0:c1], iw[:, c0:c1], sel)
            if comp is not None:
                if self.layer_type == CSA and not self.dense_csa:
                    idx, valid = picked if picked is not None else ix.select(scores, qp, same_doc)
                    ctx = ("sparse", comp, idx, valid)
                else:
                    limit = (qp + 1) // self.rate
                    T = min(comp.shape[1], (pos0 + c1) // self.rate)  # limit.max(), known on the host
                    vis = (torch.arange(T, device=dev).view(1, -1) < limit.view(-1, 1)).unsqueeze(0)
                    if same_doc is not None:
                        vis = vis & same_doc[..., :T]
                    ctx = ("dense", comp[:, :T], vis)
            if state is None and kernels.use_kernels(q):  # fused kernel (fwd + bwd)
                def fused(c0=c0, c1=c1, ctx=ctx):  # called right here: defaults just bind the names
                    from kernels.ops import sparse_attention

                    sparse = ctx is not None and ctx[0] == "sparse"
                    return sparse_attention(q[:, c0:c1], kv, self.sinks, self.window, c0, comp,
                                            ctx[2] if sparse else None, ctx[3] if sparse else None, self.rate,
                                            doc_ids_BS, entry_doc)
                res = kernels.run("sparse_attention", fused, lambda: None)
                if res is not None:
                    out[:, c0:c1] = res[0]
                    if self.indexer_kl and scores is not None and ctx is not None:
                        kl = self._chunk_kl(self._comp_probs(q[:, c0:c1], res[1], ctx), scores, ctx) + kl
                    continue
            o, p_comp = self._attend(q[:, c0:c1], keys, win_mask, ctx)
            out[:, c0:c1] = o
            if self.indexer_kl and scores is not None and ctx is not None:
                kl = self._chunk_kl(p_comp, scores, ctx) + kl

        if state is not None:
            n_keep = min(S, self.window)
            slots = torch.remainder(torch.arange(pos0 + S - n_keep, pos0 + S, device=dev), self.window)
            state.window[:, slots] = kv[:, S - n_keep:].to(state.window.dtype)

        return out, kl

    @torch.no_grad()
    def _comp_probs(self, q_BQHD: torch.Tensor, lse_BQH: torch.Tensor, ctx) -> torch.Tensor:
        """The joint softmax's probabilities over the compressed entries, rebuilt from its
        log-sum-exp: ``p = exp(q . c * D^-0.5 - lse)`` (what ``_attend`` returns as ``p_comp``,
        here for the fused kernel, which emits only ``lse [B,Q,H]`` float32). ``ctx`` as in
        ``_attend``. Returns ``[B,Q,H,T']`` float32 (0 where masked); detached: it is only the
        indexer KL's teacher."""
        B, Q, H, D = q_BQHD.shape
        qf = q_BQHD.float()
        if ctx[0] == "sparse":
            _, comp, idx, mask = ctx
            offs = (torch.arange(B, device=idx.device) * comp.shape[1]).view(B, 1, 1)
            values = comp.reshape(-1, D)[idx + offs].float()  # [B,Q,K,D]
            logits = torch.matmul(qf, values.transpose(-1, -2))  # [B,Q,H,K]
        else:
            _, values, mask = ctx
            logits = torch.matmul(qf, values.float().transpose(-1, -2).unsqueeze(1))  # [B,Q,H,T]
        p = torch.exp(logits * D ** -0.5 - lse_BQH.float().unsqueeze(-1))
        return p.masked_fill_(~mask.unsqueeze(2), 0.0)

    def _chunk_kl(self, p_comp_BQHT: torch.Tensor, scores_BQT: torch.Tensor, ctx) -> IndexerKL:
        """KL(teacher || indexer) over the compressed entries of one query chunk.

        Teacher: CSA's joint softmax (window + compressed + sink) restricted to the
        compressed entries, summed over heads and L1-normalised (DeepSeek-V3.2 eq. 3),
        detached. Student: softmax of the index scores over the same entries -- all
        visible ones in dense mode (indexer warm-up), the top-k in sparse mode.
        Rows that see no compressed entry (teacher mass 0) contribute exactly 0 and are
        not counted; no host synchronisation.
        """
        teacher = p_comp_BQHT.detach().float().sum(2)  # [B,Q,T']
        if ctx[0] == "sparse":
            _, _, idx, mask = ctx
            logits = torch.gather(scores_BQT, -1, idx)
        else:
            _, values, mask = ctx
            logits = scores_BQT[..., : values.shape[1]]
            mask = mask.expand(teacher.shape)
        mass = teacher.sum(-1, keepdim=True)
        rows = (mass.squeeze(-1) > 0) & mask.any(-1)
        target = teacher / mass.clamp(min=1e-30)
        logq = torch.log_softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
        # target is 0 on every entry of a row without mass, so such rows add exactly 0
        terms = torch.where(target > 0, target * (torch.log(target.clamp(min=1e-30)) - logq),
                            torch.zeros_like(target))
        return IndexerKL(terms.sum(), rows.sum())

    def _attend(self, q_BQHD, win_BKD, win_mask, ctx):
        """Joint softmax over window keys, compressed entries and the sink.

        ``win_mask`` ``[1 or B, Q, K]``; ``ctx`` is None, ``("sparse", comp [B,T,D],
        idx [B,Q,K'], valid [B,Q,K'])`` (gather the selected entries only) or
        ``("dense", comp [B,T,D], visible [1 or B,Q,T])``.
        Returns ``(out [B,Q,H,D], probs over the compressed entries [B,Q,H,T'] or None)``.
        """
        B, Q, H, D = q_BQHD.shape
        scale = D ** -0.5
        qf = q_BQHD.reshape(B, Q * H, D)
        # fresh matmul outputs: scale and mask in place (their backward needs only the inputs)
        lw = torch.bmm(qf, win_BKD.transpose(1, 2)).view(B, Q, H, -1).mul_(scale)
        lw = lw.masked_fill_(~win_mask.unsqueeze(2), float("-inf"))
        parts = [lw]
        values = None
        if ctx is not None and ctx[0] == "sparse":
            _, comp, idx, valid = ctx
            # Gather only the selected entries (row-offset indexing keeps the backward O(T*D)).
            offs = (torch.arange(B, device=idx.device) * comp.shape[1]).view(B, 1, 1)
            values = comp.reshape(-1, D)[idx + offs]  # [B,Q,K,D]
            lc = torch.matmul(q_BQHD, values.transpose(-1, -2)).mul_(scale)  # [B,Q,H,K]
            parts.append(lc.masked_fill_(~valid.unsqueeze(2), float("-inf")))
        elif ctx is not None:
            _, values, vis = ctx
            T = values.shape[1]
            lc = torch.bmm(qf, values.transpose(1, 2)).view(B, Q, H, T).mul_(scale)
            parts.append(lc.masked_fill_(~vis.unsqueeze(2), float("-inf")))
        sink = self.sinks.to(lw.dtype).view(1, 1, H, 1).expand(B, Q, H, 1)
        probs = torch.softmax(torch.cat(parts + [sink], dim=-1), dim=-1)
        kw = lw.shape[-1]
        o = torch.bmm(probs[..., :kw].reshape(B, Q * H, kw), win_BKD).view(B, Q, H, D)
        p_comp = None
        if ctx is not None:
            p_comp = probs[..., kw:-1]
            if ctx[0] == "sparse":
                o = o + torch.matmul(p_comp, values)
            else:
                o = o + torch.bmm(p_comp.reshape(B, Q * H, -1), values).view(B, Q, H, D)
        return o, p_comp
