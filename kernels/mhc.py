"""Fused mHC (manifold-constrained hyper-connections) kernels: forward and backward.

Reference: ``model.layers.HyperConnection.forward`` (mHC paper arXiv 2512.24880 eqs. 5-8,
docs/model.md §3). For every token row t of the streams ``X [T, N, D]`` one program (a
block of ``BLOCK_T`` rows) computes, without leaving the chip:

- ``rstd = rsqrt(mean(X[t]^2) + norm_eps)`` and ``mix = (X[t] @ fn^T) * rstd`` (the
  pre-norm projection to the ``(2+N)N`` coefficients: 24 for N = 4);
- ``pre = sigmoid(mix_pre * scale0 + base_pre) + hc_eps``,
  ``post = 2 sigmoid(mix_post * scale1 + base_post)``,
  ``comb = SinkhornKnopp(softmax_rows(mix_comb * scale2 + base_comb) + hc_eps)`` (``iters``
  iterations: one column normalisation, then ``iters - 1`` row/column pairs);
- the stream collapse ``out[t] = sum_j pre_j X[t, j]``.

It writes ``post``, ``comb``, ``out`` and, for the backward, ``mix`` and ``rstd`` (N(N+2)+1
floats per row). The backward kernel recomputes the coefficients from ``mix`` and
backpropagates through the Sinkhorn iterations by recomputing each iteration's input
from the softmax output (NC(iters^2) 4x4 normalisations per row, on chip) instead of
storing them; the two K-long products (``d fn = dmix^T (X rstd)``, ``d flat = dmix fn``)
are cuBLAS GEMMs, and the RMSNorm backward is elementwise torch.

Index arithmetic lives in the ``@triton.jit`` helpers ``row_lanes``, ``tile2`` and
``tile3``; ``kernels/verify/mhc.py`` proves it with Z3 by calling the same functions.
Letters: T token rows (B*S), N streams, D hidden, K = N*D, NC = (2+N)N coefficients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# ----------------------------------------------------------------- index helpers
@triton.jit
def row_lanes(pid, lane, T, BLOCK_T: tl.constexpr):
    """Rows ``pid*BLOCK_T + lane`` of a program and their mask ``row < T``."""
    rows = pid * BLOCK_T + lane
    return rows, rows < T


@triton.jit
def tile2(a, amask, a_stride, b, bmask, b_stride):
    """Offsets ``a*a_stride + b*b_stride`` of an ``[len(a), len(b)]`` tile, and its mask (int64 rows)."""
    return a[:, None].to(tl.int64) * a_stride + b[None, :] * b_stride, amask[:, None] & bmask[None, :]


@triton.jit
def tile3(a, amask, a_stride, b, bmask, b_stride, c, cmask, c_stride):
    """Offsets and mask of an ``[len(a), len(b), len(c)]`` tile (int64 in the first axis)."""
    off = a[:, None, None].to(tl.int64) * a_stride + b[None, :, None] * b_stride + c[None, None, :] * c_stride
    return off, amask[:, None, None] & bmask[None, :, None] & cmask[None, None, :]


# --------------------------------------------------------------- on-chip math
@triton.jit
def _pick2(mix, o, first, N_P: tl.constexpr, N: tl.constexpr):
    """Columns ``first + j`` (j < N) of ``mix [BT, NC_P]`` as ``[BT, N_P]`` (0 beyond N)."""
    j = tl.arange(0, N_P)
    sel = (o[None, None, :] == (first + j)[None, :, None]) & (j < N)[None, :, None]
    return tl.sum(tl.where(sel, mix[:, None, :], 0.0), axis=2)


@triton.jit
def _pick3(mix, o, first, N_P: tl.constexpr, N: tl.constexpr):
    """Columns ``first + i*N + j`` of ``mix`` as ``[BT, N_P, N_P]`` (0 outside N x N)."""
    i = tl.arange(0, N_P)
    j = tl.arange(0, N_P)
    col = first + i[:, None] * N + j[None, :]
    ok = (i[:, None] < N) & (j[None, :] < N)
    sel = (o[None, None, None, :] == col[None, :, :, None]) & ok[None, :, :, None]
    return tl.sum(tl.where(sel, mix[:, None, None, :], 0.0), axis=3)


@triton.jit
def _norm(c, valid, eps, AXIS: tl.constexpr):
    """``c / (sum(c, AXIS) + eps)`` (AXIS 2: rows of each [N, N] matrix, 1: columns)."""
    s = tl.sum(c, axis=AXIS)
    if AXIS == 2:
        return tl.where(valid, c / (s[:, :, None] + eps), 0.0)
    return tl.where(valid, c / (s[:, None, :] + eps), 0.0)


@triton.jit
def _norm_bwd(c, g, valid, eps, AXIS: tl.constexpr):
    """Gradient of ``_norm`` at input ``c`` for output gradient ``g``."""
    s = tl.sum(c, axis=AXIS)
    gc = tl.sum(g * c, axis=AXIS)
    if AXIS == 2:
        d = s[:, :, None] + eps
        return tl.where(valid, g / d - gc[:, :, None] / (d * d), 0.0)
    d = s[:, None, :] + eps
    return tl.where(valid, g / d - gc[:, None, :] / (d * d), 0.0)


@triton.jit
def _softmax_rows(z, valid):
    """Softmax over each row of ``z [BT, N_P, N_P]`` restricted to ``valid`` (padded rows: all 0)."""
    m = tl.max(tl.where(valid, z, -3.0e38), axis=2)
    m = tl.where(m > -3.0e38, m, 0.0)  # a padded row has no valid entry
    e = tl.where(valid, tl.exp(tl.where(valid, z, 0.0) - m[:, :, None]), 0.0)
    s = tl.sum(e, axis=2)
    return e / tl.where(s > 0, s, 1.0)[:, :, None]


@triton.jit
def _logits(mix, BASE, SCALE, o, N: tl.constexpr, N_P: tl.constexpr, NC: tl.constexpr):
    """The coefficient logits ``z = mix * scale + base``: pre, post ``[BT, N_P]`` and comb ``[BT, N_P, N_P]``."""
    base = tl.load(BASE + o, mask=o < NC, other=0.0)
    z_pre = _pick2(mix, o, 0, N_P, N) * tl.load(SCALE) + _pick2(base[None, :], o, 0, N_P, N)
    z_post = _pick2(mix, o, N, N_P, N) * tl.load(SCALE + 1) + _pick2(base[None, :], o, N, N_P, N)
    z_comb = _pick3(mix, o, 2 * N, N_P, N) * tl.load(SCALE + 2) + _pick3(base[None, :], o, 2 * N, N_P, N)
    return z_pre, z_post, z_comb


@triton.jit
def _sinkhorn(z_comb, valid, eps, ITERS: tl.constexpr):
    c = tl.where(valid, _softmax_rows(z_comb, valid) + eps, 0.0)
    c = _norm(c, valid, eps, 1)
    for _ in range(ITERS - 1):
        c = _norm(c, valid, eps, 2)
        c = _norm(c, valid, eps, 1)
    return c


# ---------------------------------------------------------------------- forward
@triton.jit
def mhc_fwd_kernel(X, FN, BASE, SCALE, MIX, RSTD, POST, COMB, OUT, T, D, hc_eps, norm_eps,
                   N: tl.constexpr, N_P: tl.constexpr, NC: tl.constexpr, NC_P: tl.constexpr, ITERS: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows, rmask = row_lanes(pid, tl.arange(0, BLOCK_T), T, BLOCK_T)
    K = N * D
    o = tl.arange(0, NC_P)
    acc = tl.zeros((BLOCK_T, NC_P), dtype=tl.float32)
    ss = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        xo, xm = tile2(rows, rmask, K, k, k < K, 1)
        x = tl.load(X + xo, mask=xm, other=0.0).to(tl.float32)
        wo, wm = tile2(k, k < K, 1, o, o < NC, K)  # fn^T tile [BLOCK_K, NC_P]
        w = tl.load(FN + wo, mask=wm, other=0.0)
        acc += tl.dot(x, w, input_precision="ieee")
        ss += tl.sum(x * x, axis=1)
    rstd = 1.0 / tl.sqrt(ss / K + norm_eps)
    mix = acc * rstd[:, None]
    mo, mm = tile2(rows, rmask, NC, o, o < NC, 1)
    tl.store(MIX + mo, mix, mask=mm)
    tl.store(RSTD + rows, rstd, mask=rmask)

    z_pre, z_post, z_comb = _logits(mix, BASE, SCALE, o, N, N_P, NC)
    j = tl.arange(0, N_P)
    jm = j < N
    valid = (jm[:, None] & jm[None, :])[None, :, :]
    pre = tl.where(jm[None, :], tl.sigmoid(z_pre) + hc_eps, 0.0)
    post = 2.0 * tl.sigmoid(z_post)
    comb = _sinkhorn(z_comb, valid, hc_eps, ITERS)
    po, pm = tile2(rows, rmask, N, j, jm, 1)
    tl.store(POST + po, post, mask=pm)
    co, cm = tile3(rows, rmask, N * N, j, jm, N, j, jm, 1)
    tl.store(COMB + co, comb, mask=cm)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        xo, xm = tile3(rows, rmask, K, j, jm, D, d, d < D, 1)
        x3 = tl.load(X + xo, mask=xm, other=0.0).to(tl.float32)
        out = tl.sum(pre[:, :, None] * x3, axis=1)
        oo, om = tile2(rows, rmask, D, d, d < D, 1)
        tl.store(OUT + oo, out.to(OUT.dtype.element_ty), mask=om)


# --------------------------------------------------------------------- backward
@triton.jit
def mhc_bwd_kernel(X, MIX, BASE, SCALE, DPOST, DCOMB, DOUT, DZ, DXC, T, D, hc_eps,
                   N: tl.constexpr, N_P: tl.constexpr, NC: tl.constexpr, NC_P: tl.constexpr, ITERS: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Gradients w.r.t. the coefficient logits ``z`` (``DZ [T, NC]``) and the collapse part of
    ``dX`` (``DXC [T, N, D] = pre_j * dout``)."""
    pid = tl.program_id(0)
    rows, rmask = row_lanes(pid, tl.arange(0, BLOCK_T), T, BLOCK_T)
    K = N * D
    o = tl.arange(0, NC_P)
    mo, mm = tile2(rows, rmask, NC, o, o < NC, 1)
    mix = tl.load(MIX + mo, mask=mm, other=0.0)
    z_pre, z_post, z_comb = _logits(mix, BASE, SCALE, o, N, N_P, NC)
    j = tl.arange(0, N_P)
    jm = j < N
    valid = (jm[:, None] & jm[None, :])[None, :, :]
    sig_pre = tl.sigmoid(z_pre)
    pre = tl.where(jm[None, :], sig_pre + hc_eps, 0.0)

    # collapse: d pre_j = sum_d dout[d] X[j, d];  dX[j, d] = pre_j dout[d]
    dpre = tl.zeros((BLOCK_T, N_P), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        go, gm = tile2(rows, rmask, D, d, d < D, 1)
        g = tl.load(DOUT + go, mask=gm, other=0.0).to(tl.float32)
        xo, xm = tile3(rows, rmask, K, j, jm, D, d, d < D, 1)
        x3 = tl.load(X + xo, mask=xm, other=0.0).to(tl.float32)
        dpre += tl.sum(x3 * g[:, None, :], axis=2)
        tl.store(DXC + xo, (pre[:, :, None] * g[:, None, :]).to(DXC.dtype.element_ty), mask=xm)
    dz_pre = dpre * sig_pre * (1.0 - sig_pre)

    po, pm = tile2(rows, rmask, N, j, jm, 1)
    dpost = tl.load(DPOST + po, mask=pm, other=0.0)
    sig_post = tl.sigmoid(z_post)
    dz_post = dpost * 2.0 * sig_post * (1.0 - sig_post)

    # Sinkhorn backward, recomputing each normalisation's input from the softmax output.
    co, cm = tile3(rows, rmask, N * N, j, jm, N, j, jm, 1)
    g = tl.load(DCOMB + co, mask=cm, other=0.0)
    sm = _softmax_rows(z_comb, valid)
    c0 = tl.where(valid, sm + hc_eps, 0.0)
    M = 2 * ITERS - 1  # normalisations: 1 = columns, then rows, columns, ...
    for back in range(M):
        m = M - back  # undo normalisation m (1-based)
        c = c0
        for q in range(1, m):
            if q % 2 == 1:
                c = _norm(c, valid, hc_eps, 1)
            else:
                c = _norm(c, valid, hc_eps, 2)
        if m % 2 == 1:
            g = _norm_bwd(c, g, valid, hc_eps, 1)
        else:
            g = _norm_bwd(c, g, valid, hc_eps, 2)
    dz_comb = tl.where(valid, sm * (g - tl.sum(g * sm, axis=2)[:, :, None]), 0.0)

    # scatter the three pieces back into [BT, NC] order
    sel_pre = (o[None, :] == j[:, None]) & jm[:, None]  # [N_P, NC_P]
    sel_post = (o[None, :] == (N + j)[:, None]) & jm[:, None]
    dz = tl.sum(tl.where(sel_pre[None, :, :], dz_pre[:, :, None], 0.0), axis=1)
    dz += tl.sum(tl.where(sel_post[None, :, :], dz_post[:, :, None], 0.0), axis=1)
    col = 2 * N + j[:, None] * N + j[None, :]
    ok = jm[:, None] & jm[None, :]
    sel_comb = (o[None, None, :] == col[:, :, None]) & ok[:, :, None]  # [N_P, N_P, NC_P]
    dz += tl.sum(tl.sum(tl.where(sel_comb[None, :, :, :], dz_comb[:, :, :, None], 0.0), axis=2), axis=1)
    tl.store(DZ + mo, dz, mask=mm)


# ---------------------------------------------------------------------- launchers
def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _config(T: int, D: int, N: int) -> dict:
    # BLOCK_T >= 16 and NC_P >= 16: tl.dot's minimum tile
    return dict(BLOCK_T=16, BLOCK_K=min(128, max(16, _pow2(N * D))), BLOCK_D=min(128, _pow2(D)))


def mhc_forward(x_TND: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, iters: int,
                hc_eps: float, norm_eps: float):
    """Launch the forward kernel. ``x [T, N, D]`` (float32 or bf16, contiguous), ``fn [NC, N*D]``,
    ``base [NC]``, ``scale [3]`` float32. Returns ``(post [T,N], comb [T,N,N], out [T,D] in x's dtype,
    mix [T,NC], rstd [T])`` (float32 except ``out``)."""
    T, N, D = x_TND.shape
    NC = (2 + N) * N
    x = x_TND.contiguous()
    f32 = dict(dtype=torch.float32, device=x.device)
    post, comb = torch.empty(T, N, **f32), torch.empty(T, N, N, **f32)
    mix, rstd = torch.empty(T, NC, **f32), torch.empty(T, **f32)
    out = torch.empty(T, D, dtype=x.dtype, device=x.device)
    cfg = _config(T, D, N)
    grid = (triton.cdiv(T, cfg["BLOCK_T"]),)
    mhc_fwd_kernel[grid](x, fn.contiguous().float(), base.float(), scale.float(), mix, rstd, post, comb, out,
                         T, D, hc_eps, norm_eps, N=N, N_P=_pow2(N), NC=NC, NC_P=max(16, _pow2(NC)), ITERS=iters, **cfg)
    return post, comb, out, mix, rstd


def mhc_backward(x_TND, fn, base, scale, mix, rstd, dpost, dcomb, dout, iters: int, hc_eps: float):
    """Gradients ``(dx [T,N,D], dfn [NC,K], dbase [NC], dscale [3])`` of ``mhc_forward``'s outputs."""
    T, N, D = x_TND.shape
    NC = (2 + N) * N
    x = x_TND.contiguous()
    dz = torch.empty(T, NC, dtype=torch.float32, device=x.device)
    dxc = torch.empty_like(x, dtype=torch.float32)
    cfg = _config(T, D, N)
    grid = (triton.cdiv(T, cfg["BLOCK_T"]),)
    mhc_bwd_kernel[grid](x, mix, base.float(), scale.float(), dpost.float().contiguous(), dcomb.float().contiguous(),
                         dout.contiguous(), dz, dxc, T, D, hc_eps, N=N, N_P=_pow2(N), NC=NC, NC_P=max(16, _pow2(NC)),
                         ITERS=iters, BLOCK_T=cfg["BLOCK_T"], BLOCK_D=cfg["BLOCK_D"])
    # z = mix * scale[piece] + base:  d mix = dz * scale,  d base = sum dz,  d scale = sum dz * mix per piece
    piece = torch.cat([torch.zeros(N), torch.ones(N), torch.full((N * N,), 2.0)]).long().to(x.device)
    dmix = dz * scale.float()[piece]
    dbase = dz.sum(0)
    dscale = torch.zeros(3, dtype=torch.float32, device=x.device).index_add_(0, piece, (dz * mix).sum(0))
    # mix = (x rstd) @ fn^T: two GEMMs, then the weightless RMSNorm backward
    xf = x.reshape(T, N * D).float()
    flat = xf * rstd[:, None]
    dfn = dmix.t() @ flat
    dflat = dmix @ fn.float()
    dx = rstd[:, None] * dflat - xf * (rstd ** 3)[:, None] * (dflat * xf).mean(-1, keepdim=True)
    dx = dx.view(T, N, D) + dxc
    return dx.to(x.dtype), dfn, dbase, dscale
