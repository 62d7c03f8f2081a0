"""Compressor kernels: gated per-channel softmax pooling of token blocks, forward and backward.

Reference: ``model.attention.Compressor.pool`` without a decode state (report eqs. 9-12 and
20-23). Of ``kv, gate [B, L, C]`` the ``n = L // M`` complete blocks of ``M`` tokens are
pooled; the gate gets the per-slot ``position_bias [M, C]``:

- HCA (``overlap=False``, ``C = D``): ``pooled[b, i, c] = sum_s softmax_s(gate[b, iM+s, c]) kv[b, iM+s, c]``;
- CSA (``overlap=True``, ``C = 2D``): entry i pools 2M slots per channel c < D -- block i-1's
  channel c (the "next" series) and block i's channel D + c (the "current" series) -- in
  one softmax. Entry 0 (and an entry whose ``prev_ok`` is False: its previous block
  starts in another packed document) pools its own block only.

Forward: one program per (entry, channel block, batch row); it writes ``pooled [B, n, D]``
(float32). Backward: one program per (block, channel block, batch row) writes that block's ``dkv`` / ``dgate``:
channels ``[D:]`` from its own entry and ``[:D]`` from the next entry (recomputing both
softmaxes from the inputs), zeros where no entry reads it (the last block's ``[:D]``, the
tail rows past ``n M``) -- so every gradient element is written exactly once.
``d position_bias`` is a torch reduction of ``dgate``.

Index arithmetic lives in ``block_tile`` (``kernels/verify/compressor.py`` proves it).
Letters: B batch, L tokens, n entries, M compress rate (slots per block), C channels, D head dim.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def block_tile(b, blk, s, ch, L, C, M: tl.constexpr, ch_ok):
    """Offsets ``(b, blk*M + s, ch)`` of an ``[M_P, BLOCK_C]`` slot x channel tile of a ``[B, L, C]``
    tensor (int64), and its mask: slot inside the block and the tensor, channel valid."""
    row = blk * M + s
    off = (b.to(tl.int64) * L + row[:, None]) * C + ch[None, :]
    return off, (s[:, None] < M) & (row[:, None] < L) & ch_ok[None, :]


@triton.jit
def bias_tile(s, ch, C, M: tl.constexpr, ch_ok):
    """Offsets ``(s, ch)`` of an ``[M_P, BLOCK_C]`` tile of ``position_bias [M, C]`` and its mask."""
    return s[:, None] * C + ch[None, :], (s[:, None] < M) & ch_ok[None, :]


@triton.jit
def entry_offset(b, i, n, D, c):
    """Offset of ``(b, i, c)`` in a ``[B, n, D]`` tensor (int64)."""
    return (b.to(tl.int64) * n + i) * D + c


@triton.jit
def _load_half(KV, GATE, BIAS, b, blk, s, ch, L, C, bias_ch, live, M: tl.constexpr, ch_ok):
    """kv, gate + bias (float32) of block ``blk``'s channels ``ch``; gate ``-inf`` where not ``live``."""
    off, m = block_tile(b, blk, s, ch, L, C, M, ch_ok)
    m = tl.where(live, m, False)  # (m & live with a scalar live trips Triton's CPU interpreter)
    kv = tl.load(KV + off, mask=m, other=0.0).to(tl.float32)
    g = tl.load(GATE + off, mask=m, other=0.0).to(tl.float32)
    b_off, b_m = bias_tile(s, bias_ch, C, M, ch_ok)
    bias = tl.load(BIAS + b_off, mask=b_m, other=0.0)
    return kv, tl.where(m, g + bias, float("-inf")), off, m


@triton.jit
def _entry_softmax(KV, GATE, BIAS, PREV_OK, b, i, n, s, c, c_ok, L, C, D, M: tl.constexpr, OVERLAP: tl.constexpr,
                   HAS_PREV_OK: tl.constexpr):
    """Entry ``i``'s pooling terms: (kv_cur, p_cur, kv_prev, p_prev, pooled) over channels ``c``."""
    cur_ch = c + D if OVERLAP else c
    kv_c, g_c, _, _ = _load_half(KV, GATE, BIAS, b, i, s, cur_ch, L, C, cur_ch, i < n, M, c_ok)
    mx = tl.max(g_c, axis=0)
    if OVERLAP:
        live = i > 0
        if HAS_PREV_OK:
            live = live & (tl.load(PREV_OK + b * n + i, mask=i < n, other=0) != 0)
        kv_p, g_p, _, _ = _load_half(KV, GATE, BIAS, b, i - 1, s, c, L, C, c, live, M, c_ok)
        mx = tl.maximum(mx, tl.max(g_p, axis=0))
    mx = tl.where(mx > float("-inf"), mx, 0.0)
    e_c = tl.exp(g_c - mx[None, :])
    den = tl.sum(e_c, axis=0)
    num = tl.sum(e_c * kv_c, axis=0)
    if OVERLAP:
        e_p = tl.exp(g_p - mx[None, :])
        den += tl.sum(e_p, axis=0)
        num += tl.sum(e_p * kv_p, axis=0)
    else:
        e_p = e_c * 0.0
        kv_p = kv_c * 0.0
    den = tl.where(den > 0, den, 1.0)
    return kv_c, e_c / den[None, :], kv_p, e_p / den[None, :], num / den


