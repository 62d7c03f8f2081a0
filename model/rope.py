"""Partial, interleaved rotary position embedding (DeepSeek-V4, docs/model.md §2).

V4 rotates only the trailing ``qk_rope_head_dim`` channels of each head, pairing
consecutive channels (2i, 2i+1) ("interleaved" RoPE). Two frequency tables exist:
``main`` (``rope_theta``, used by sliding-window-only layers) and ``compress``
(``compress_rope_theta``, optionally YaRN-scaled, used by CSA/HCA layers, their
compressors and the Lightning Indexer).

Letters: B batch, S positions, H heads, D channels, R rope channels.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def inv_freq_for(rope: dict, rope_dim: int) -> torch.Tensor:
    """Inverse frequencies [R/2] float32 for one rope-parameter dict.

    Supports ``rope_type`` ``default`` and ``yarn`` (YaRN, arXiv 2309.00071,
    NTK-by-parts with a linear ramp between ``beta_fast`` and ``beta_slow``
    rotations; correction range truncated to integers as in the reference).
    The YaRN ``attention_factor`` (mscale) is not applied: V4 uses 1.0.
    """
    base = float(rope["rope_theta"])
    exponents = torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim
    pos_freqs = base ** exponents
    inv = 1.0 / pos_freqs
    if rope.get("rope_type", "default") != "yarn":
        return inv
    factor = float(rope["factor"])
    orig = float(rope["original_max_position_embeddings"])
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1

    def corr_dim(n_rot: float) -> float:
        return (rope_dim * math.log(orig / (n_rot * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(corr_dim(beta_fast)), 0)
    high = min(math.ceil(corr_dim(beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    interp = 1.0 / (factor * pos_freqs)
    return interp * (1 - extrapolation) + inv * extrapolation


class Rotary(nn.Module):
    """Holds the ``main`` and ``compress`` inverse-frequency tables.

    ``cos_sin(positions, kind)`` returns ``(cos, sin)`` each ``[..., R/2]`` float32
    for integer positions of any shape.
    """

    def __init__(self, rope_parameters: dict, rope_dim: int):
        super().__init__()
        self.rope_dim = rope_dim
        self.rope_parameters = rope_parameters
        self.register_buffer("main_inv_freq", inv_freq_for(rope_parameters["main"], rope_dim), persistent=False)
        self.register_buffer("compress_inv_freq", inv_freq_for(rope_parameters["compress"], rope_dim),
                             persistent=False)

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the tables on the buffers' device (``model.init.materialize``)."""
        for name, kind in (("main_inv_freq", "main"), ("compress_inv_freq", "compress")):
            buf = getattr(self, name)
            with torch.device("cpu"):
                buf.copy_(inv_freq_for(self.rope_parameters[kind], self.rope_dim))

    def cos_sin(self, positions: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self.main_inv_freq if kind == "main" else self.compress_inv_freq
        freqs = positions[..., None].to(torch.float32) * inv
        return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the trailing ``2*cos.shape[-1]`` channels of ``x`` pairwise.

    Args:
        x: ``[..., S, (H,) D]``; the rope slice is ``x[..., -R:]``.
        cos, sin: ``[S, R/2]`` (or ``[B, S, R/2]``); when ``x`` has a head axis
            (two more dims than ``cos``) they are unsqueezed at -2. Pass ``-sin``
            for the inverse rotation.
    Returns:
        tensor like ``x`` (same dtype), rotation computed in float32.
    """
    r = cos.shape[-1] * 2
    if x.dim() - cos.dim() >= 2:  # x has a head axis between positions and channels
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    nope, rope = x[..., :-r], x[..., -r:]
    pairs = rope.float().unflatten(-1, (-1, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat([nope, out.to(x.dtype)], dim=-1)
