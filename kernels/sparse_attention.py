"""Sparse attention kernel: one online-softmax pass over the sliding window and the compressed entries.

Reference: ``model.attention.Attention._attend`` on a stateless (full-sequence) forward
(report section 2.3, eqs. 18-19 and 23). For query t of batch row b (one program; all
heads together, as V4's attention is shared-KV multi-query: one kv vector is both key and
value):

- window: the keys ``kv[b, p]`` for ``t - W < p <= t`` (and the same packed document);
- compressed entries: CSA -- the indexer's picks ``idx[b, t, :]`` where ``valid``; HCA --
  every entry ``e < (t + 1) // M`` (of the same document); gathered, never all read;
- one softmax over all of them plus a per-head sink logit in the denominator only,
  computed online (running max and sum per head, flash-attention style) in blocks of
  ``BLOCK_N`` keys; the values are the keys.

Writes ``out [B, S, H, D]`` (before the inverse RoPE) and ``lse [B, S, H]`` (the log of the
softmax denominator, sink included; for the backward). Forward only for now: the model
uses it when no gradient is needed (prefill, evaluation); training keeps the reference.
Index arithmetic: ``seq_tile``, ``pick_offset`` (``kernels/verify/sparse_attention.py``).
Letters: B batch, S sequence, H heads, D head dim, W window, T compressed entries, K picks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def seq_tile(b, p, S, dd, D, p_ok, dd_ok):
    """Offsets ``(b, p, dd)`` of a ``[BLOCK_N, D_P]`` tile of a ``[B, S, D]`` tensor (int64) and its mask."""
    return (b.to(tl.int64) * S + p[:, None]) * D + dd[None, :], p_ok[:, None] & dd_ok[None, :]


@triton.jit
def head_rows(b, t, S, h, H, dd, D, h_ok, dd_ok):
    """Offsets ``(b, t, h, dd)`` of an ``[H_P, D_P]`` tile of a ``[B, S, H, D]`` tensor and its mask."""
    return ((b.to(tl.int64) * S + t) * H + h[:, None]) * D + dd[None, :], h_ok[:, None] & dd_ok[None, :]


@triton.jit
def pick_offset(b, t, S, K, j, j_ok):
    """Offsets ``(b, t, j)`` of a ``[B, S, K]`` tensor (int64) and the mask ``j_ok``."""
    return (b.to(tl.int64) * S + t) * K + j, j_ok


@triton.jit
def _update(q, keys, ok, m_i, l_i, acc, scale):
    """Fold a block of keys (= values) ``[BLOCK_N, D_P]`` with mask ``ok [BLOCK_N]`` into the online softmax."""
    s = tl.dot(q, tl.trans(keys), input_precision="ieee") * scale  # [H_P, BLOCK_N]
    s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p, keys, input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def _window_block(KV, DOC, b, t, S, w0, window, qdoc, dd, D: tl.constexpr, HAS_DOC: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """Window keys ``t - window + 1 + w0 ..`` (one block): ``(keys [BLOCK_N, D_P] float32, ok [BLOCK_N])``."""
    p = t - window + 1 + w0 + tl.arange(0, BLOCK_N)
    ok = (p >= 0) & (p <= t) & (w0 + tl.arange(0, BLOCK_N) < window)
    if HAS_DOC:
        do, dm = pick_offset(b, 0, 1, S, p, ok)
        ok = ok & (tl.load(DOC + do, mask=dm, other=-1) == qdoc)
    ko, km = seq_tile(b, p, S, dd, D, ok, dd < D)
    return tl.load(KV + ko, mask=km, other=0.0).to(tl.float32), ok


@triton.jit
def _picked_block(COMP, IDX, VALID, b, i, Q, T, K, k0, dd, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Compressed entries picked by query row i (one block of its K picks): ``(keys, ok)``."""
    j = k0 + tl.arange(0, BLOCK_N)
    io, im = pick_offset(b, i, Q, K, j, j < K)
    e = tl.load(IDX + io, mask=im, other=0)
    ok = (tl.load(VALID + io, mask=im, other=0) != 0) & (e >= 0) & (e < T)
    ko, km = seq_tile(b, e, T, dd, D, ok, dd < D)
    return tl.load(COMP + ko, mask=km, other=0.0).to(tl.float32), ok


