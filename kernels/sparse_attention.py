"""Sparse attention kernel: one online-softmax pass over the sliding window and the compressed entries (issue 6).

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
        p = t - window + 1 + w0 + tl.arange(0, BLOCK_N)
        ok = (p >= 0) & (p <= t) & (w0 + tl.arange(0, BLOCK_N) < window)
        if HAS_DOC:
            do, dm = pick_offset(b, 0, 1, S, p, ok)
            ok = ok & (tl.load(DOC + do, mask=dm, other=-1) == qdoc)
        ko, km = seq_tile(b, p, S, dd, D, ok, dd < D)
        keys = tl.load(KV + ko, mask=km, other=0.0).to(tl.float32)
        m_i, l_i, acc = _update(q, keys, ok, m_i, l_i, acc, scale)
    if MODE == 1:
        for k0 in range(0, K, BLOCK_N):
            j = k0 + tl.arange(0, BLOCK_N)
            io, im = pick_offset(b, i, Q, K, j, j < K)
            e = tl.load(IDX + io, mask=im, other=0)
            ok = (tl.load(VALID + io, mask=im, other=0) != 0) & (e >= 0) & (e < T)
            ko, km = seq_tile(b, e, T, dd, D, ok, dd < D)
            keys = tl.load(COMP + ko, mask=km, other=0.0).to(tl.float32)
            m_i, l_i, acc = _update(q, keys, ok, m_i, l_i, acc, scale)
    if MODE == 2:
        limit = tl.minimum((t + 1) // rate, T)
        for e0 in range(0, T, BLOCK_N):
            e = e0 + tl.arange(0, BLOCK_N)
            ok = e < limit
            if HAS_DOC:
                do, dm = pick_offset(b, 0, 1, T, e, ok)
                ok = ok & (tl.load(EDOC + do, mask=dm, other=-1) == qdoc)
            ko, km = seq_tile(b, e, T, dd, D, ok, dd < D)
            keys = tl.load(COMP + ko, mask=km, other=0.0).to(tl.float32)
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
