"""The kernels as ``torch.library`` custom ops: fake implementations for ``torch.compile``,
autograd through the backward kernels.

- ``tide::mhc(x [T,N,D], fn [O,N*D], base [O], scale [3], iters, hc_eps, norm_eps)
  -> (post [T,N], comb [T,N,N], out [T,D], mix [T,O], rstd [T])`` (``mix``/``rstd``: saved
  for the backward, not differentiable), ``tide::mhc_backward``; ``mhc_collapse`` is the
  differentiable entry point ``model.layers.HyperConnection`` uses.
- ``tide::compressor_pool(kv [B,L,C], gate [B,L,C], bias [M,C], rate, overlap, prev_ok [B,n] | None)
  -> pooled [B, L // rate, D]`` float32 and ``tide::compressor_pool_backward``: the stateless
  path of ``model.attention.Compressor.pool``.
- ``tide::indexer_topk(q, w, keys, q_pos, rate, topk, entry_doc | None, query_doc | None)
  -> (idx [B,Q,K] int64, valid [B,Q,K] bool, scores [B,Q,T] float32)``: the Lightning
  Indexer's scores and top-k selection (no gradient: the selection is discrete; the
  indexer's KL training uses the reference scores).
- ``tide::sparse_attention(q, kv, sinks, window, q_start, comp | None, idx | None, valid | None,
  rate, doc_ids | None, entry_doc | None) -> (out [B,Q,H,D], lse [B,Q,H])``: window + compressed
  entries + sink in one online softmax; differentiable in q, kv, comp and sinks through
  ``tide::sparse_attention_backward`` (deterministic: query-, key- and entry-major kernels).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op


@custom_op("tide::mhc", mutates_args=())
def mhc(x: Tensor, fn: Tensor, base: Tensor, scale: Tensor, iters: int, hc_eps: float,
        norm_eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from .mhc import mhc_forward

    return mhc_forward(x, fn, base, scale, iters, hc_eps, norm_eps)


@mhc.register_fake
def _mhc_fake(x, fn, base, scale, iters, hc_eps, norm_eps):
    T, N, D = x.shape
    f32 = dict(dtype=torch.float32, device=x.device)
    return (x.new_empty(T, N, **f32), x.new_empty(T, N, N, **f32), x.new_empty(T, D),
            x.new_empty(T, (2 + N) * N, **f32), x.new_empty(T, **f32))


@custom_op("tide::mhc_backward", mutates_args=())
def mhc_backward(x: Tensor, fn: Tensor, base: Tensor, scale: Tensor, mix: Tensor, rstd: Tensor, dpost: Tensor,
                 dcomb: Tensor, dout: Tensor, iters: int, hc_eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from .mhc import mhc_backward as run

    return run(x, fn, base, scale, mix, rstd, dpost, dcomb, dout, iters, hc_eps)


@mhc_backward.register_fake
def _mhc_backward_fake(x, fn, base, scale, mix, rstd, dpost, dcomb, dout, iters, hc_eps):
    f32 = dict(dtype=torch.float32, device=x.device)
    return torch.empty_like(x), fn.new_empty(fn.shape, **f32), base.new_empty(base.shape, **f32), \
        scale.new_empty(scale.shape, **f32)


def _setup(ctx, inputs, output):
    x, fn, base, scale, iters, hc_eps, _ = inputs
    _, _, _, mix, rstd = output
    ctx.save_for_backward(x, fn, base, scale, mix, rstd)
    ctx.iters, ctx.hc_eps = iters, hc_eps
    ctx.mark_non_differentiable(mix, rstd)


def _backward(ctx, dpost, dcomb, dout, _dmix, _drstd):
    x, fn, base, scale, mix, rstd = ctx.saved_tensors
    T, N, D = x.shape
    dpost = dpost if dpost is not None else x.new_zeros(T, N, dtype=torch.float32)
    dcomb = dcomb if dcomb is not None else x.new_zeros(T, N, N, dtype=torch.float32)
    dout = dout if dout is not None else x.new_zeros(T, D)
    dx, dfn, dbase, dscale = mhc_backward(x, fn, base, scale, mix, rstd, dpost, dcomb, dout, ctx.iters, ctx.hc_eps)
    return dx, dfn.to(fn.dtype), dbase.to(base.dtype), dscale.to(scale.dtype), None, None, None


mhc.register_autograd(_backward, setup_context=_setup)


def mhc_collapse(x_TND: Tensor, fn: Tensor, base: Tensor, scale: Tensor, iters: int, hc_eps: float,
                 norm_eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(post [T,N], comb [T,N,N], collapsed [T,D])`` of ``model.layers.HyperConnection`` via the fused
    kernels (differentiable in x, fn, base, scale)."""
    post, comb, out, _, _ = mhc(x_TND, fn, base, scale, iters, hc_eps, norm_eps)
    return post, comb, out


@custom_op("tide::compressor_pool", mutates_args=())
def compressor_pool(kv: Tensor, gate: Tensor, bias: Tensor, rate: int, overlap: bool,
                    prev_ok: Tensor | None) -> Tensor:
    from .compressor import pool_forward

    return pool_forward(kv, gate, bias, rate, overlap, prev_ok)