@triton.jit
def pool_fwd_kernel(KV, GATE, BIAS, PREV_OK, OUT, L, n, C, D, M: tl.constexpr, M_P: tl.constexpr,
                    OVERLAP: tl.constexpr, HAS_PREV_OK: tl.constexpr, BLOCK_C: tl.constexpr):
    i = tl.program_id(0)  # entry
    b = tl.program_id(2)  # batch row
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < D
    s = tl.arange(0, M_P)
    _, _, _, _, pooled = _entry_softmax(KV, GATE, BIAS, PREV_OK, b, i, n, s, c, c_ok, L, C, D, M, OVERLAP,
                                        HAS_PREV_OK)
    tl.store(OUT + entry_offset(b, i, n, D, c), pooled, mask=c_ok)


@triton.jit
def pool_bwd_kernel(KV, GATE, BIAS, PREV_OK, DOUT, DKV, DGATE, L, n, nb, C, D, M: tl.constexpr, M_P: tl.constexpr,
                    OVERLAP: tl.constexpr, HAS_PREV_OK: tl.constexpr, BLOCK_C: tl.constexpr):
    j = tl.program_id(0)  # block
    b = tl.program_id(2)  # batch row
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < D
    s = tl.arange(0, M_P)
    # channels read by entry j: its "current" series (D + c with overlap, else c)
    kv_c, p_c, _, _, pooled = _entry_softmax(KV, GATE, BIAS, PREV_OK, b, j, n, s, c, c_ok, L, C, D, M, OVERLAP,
                                             HAS_PREV_OK)
    g = tl.load(DOUT + entry_offset(b, j, n, D, c), mask=tl.where(j < n, c_ok, False), other=0.0)
    cur_ch = c + D if OVERLAP else c
    off, m = block_tile(b, j, s, cur_ch, L, C, M, c_ok)
    tl.store(DKV + off, (p_c * g[None, :]).to(DKV.dtype.element_ty), mask=m)
    tl.store(DGATE + off, (p_c * (kv_c - pooled[None, :]) * g[None, :]).to(DGATE.dtype.element_ty), mask=m)
    if OVERLAP:
        # channels c of block j are the previous-block series of entry j + 1
        _, _, kv_p, p_p, pooled1 = _entry_softmax(KV, GATE, BIAS, PREV_OK, b, j + 1, n, s, c, c_ok, L, C, D, M,
                                                  OVERLAP, HAS_PREV_OK)
        g1 = tl.load(DOUT + entry_offset(b, j + 1, n, D, c), mask=tl.where(j + 1 < n, c_ok, False), other=0.0)
        off, m = block_tile(b, j, s, c, L, C, M, c_ok)
        tl.store(DKV + off, (p_p * g1[None, :]).to(DKV.dtype.element_ty), mask=m)
        tl.store(DGATE + off, (p_p * (kv_p - pooled1[None, :]) * g1[None, :]).to(DGATE.dtype.element_ty), mask=m)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def pool_forward(kv: torch.Tensor, gate: torch.Tensor, bias: torch.Tensor, rate: int, overlap: bool,
                 prev_ok: torch.Tensor | None = None) -> torch.Tensor:
    """``pooled [B, L // rate, D]`` float32 of ``kv, gate [B, L, C]``, ``bias [rate, C]`` float32,
    ``prev_ok [B, n]`` bool or None (see module docstring)."""
    B, L, C = kv.shape
    D = C // 2 if overlap else C
    n = L // rate
    out = torch.empty(B, n, D, dtype=torch.float32, device=kv.device)
    if n == 0:
        return out
    BLOCK_C = min(128, _pow2(D))
    po = prev_ok.to(torch.int8).contiguous() if prev_ok is not None else out
    pool_fwd_kernel[(n, triton.cdiv(D, BLOCK_C), B)](kv.contiguous(), gate.contiguous(), bias.float().contiguous(),
                                                      po, out, L, n, C, D, M=rate, M_P=_pow2(rate), OVERLAP=overlap,
                                                      HAS_PREV_OK=prev_ok is not None, BLOCK_C=BLOCK_C)
    return out


def pool_backward(kv, gate, bias, dout, rate: int, overlap: bool, prev_ok=None):
    """``(dkv, dgate [B, L, C] like the inputs, dbias [rate, C] float32)`` of ``pool_forward``."""
    B, L, C = kv.shape
    D = C // 2 if overlap else C
    n = L // rate
    nb = triton.cdiv(L, rate)
    dkv, dgate = torch.empty_like(kv), torch.empty_like(gate)
    BLOCK_C = min(128, _pow2(D))
    po = prev_ok.to(torch.int8).contiguous() if prev_ok is not None else dkv
    pool_bwd_kernel[(nb, triton.cdiv(D, BLOCK_C), B)](kv.contiguous(), gate.contiguous(), bias.float().contiguous(),
                                                       po, dout.float().contiguous(), dkv, dgate, L, n, nb, C, D,
                                                       M=rate, M_P=_pow2(rate), OVERLAP=overlap,
                                                       HAS_PREV_OK=prev_ok is not None, BLOCK_C=BLOCK_C)
    dbias = dgate[:, : n * rate].float().reshape(B, n, rate, C).sum((0, 1))
    return dkv, dgate, dbias
