"""Norms and manifold-constrained hyper-connections (mHC).

mHC (arXiv 2512.24880; docs/model.md §3): the residual stream is widened to
``hc_mult`` = N streams ``X [B, S, N, D]``. Around every sub-layer F (attention,
then MoE), from ``x = RMSNorm_noweight(flatten(X))``:

- ``mix = x @ fn^T`` with ``(2 + N) * N`` outputs split into pre [N], post [N], comb [N, N];
- ``pre  = sigmoid(mix_pre * scale[0] + base_pre) + eps``  -> block input ``sum_j pre_j X_j``
- ``post = 2 * sigmoid(mix_post * scale[1] + base_post)``
- ``comb = SinkhornKnopp(softmax_rows(mix_comb * scale[2] + base_comb) + eps)``
- ``X'_k = post_k * F(input) + sum_j comb[j, k] X_j``  (note: comb^T @ X).

Letters: B batch, S sequence, N streams (hc_mult), D hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels

from .init import filled, normal_


class RMSNorm(nn.Module):
    """RMSNorm with a float32 weight; computes in float32, returns the input dtype.

    ``y = w * x / sqrt(mean(x^2) + eps)`` over the last axis (Zhang & Sennrich 2019).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = filled(dim, 1.0)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf).to(x.dtype)


def rms_norm_noweight(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMSNorm over the last axis (variance in float32), same dtype as ``x``."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def sinkhorn_knopp(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Project ``[..., N, N]`` logits to an (approximately) doubly-stochastic matrix.

    ``softmax`` over rows, ``+ eps``, then one column normalisation followed by
    ``iters - 1`` (row, column) normalisation pairs; every denominator gets ``+ eps``
    (docs/model.md §3; mHC paper eq. 8). Returns float32 like the input.
    """
    comb = torch.softmax(logits, dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


class HyperConnection(nn.Module):
    """mHC mapping around one sub-layer (HF ``DeepseekV4HyperConnection``).

    Parameters (float32): ``fn [(2+N)N, N*D]``, ``base [(2+N)N]``, ``scale [3]``.
    ``forward(X [B,S,N,D]) -> (post [B,S,N], comb [B,S,N,N], collapsed [B,S,D])``;
    ``merge(X, block_out, post, comb)`` returns the new streams ``[B,S,N,D]``.
    """

    def __init__(self, hidden_size: int, hc_mult: int, sinkhorn_iters: int, hc_eps: float, norm_eps: float,
                 constrained: bool = True):
        super().__init__()
        self.hc_mult = hc_mult
        self.iters = sinkhorn_iters
        self.hc_eps = hc_eps
        self.norm_eps = norm_eps
        # False = ablation: comb = the raw logits, no projection (original, unconstrained HC).
        self.constrained = constrained
        n_out = (2 + hc_mult) * hc_mult
        self.fn = nn.Parameter(torch.empty(n_out, hc_mult * hidden_size, dtype=torch.float32))
        self.base = filled(n_out, 0.0)
        self.scale = filled(3, 1.0)
        normal_(self.fn, 0.02)

    def forward(self, streams_BSND: torch.Tensor):
        B, S, N, D = streams_BSND.shape
        if self.constrained and kernels.use_kernels(streams_BSND):  # fused Triton kernels (kernels/mhc.py)
            def fused():
                from kernels.ops import mhc_collapse

                post, comb, out = mhc_collapse(streams_BSND.reshape(B * S, N, D), self.fn, self.base, self.scale,
                                               self.iters, self.hc_eps, self.norm_eps)
                return post.view(B, S, N), comb.view(B, S, N, N), out.view(B, S, D)
            res = kernels.run("mhc", fused, lambda: None)
            if res is not None:
                return res
        flat = rms_norm_noweight(streams_BSND.reshape(B, S, -1).float(), self.norm_eps)
        mix = F.linear(flat, self.fn.float())
        pre_w, post_w, comb_w = mix.split([N, N, N * N], dim=-1)
        pre_b, post_b, comb_b = self.base.split([N, N, N * N])
        s_pre, s_post, s_comb = self.scale.unbind(0)
        pre = torch.sigmoid(pre_w * s_pre + pre_b) + self.hc_eps
        post = 2 * torch.sigmoid(post_w * s_post + post_b)
        comb_logits = comb_w.view(B, S, N, N) * s_comb + comb_b.view(N, N)
        if self.constrained:
            comb = sinkhorn_knopp(comb_logits, self.iters, self.hc_eps)
        else:
            comb = comb_logits
        # sum_j pre_j X_j as a batched [1,N] @ [N,D] product (no [B,S,N,D] temporary)
        collapsed = torch.matmul(pre.unsqueeze(-2).to(streams_BSND.dtype), streams_BSND).squeeze(-2)
        return post, comb, collapsed

    @staticmethod
    def merge(streams_BSND: torch.Tensor, out_BSD: torch.Tensor, post_BSN: torch.Tensor,
              comb_BSNN: torch.Tensor) -> torch.Tensor:
        """``X'_k = post_k * out + sum_j comb[j,k] X_j`` (the comb transpose, docs/model.md §3)."""
        dt = streams_BSND.dtype
        return post_BSN.to(dt).unsqueeze(-1) * out_BSD.unsqueeze(-2) + torch.matmul(
            comb_BSNN.to(dt).transpose(-1, -2), streams_BSND)


class HyperHead(nn.Module):
    """Final stream collapse: ``pre = sigmoid(x hc_fn^T * hc_scale + hc_base) + eps``;
    returns ``sum_j pre_j X_j`` ``[B,S,D]`` (HF ``DeepseekV4HyperHead``)."""

    def __init__(self, hidden_size: int, hc_mult: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.hc_eps = hc_eps
        self.norm_eps = norm_eps
        self.hc_fn = nn.Parameter(torch.empty(hc_mult, hc_mult * hidden_size, dtype=torch.float32))
        self.hc_base = filled(hc_mult, 0.0)
        self.hc_scale = filled(1, 1.0)
        normal_(self.hc_fn, 0.02)

    def forward(self, streams_BSND: torch.Tensor) -> torch.Tensor:
        flat = rms_norm_noweight(streams_BSND.flatten(2).float(), self.norm_eps)
        mixes = F.linear(flat, self.hc_fn.float())
        pre = torch.sigmoid(mixes * self.hc_scale.float() + self.hc_base.float()) + self.hc_eps
        return torch.matmul(pre.unsqueeze(-2).to(streams_BSND.dtype), streams_BSND).squeeze(-2)