@compressor_pool.register_fake
def _compressor_pool_fake(kv, gate, bias, rate, overlap, prev_ok):
    B, L, C = kv.shape
    return kv.new_empty(B, L // rate, C // 2 if overlap else C, dtype=torch.float32)


@custom_op("tide::compressor_pool_backward", mutates_args=())
def compressor_pool_backward(kv: Tensor, gate: Tensor, bias: Tensor, dout: Tensor, rate: int, overlap: bool,
                             prev_ok: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    from .compressor import pool_backward

    return pool_backward(kv, gate, bias, dout, rate, overlap, prev_ok)


@compressor_pool_backward.register_fake
def _compressor_pool_backward_fake(kv, gate, bias, dout, rate, overlap, prev_ok):
    return torch.empty_like(kv), torch.empty_like(gate), bias.new_empty(bias.shape, dtype=torch.float32)


def _pool_setup(ctx, inputs, output):
    kv, gate, bias, rate, overlap, prev_ok = inputs
    ctx.save_for_backward(kv, gate, bias, prev_ok)
    ctx.rate, ctx.overlap = rate, overlap


def _pool_backward(ctx, dout):
    kv, gate, bias, prev_ok = ctx.saved_tensors
    dkv, dgate, dbias = compressor_pool_backward(kv, gate, bias, dout, ctx.rate, ctx.overlap, prev_ok)
    return dkv, dgate, dbias.to(bias.dtype), None, None, None


compressor_pool.register_autograd(_pool_backward, setup_context=_pool_setup)


@custom_op("tide::indexer_topk", mutates_args=())
def indexer_topk(q: Tensor, w: Tensor, keys: Tensor, q_pos: Tensor, rate: int, topk: int, entry_doc: Tensor | None,
                 query_doc: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    from .indexer import indexer_topk as run

    return run(q, w, keys, q_pos, rate, topk, entry_doc, query_doc)


@indexer_topk.register_fake
def _indexer_topk_fake(q, w, keys, q_pos, rate, topk, entry_doc, query_doc):
    B, Q = q.shape[:2]
    T = keys.shape[1]
    K = min(topk, T)
    return (q.new_empty(B, Q, K, dtype=torch.int64), q.new_empty(B, Q, K, dtype=torch.bool),
            q.new_empty(B, Q, T, dtype=torch.float32))


@custom_op("tide::sparse_attention", mutates_args=())
def sparse_attention(q: Tensor, kv: Tensor, sinks: Tensor, window: int, q_start: int, comp: Tensor | None,
                     idx: Tensor | None, valid: Tensor | None, rate: int, doc_ids: Tensor | None,
                     entry_doc: Tensor | None) -> tuple[Tensor, Tensor]:
    from .sparse_attention import sparse_attention as run

    return run(q, kv, sinks, window, q_start=q_start, comp=comp, idx=idx, valid=valid, rate=rate, doc_ids=doc_ids,
               entry_doc=entry_doc)


@sparse_attention.register_fake
def _sparse_attention_fake(q, kv, sinks, window, q_start, comp, idx, valid, rate, doc_ids, entry_doc):
    B, Q, H, _ = q.shape
    return torch.empty_like(q), q.new_empty(B, Q, H, dtype=torch.float32)


@custom_op("tide::sparse_attention_backward", mutates_args=())
def sparse_attention_backward(q: Tensor, kv: Tensor, sinks: Tensor, window: int, q_start: int, comp: Tensor | None,
                              idx: Tensor | None, valid: Tensor | None, rate: int, doc_ids: Tensor | None,
                              entry_doc: Tensor | None, out: Tensor, lse: Tensor,
                              dout: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from .sparse_attention import sparse_attention_backward as run

    dq, dkv, dcomp, dsink = run(q, kv, sinks, window, q_start, comp, idx, valid, rate, doc_ids, entry_doc, out, lse,
                                dout)
    return dq, dkv, dcomp if dcomp is not None else kv.new_zeros(0), dsink


@sparse_attention_backward.register_fake
def _sparse_attention_backward_fake(q, kv, sinks, window, q_start, comp, idx, valid, rate, doc_ids, entry_doc, out,
                                    lse, dout):
    return (torch.empty_like(q), torch.empty_like(kv), torch.empty_like(comp) if comp is not None else kv.new_zeros(0),
            sinks.new_empty(sinks.shape, dtype=torch.float32))


def _sa_setup(ctx, inputs, output):
    q, kv, sinks, window, q_start, comp, idx, valid, rate, doc_ids, entry_doc = inputs
    out, lse = output
    ctx.save_for_backward(q, kv, sinks, comp, idx, valid, doc_ids, entry_doc, out, lse)
    ctx.window, ctx.q_start, ctx.rate = window, q_start, rate
    ctx.mark_non_differentiable(lse)


def _sa_backward(ctx, dout, _dlse):
    q, kv, sinks, comp, idx, valid, doc_ids, entry_doc, out, lse = ctx.saved_tensors
    dq, dkv, dcomp, dsink = sparse_attention_backward(q, kv, sinks, ctx.window, ctx.q_start, comp, idx, valid,
                                                      ctx.rate, doc_ids, entry_doc, out, lse, dout)
    return (dq, dkv, dsink.to(sinks.dtype), None, None, dcomp if comp is not None else None, None, None, None, None,
            None)


sparse_attention.register_autograd(_sa_backward, setup_context=_sa_setup)