@triton.jit
def _visible_block(COMP, EDOC, b, T, e0, limit, qdoc, dd, D: tl.constexpr, HAS_DOC: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """Compressed entries ``e0 ..`` visible to a query (``e < limit``, same document): ``(keys, ok)``."""
    e = e0 + tl.arange(0, BLOCK_N)
    ok = e < limit
    if HAS_DOC:
        do, dm = pick_offset(b, 0, 1, T, e, ok)
        ok = ok & (tl.load(EDOC + do, mask=dm, other=-1) == qdoc)
    ko, km = seq_tile(b, e, T, dd, D, ok, dd < D)
    return tl.load(COMP + ko, mask=km, other=0.0).to(tl.float32), ok


@triton.jit
def sparse_attn_fwd_kernel(Qp, KV, COMP, IDX, VALID, SINK, DOC, EDOC, OUT, LSE, Q, S, T, K, q_start, scale, window,
                           rate, H: tl.constexpr, H_P: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
                           MODE: tl.constexpr, HAS_DOC: tl.constexpr, BLOCK_N: tl.constexpr, W_P: tl.constexpr):
    """MODE 0: window only (SWA), 1: window + picked entries (CSA), 2: window + all visible entries (HCA).
    Query row i of the chunk (``q``, ``idx``, ``out``, ``lse``: extent Q) sits at position ``t = q_start + i``
    of the sequence (``kv``, ``doc_ids``: extent S)."""
    i = tl.program_id(0)
    t = q_start + i
    b = tl.program_id(1)
    h = tl.arange(0, H_P)
    dd = tl.arange(0, D_P)
    qo, qm = head_rows(b, i, Q, h, H, dd, D, h < H, dd < D)
    q = tl.load(Qp + qo, mask=qm, other=0.0).to(tl.float32)
    qdoc = 0
    if HAS_DOC:
        qdoc = tl.load(DOC + pick_offset(b, 0, 1, S, t, True)[0])
    m_i = tl.full((H_P,), float("-inf"), tl.float32)
    l_i = tl.zeros((H_P,), tl.float32)
    acc = tl.zeros((H_P, D_P), tl.float32)
    for w0 in range(0, W_P, BLOCK_N):  # window keys t - window + 1 .. t
        keys, ok = _window_block(KV, DOC, b, t, S, w0, window, qdoc, dd, D, HAS_DOC, BLOCK_N)
        m_i, l_i, acc = _update(q, keys, ok, m_i, l_i, acc, scale)
    if MODE == 1:
        for k0 in range(0, K, BLOCK_N):
            keys, ok = _picked_block(COMP, IDX, VALID, b, i, Q, T, K, k0, dd, D, BLOCK_N)
            m_i, l_i, acc = _update(q, keys, ok, m_i, l_i, acc, scale)
    if MODE == 2:
        limit = tl.minimum((t + 1) // rate, T)
        for e0 in range(0, T, BLOCK_N):
            keys, ok = _visible_block(COMP, EDOC, b, T, e0, limit, qdoc, dd, D, HAS_DOC, BLOCK_N)
            m_i, l_i, acc = _update(q, keys, ok, m_i, l_i, acc, scale)
    sink = tl.load(SINK + h, mask=h < H, other=0.0)
    m_new = tl.maximum(m_i, sink)
    alpha = tl.exp(m_i - m_new)
    l_i = l_i * alpha + tl.exp(sink - m_new)
    acc = acc * alpha[:, None]
    oo, om = head_rows(b, i, Q, h, H, dd, D, h < H, dd < D)
    tl.store(OUT + oo, (acc / l_i[:, None]).to(OUT.dtype.element_ty), mask=om)
    lo, lm = pick_offset(b, i, Q, H, h, h < H)
    tl.store(LSE + lo, m_new + tl.log(l_i), mask=lm)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def sparse_attention(q: torch.Tensor, kv: torch.Tensor, sinks: torch.Tensor, window: int, *, q_start: int = 0,
                     comp: torch.Tensor | None = None, idx: torch.Tensor | None = None,
                     valid: torch.Tensor | None = None, rate: int = 1, doc_ids: torch.Tensor | None = None,
                     entry_doc: torch.Tensor | None = None):
    """``(out [B,Q,H,D], lse [B,Q,H] float32)`` for queries ``q [B,Q,H,D]`` at positions
    ``q_start + i`` of the sequence whose kv is ``kv [B,S,D]``.

    Compressed entries: none (``comp`` None: SWA), the picks ``idx``/``valid [B,Q,K]`` (CSA),
    or every visible entry (``comp`` without ``idx``: HCA, ``rate`` = M). ``doc_ids [B,S]`` /
    ``entry_doc [B,T]``: packed documents. Raises ValueError on inconsistent shapes.
    """
    B, Q, H, D = q.shape
    S = kv.shape[1]
    if kv.shape != (B, S, D) or q_start + Q > S:
        raise ValueError(f"kv {tuple(kv.shape)} must be [B, S, D] covering the queries {q_start}..{q_start + Q}")
    mode = 0 if comp is None else (1 if idx is not None else 2)
    T = comp.shape[1] if comp is not None else 0
    K = idx.shape[-1] if idx is not None else 0
    out = torch.empty_like(q)
    lse = torch.empty(B, Q, H, dtype=torch.float32, device=q.device)
    dummy = lse
    sparse_attn_fwd_kernel[(Q, B)](q.contiguous(), kv.contiguous(), comp.contiguous() if comp is not None else dummy,
                                   idx.to(torch.int32).contiguous() if idx is not None else dummy,
                                   valid.to(torch.int8).contiguous() if idx is not None else dummy,
                                   sinks.float().contiguous(),
                                   doc_ids.to(torch.int32).contiguous() if doc_ids is not None else dummy,
                                   entry_doc.to(torch.int32).contiguous() if entry_doc is not None else dummy,
                                   out, lse, Q, S, T, K, q_start, D ** -0.5, window, rate,
                                   H=H, H_P=max(16, _pow2(H)), D=D, D_P=max(16, _pow2(D)), MODE=mode,
                                   HAS_DOC=doc_ids is not None, BLOCK_N=min(64, max(16, _pow2(window))),
                                   W_P=_pow2(window))
    return out, lse


# ---------------------------------------------------------------------------- backward
# Deterministic: every gradient element is written by one program, no atomics.
#  A (query-major): dq, and each (query, head)'s sink term;
#  B (key-major, window): dkv of each sequence position from the <= W queries that see it;
#  C (entry-major, compressed): dcomp of each entry from the queries that picked it (CSA: an
#    inverted index sorted by (entry, query), built with torch) or see it (HCA).
# With s = scale * q.k, p = exp(s - lse), dp = dout.k (the value is the key), delta = sum(dout * out):
#  ds = p (dp - delta),  dq = scale * sum_k ds k,  dk = sum_q (scale * ds q + p dout),  dsink = -sum p_sink delta.

@triton.jit
def _grad_terms(q, do, lse, delta, keys, ok, scale):
    """``(p, ds)`` ``[H_P, BLOCK_N]`` of one query's heads against a block of keys."""
    s = tl.dot(q, tl.trans(keys), input_precision="ieee") * scale
    p = tl.where(ok[None, :], tl.exp(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(keys), input_precision="ieee")
    return p, p * (dp - delta[:, None])


@triton.jit
def sparse_attn_bwd_dq_kernel(Qp, KV, COMP, IDX, VALID, SINK, DOC, EDOC, OUT, DOUT, LSE, DQ, DSINK, DELTA, Q, S, T, K,
                              q_start, scale, window, rate, H: tl.constexpr, H_P: tl.constexpr, D: tl.constexpr,
                              D_P: tl.constexpr, MODE: tl.constexpr, HAS_DOC: tl.constexpr, BLOCK_N: tl.constexpr,
                              W_P: tl.constexpr):
    i = tl.program_id(0)
    t = q_start + i
    b = tl.program_id(1)
    h = tl.arange(0, H_P)
    dd = tl.arange(0, D_P)
    qo, qm = head_rows(b, i, Q, h, H, dd, D, h < H, dd < D)
    q = tl.load(Qp + qo, mask=qm, other=0.0).to(tl.float32)
    do = tl.load(DOUT + qo, mask=qm, other=0.0).to(tl.float32)
    o = tl.load(OUT + qo, mask=qm, other=0.0).to(tl.float32)
    lo, lm = pick_offset(b, i, Q, H, h, h < H)
    lse = tl.load(LSE + lo, mask=lm, other=0.0)
    delta = tl.sum(do * o, axis=1)
    qdoc = 0
    if HAS_DOC:
        qdoc = tl.load(DOC + pick_offset(b, 0, 1, S, t, True)[0])
    dq = tl.zeros((H_P, D_P), tl.float32)
    for w0 in range(0, W_P, BLOCK_N):
        keys, ok = _window_block(KV, DOC, b, t, S, w0, window, qdoc, dd, D, HAS_DOC, BLOCK_N)
        dq += tl.dot(_grad_terms(q, do, lse, delta, keys, ok, scale)[1], keys, input_precision="ieee")
    if MODE == 1:
        for k0 in range(0, K, BLOCK_N):
            keys, ok = _picked_block(COMP, IDX, VALID, b, i, Q, T, K, k0, dd, D, BLOCK_N)
            dq += tl.dot(_grad_terms(q, do, lse, delta, keys, ok, scale)[1], keys, input_precision="ieee")
    if MODE == 2:
        limit = tl.minimum((t + 1) // rate, T)
        for e0 in range(0, T, BLOCK_N):
            keys, ok = _visible_block(COMP, EDOC, b, T, e0, limit, qdoc, dd, D, HAS_DOC, BLOCK_N)
            dq += tl.dot(_grad_terms(q, do, lse, delta, keys, ok, scale)[1], keys, input_precision="ieee")
    tl.store(DQ + qo, (dq * scale).to(DQ.dtype.element_ty), mask=qm)
    sink = tl.load(SINK + h, mask=h < H, other=0.0)
    tl.store(DSINK + lo, -tl.exp(sink - lse) * delta, mask=lm)
    tl.store(DELTA + lo, delta, mask=lm)




@triton.jit
def rows_tile(b, qi, Q, h, H, dd, D, qok):
    """Offsets of rows ``(b, qi, h)`` (one per lane) x ``dd`` of a ``[B, Q, H, D]`` tensor, their mask, and
    the ``(b, qi, h)`` offsets of a ``[B, Q, H]`` tensor with its mask."""
    row = (b.to(tl.int64) * Q + qi) * H + h
    ok = qok & (h < H)
    return row[:, None] * D + dd[None, :], ok[:, None] & (dd < D)[None, :], row, ok


@triton.jit
def _rows_grad(Qp, DOUT, LSE, DELTA, b, i, i_ok, Q, k, dd, scale, H: tl.constexpr, H_P: tl.constexpr,
               D: tl.constexpr, BLOCK_M: tl.constexpr):
    """``sum over rows (scale * ds q + p dout)`` ``[D_P]``: the gradient reaching key ``k`` from the query
    rows ``i [BLOCK_M]`` (all heads; rows with ``i_ok`` False contribute nothing)."""
    r = tl.arange(0, BLOCK_M * H_P)  # row r: query m = r // H_P, head r % H_P
    pick = tl.arange(0, BLOCK_M)[None, :] == (r // H_P)[:, None]
    qi = tl.sum(tl.where(pick, i[None, :], 0), axis=1)
    qok = tl.sum(tl.where(pick, i_ok[None, :].to(tl.int32), 0), axis=1) != 0
    off, m2, row, m1 = rows_tile(b, qi, Q, r % H_P, H, dd, D, qok)
    q = tl.load(Qp + off, mask=m2, other=0.0).to(tl.float32)
    do = tl.load(DOUT + off, mask=m2, other=0.0).to(tl.float32)
    lse = tl.load(LSE + row, mask=m1, other=0.0)
    delta = tl.load(DELTA + row, mask=m1, other=0.0)
    s = tl.sum(q * k[None, :], axis=1) * scale
    p = tl.where(m1, tl.exp(s - lse), 0.0)
    dp = tl.sum(do * k[None, :], axis=1)
    ds = p * (dp - delta)
    return tl.sum(ds[:, None] * q * scale + p[:, None] * do, axis=0)


@triton.jit
def sparse_attn_bwd_dkv_kernel(Qp, KV, DOC, DOUT, LSE, DELTA, DKV, Q, S, q_start, scale, window,
                               H: tl.constexpr, H_P: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
                               HAS_DOC: tl.constexpr, BLOCK_M: tl.constexpr, W_P: tl.constexpr):
    """dkv of sequence position p from the queries t in [p, p + window) of the chunk (window keys)."""
    p = tl.program_id(0)
    b = tl.program_id(1)
    dd = tl.arange(0, D_P)
    ko, km = seq_tile(b, tl.full((1,), 0, tl.int32) + p, S, dd, D, tl.full((1,), 1, tl.int1), dd < D)
    k = tl.sum(tl.load(KV + ko, mask=km, other=0.0).to(tl.float32), axis=0)
    kdoc = 0
    if HAS_DOC:
        kdoc = tl.load(DOC + pick_offset(b, 0, 1, S, p, True)[0])
    acc = tl.zeros((D_P,), tl.float32)
    for m0 in range(0, W_P, BLOCK_M):
        t = p + m0 + tl.arange(0, BLOCK_M)
        i = t - q_start
        ok = (m0 + tl.arange(0, BLOCK_M) < window) & (i >= 0) & (i < Q)
        if HAS_DOC:
            do_, dm = pick_offset(b, 0, 1, S, t, ok)
            ok = ok & (tl.load(DOC + do_, mask=dm, other=-1) == kdoc)
        acc += _rows_grad(Qp, DOUT, LSE, DELTA, b, i, ok, Q, k, dd, scale, H, H_P, D, BLOCK_M)
    go, gm = seq_tile(b, tl.full((1,), 0, tl.int32) + p, S, dd, D, tl.full((1,), 1, tl.int1), dd < D)
    tl.store(DKV + go, acc[None, :], mask=gm)


@triton.jit
def sparse_attn_bwd_dcomp_kernel(Qp, COMP, EDOC, DOC, DOUT, LSE, DELTA, STARTS, ROWS, DCOMP, Q, S, T, q_start, scale,
                                 rate, n_rows, H: tl.constexpr, H_P: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
                                 MODE: tl.constexpr, HAS_DOC: tl.constexpr, BLOCK_M: tl.constexpr):
    """dcomp of entry e: MODE 1 from the query rows that picked it (``ROWS[STARTS[b*T+e] : STARTS[b*T+e+1]]``,
    sorted), MODE 2 from every query that sees it (t >= (e + 1) * rate - 1, same document)."""
    e = tl.program_id(0)
    b = tl.program_id(1)
    dd = tl.arange(0, D_P)
    one = tl.full((1,), 1, tl.int1)
    ko, km = seq_tile(b, tl.full((1,), 0, tl.int32) + e, T, dd, D, one, dd < D)
    k = tl.sum(tl.load(COMP + ko, mask=km, other=0.0).to(tl.float32), axis=0)
    acc = tl.zeros((D_P,), tl.float32)
    if MODE == 1:
        so, _ = pick_offset(b, 0, 1, T, e, True)
        lo = tl.load(STARTS + so)
        hi = tl.load(STARTS + so + 1)
        for r0 in range(lo, hi, BLOCK_M):
            r = r0 + tl.arange(0, BLOCK_M)
            ok = (r < hi) & (r < n_rows)
            i = tl.load(ROWS + r, mask=ok, other=0)
            ok = ok & (i >= 0) & (i < Q)  # the inverted index is data: never trust it for addresses
            acc += _rows_grad(Qp, DOUT, LSE, DELTA, b, i, ok, Q, k, dd, scale, H, H_P, D, BLOCK_M)
    if MODE == 2:
        edoc = 0
        if HAS_DOC:
            edoc = tl.load(EDOC + pick_offset(b, 0, 1, T, e, True)[0])
        first = tl.maximum((e + 1) * rate - 1 - q_start, 0)
        for m0 in range(first, Q, BLOCK_M):
            i = m0 + tl.arange(0, BLOCK_M)
            ok = i < Q
            if HAS_DOC:
                do_, dm = pick_offset(b, 0, 1, S, q_start + i, ok)
                ok = ok & (tl.load(DOC + do_, mask=dm, other=-1) == edoc)
            acc += _rows_grad(Qp, DOUT, LSE, DELTA, b, i, ok, Q, k, dd, scale, H, H_P, D, BLOCK_M)
    tl.store(DCOMP + ko, acc[None, :], mask=km)


def sparse_attention_backward(q, kv, sinks, window: int, q_start: int, comp, idx, valid, rate: int, doc_ids,
                              entry_doc, out, lse, dout):
    """``(dq, dkv, dcomp or None, dsinks)`` of ``sparse_attention`` (deterministic: no atomics)."""
    B, Q, H, D = q.shape
    S = kv.shape[1]
    mode = 0 if comp is None else (1 if idx is not None else 2)
    T = comp.shape[1] if comp is not None else 0
    K = idx.shape[-1] if idx is not None else 0
    dev = q.device
    f32 = dict(dtype=torch.float32, device=dev)
    dq = torch.empty_like(q)
    dsink = torch.empty(B, Q, H, **f32)
    delta = torch.empty(B, Q, H, **f32)
    dummy = delta
    cfg = dict(H=H, H_P=max(16, _pow2(H)), D=D, D_P=max(16, _pow2(D)))
    qc, doc_c = q.contiguous(), dout.contiguous()
    docs = doc_ids.to(torch.int32).contiguous() if doc_ids is not None else dummy
    edocs = entry_doc.to(torch.int32).contiguous() if entry_doc is not None else dummy
    idx32 = idx.to(torch.int32).contiguous() if idx is not None else dummy
    val8 = valid.to(torch.int8).contiguous() if idx is not None else dummy
    compc = comp.contiguous() if comp is not None else dummy
    sparse_attn_bwd_dq_kernel[(Q, B)](qc, kv.contiguous(), compc, idx32, val8, sinks.float().contiguous(), docs,
                                      edocs, out.contiguous(), doc_c, lse.contiguous(), dq, dsink, delta, Q, S, T, K,
                                      q_start, D ** -0.5, window, rate, MODE=mode, HAS_DOC=doc_ids is not None,
                                      BLOCK_N=min(64, max(16, _pow2(window))), W_P=_pow2(window), **cfg)
    BLOCK_M = 16
    dkv = torch.empty(B, S, D, **f32)
    sparse_attn_bwd_dkv_kernel[(S, B)](qc, kv.contiguous(), docs, doc_c, lse.contiguous(), delta, dkv, Q, S, q_start,
                                       D ** -0.5, window, HAS_DOC=doc_ids is not None, BLOCK_M=BLOCK_M,
                                       W_P=_pow2(window), **cfg)
    dcomp = None
    if comp is not None:
        dcomp = torch.empty(B, T, D, **f32)
        starts = rows = dummy
        if mode == 1:  # inverted index: for each (b, entry), the chunk rows that picked it, in row order
            b_i, i_i, j_i = valid.nonzero(as_tuple=True)
            key = b_i * T + idx[b_i, i_i, j_i]
            order = torch.argsort(key * Q + i_i, stable=True)
            rows = i_i[order].to(torch.int32).contiguous()
            counts = torch.bincount(key, minlength=B * T)
            starts = torch.zeros(B * T + 1, dtype=torch.int32, device=dev)
            starts[1:] = counts.cumsum(0)
        sparse_attn_bwd_dcomp_kernel[(T, B)](qc, compc, edocs, docs, doc_c, lse.contiguous(), delta, starts, rows,
                                             dcomp, Q, S, T, q_start, D ** -0.5, rate, rows.numel(), MODE=mode,
                                             HAS_DOC=doc_ids is not None, BLOCK_M=BLOCK_M, **cfg)
    return dq, dkv.to(kv.dtype), None if dcomp is None else dcomp.to(comp.dtype), dsink.sum((0, 1))
