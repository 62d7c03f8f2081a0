"""Lightning Indexer kernel: index scores fused with causal (and document) masking and top-k.

Reference: ``model.attention.Indexer.scores`` + ``Indexer.select`` (report eqs. 13-17). For
query row t of batch row b (one program each):

1. ``score[s] = head_dim^-0.5 * sum_h w[t,h] ReLU(q[t,h] . K[s])`` for every compressed entry
   s, in blocks of ``BLOCK_S`` entries (one ``tl.dot`` of the query heads against the block's
   keys), written to ``scores [B, Q, T]`` float32; eligible entries: ``s < (pos_t + 1) // M``
   (causal) and, with packed documents, ``entry_doc[s] == query_doc[t]``;
2. the k-th largest eligible score is found exactly by a binary search over the scores'
   order-preserving int32 keys (32 counting passes over the row; no sort);
3. the selection -- every eligible entry above it, then the entries equal to it in index
   order until k are taken (``Indexer.select``'s deterministic tie rule) -- is written in
   ascending index order to ``idx [B, Q, K]`` int32 with ``valid [B, Q, K]``; slots past the
   eligible count are ``(0, False)``. ``K = min(index_topk, T)``.

``-0.0`` scores are canonicalised to ``+0.0`` (they compare equal as floats; their keys must
too). Index arithmetic: ``row_tile``, ``key_tile`` (``kernels/verify/indexer.py``).
Letters: B batch, Q query rows, T compressed entries, H indexer heads, Di indexer head dim.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def row_tile(b, t, Q, n, j, j_ok):
    """Offsets ``(b, t, j)`` of a ``[B, Q, n]`` tensor (int64) and the mask ``j_ok``."""
    return (b.to(tl.int64) * Q + t) * n + j, j_ok


@triton.jit
def key_tile(b, s, T, dd, Di, s_ok, dd_ok):
    """Offsets ``(b, s, dd)`` of an ``[BLOCK_S, Di_P]`` tile of ``keys [B, T, Di]`` (int64) and its mask."""
    return (b.to(tl.int64) * T + s[:, None]) * Di + dd[None, :], s_ok[:, None] & dd_ok[None, :]


@triton.jit
def head_tile(b, t, Q, h, H, dd, Di, h_ok, dd_ok):
    """Offsets ``(b, t, h, dd)`` of an ``[H_P, Di_P]`` tile of ``q [B, Q, H, Di]`` and its mask."""
    return ((b.to(tl.int64) * Q + t) * H + h[:, None]) * Di + dd[None, :], h_ok[:, None] & dd_ok[None, :]


@triton.jit
def _keys(SCORES, EDOC, b, t, Q, T, s, limit, qdoc, HAS_DOC: tl.constexpr):
    """(order-preserving int32 keys, eligibility) of entries ``s``."""
    off, m = row_tile(b, t, Q, T, s, s < T)
    sc = tl.load(SCORES + off, mask=m, other=0.0)
    ok = (s < limit) & (s < T)
    if HAS_DOC:
        eo, em = row_tile(b, 0, 1, T, s, s < T)  # entry_doc [B, T]
        ok = ok & (tl.load(EDOC + eo, mask=em, other=-1) == qdoc)
    bits = sc.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return key, ok


@triton.jit
def indexer_topk_kernel(QH, W, KEYS, POS, EDOC, QDOC, SCORES, IDX, VALID, Q, T, K, scale, rate,
                        H: tl.constexpr, H_P: tl.constexpr, Di: tl.constexpr, Di_P: tl.constexpr,
                        HAS_DOC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.arange(0, H_P)
    dd = tl.arange(0, Di_P)
    qo, qm = head_tile(b, t, Q, h, H, dd, Di, h < H, dd < Di)
    q = tl.load(QH + qo, mask=qm, other=0.0)
    wo, wm = row_tile(b, t, Q, H, h, h < H)
    w = tl.load(W + wo, mask=wm, other=0.0) * scale
    limit = (tl.load(POS + t) + 1) // rate
    qdoc = 0
    if HAS_DOC:
        qdoc = tl.load(QDOC + row_tile(b, 0, 1, Q, t, True)[0])  # query_doc [B, Q]
    # 1. scores of every entry; count the eligible ones
    n_ok = tl.full((), 0, tl.int32)
    for s0 in range(0, T, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        ko, km = key_tile(b, s, T, dd, Di, s < T, dd < Di)
        keys = tl.load(KEYS + ko, mask=km, other=0.0)
        logits = tl.maximum(tl.dot(q, tl.trans(keys), input_precision="ieee"), 0.0)  # [H_P, BLOCK_S]
        sc = tl.sum(w[:, None] * logits, axis=0) + 0.0  # + 0.0: -0.0 -> +0.0
        so, sm = row_tile(b, t, Q, T, s, s < T)
        tl.store(SCORES + so, sc, mask=sm)
    tl.debug_barrier()
    for s0 in range(0, T, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        _, ok = _keys(SCORES, EDOC, b, t, Q, T, s, limit, qdoc, HAS_DOC)
        n_ok += tl.sum(ok.to(tl.int32), axis=0)
    k = tl.minimum(n_ok, K)
    # 2. the k-th largest key: the largest tau with #(key >= tau) >= k (binary search in int64)
    lo = tl.full((), -2147483648, tl.int64)
    hi = tl.full((), 2147483647, tl.int64)
    for _ in range(32):
        mid = (lo + hi + 1) // 2
        cnt = tl.full((), 0, tl.int32)
        for s0 in range(0, T, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            key, ok = _keys(SCORES, EDOC, b, t, Q, T, s, limit, qdoc, HAS_DOC)
            cnt += tl.sum((ok & (key.to(tl.int64) >= mid)).to(tl.int32), axis=0)
        big = cnt >= k
        lo = tl.where(big, mid, lo)
        hi = tl.where(big, hi, mid - 1)
    tau = lo
    above = tl.full((), 0, tl.int32)
    for s0 in range(0, T, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        key, ok = _keys(SCORES, EDOC, b, t, Q, T, s, limit, qdoc, HAS_DOC)
        above += tl.sum((ok & (key.to(tl.int64) > tau)).to(tl.int32), axis=0)
    room = k - above
    # 3. write the selection in index order
    taken = tl.full((), 0, tl.int32)
    ties = tl.full((), 0, tl.int32)
    for s0 in range(0, T, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        key, ok = _keys(SCORES, EDOC, b, t, Q, T, s, limit, qdoc, HAS_DOC)
        k64 = key.to(tl.int64)
        tie = ok & (k64 == tau)
        tie_rank = ties + tl.cumsum(tie.to(tl.int32), axis=0) - tie.to(tl.int32)
        sel = tl.where(k > 0, ok & ((k64 > tau) | (tie & (tie_rank < room))), False)
        pos = taken + tl.cumsum(sel.to(tl.int32), axis=0) - sel.to(tl.int32)
        oo, om = row_tile(b, t, Q, K, pos, sel)
        tl.store(IDX + oo, s, mask=om)
        tl.store(VALID + oo, 1, mask=om)
        taken += tl.sum(sel.to(tl.int32), axis=0)
        ties += tl.sum(tie.to(tl.int32), axis=0)
    for k0 in range(0, K, BLOCK_K):  # the slots past the eligible count
        kk = k0 + tl.arange(0, BLOCK_K)
        oo, om = row_tile(b, t, Q, K, kk, (kk < K) & (kk >= taken))
        tl.store(IDX + oo, 0, mask=om)
        tl.store(VALID + oo, 0, mask=om)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def indexer_topk(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, q_pos: torch.Tensor, rate: int, topk: int,
                 entry_doc: torch.Tensor | None = None, query_doc: torch.Tensor | None = None):
    """``(idx [B,Q,K] int64, valid [B,Q,K] bool, scores [B,Q,T] float32)``.

    ``q [B,Q,H,Di]`` float32 (RoPE'd indexer queries), ``w [B,Q,H]`` float32 (head weights,
    without the ``Di^-0.5`` factor the kernel applies), ``keys [B,T,Di]``, ``q_pos [Q]`` query
    positions, ``entry_doc [B,T]`` / ``query_doc [B,Q]`` (packed documents) or None.
    """
    B, Q, H, Di = q.shape
    T = keys.shape[1]
    K = min(topk, T)
    dev = q.device
    scores = torch.empty(B, Q, T, dtype=torch.float32, device=dev)
    idx = torch.empty(B, Q, K, dtype=torch.int32, device=dev)
    valid = torch.empty(B, Q, K, dtype=torch.int8, device=dev)
    if T == 0 or Q == 0:
        return idx.long(), valid.bool(), scores
    has_doc = entry_doc is not None
    edoc = entry_doc.to(torch.int32).contiguous() if has_doc else idx
    qdoc = query_doc.to(torch.int32).contiguous() if has_doc else idx
    indexer_topk_kernel[(Q, B)](q.float().contiguous(), w.float().contiguous(), keys.float().contiguous(),
                                q_pos.to(torch.int32).contiguous(), edoc, qdoc, scores, idx, valid, Q, T, K,
                                Di ** -0.5, rate, H=H, H_P=max(16, _pow2(H)), Di=Di, Di_P=max(16, _pow2(Di)),
                                HAS_DOC=has_doc, BLOCK_S=min(128, max(16, _pow2(T))), BLOCK_K=min(128, _pow2(K)))
    return idx.long(), valid.bool(), scores
