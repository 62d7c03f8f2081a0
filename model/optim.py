"""Muon + AdamW, as trained in DeepSeek-V4 (SPEC section 6), and the LR schedule.

Muon (Jordan et al. 2024; DeepSeek-V4 report section 4.2): for each matrix
parameter W with gradient G,

    M <- mu * M + G
    O <- HybridNS(mu * M + G)                       (Nesterov)
    O <- O * sqrt(max(n, m)) * update_rms            (update RMS matched to AdamW)
    W <- W * (1 - lr * wd) - lr * O                  (decoupled weight decay)

HybridNS normalises by the Frobenius norm, then runs the quintic Newton-Schulz
iteration ``X <- aX + b(XX^T)X + c(XX^T)^2 X``: 8 steps with (3.4445, -4.7750,
2.0315) (fast, rough: singular values land in about [0.7, 1.2]), then 2 with
(2, -1.5, 0.5) (settles them at 1). A 3-D parameter ``[E, n, m]`` (stacked
experts) is orthogonalised per expert.

AdamW ((0.9, 0.95), eps 1e-20) takes the embedding, the LM head, every norm
weight, the mHC biases / scales, the attention sinks and the compressor position
biases: everything that is not a weight matrix of a projection.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

FAST = (3.4445, -4.7750, 2.0315)
SETTLE = (2.0, -1.5, 0.5)
HYBRID_STEPS: tuple[tuple[float, float, float], ...] = (FAST,) * 8 + (SETTLE,) * 2


def newton_schulz(G: torch.Tensor, steps: Sequence[tuple[float, float, float]] = HYBRID_STEPS,
                  eps: float = 1e-7, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximate the orthogonal polar factor ``U V^T`` of ``G = U S V^T``.

    Args:
        G: ``[..., n, m]``; leading axes are independent matrices (e.g. experts).
        steps: per-iteration quintic coefficients (a, b, c); default the hybrid schedule.
        dtype: compute dtype (float32; ``torch.bfloat16`` reproduces torch's Muon).
    Returns:
        ``[..., n, m]`` in ``dtype`` with singular values close to 1.
    """
    if G.dim() < 2:
        raise ValueError(f"newton_schulz needs a matrix, got shape {tuple(G.shape)}")
    shape = G.shape
    X = G.to(dtype).reshape(-1, shape[-2], shape[-1])
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for a, b, c in steps:
        A = torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b*A + c*A@A, one rounding (as torch's Muon)
        X = torch.baddbmm(X, B, X, beta=a)  # a*X + B@X
    X = X.mT if tall else X
    return X.reshape(shape)


def is_muon_param(name: str, p: torch.Tensor) -> bool:
    """Muon for projection matrices (2-D, or 3-D stacked experts); AdamW for the rest."""
    if p.dim() < 2:
        return False
    return not name.endswith(("embed_tokens.weight", "lm_head.weight", "position_bias"))


class Muon(torch.optim.Optimizer):
    """Muon with the hybrid Newton-Schulz, Nesterov momentum and RMS-matched updates.

    Param-group options: ``lr``, ``momentum`` (0.95), ``weight_decay`` (0.1),
    ``update_rms`` (0.18), ``ns_steps`` (the coefficient schedule).
    Raises ``ValueError`` for parameters with fewer than 2 dims.
    """

    def __init__(self, params: Iterable, lr: float = 2.7e-4, momentum: float = 0.95, weight_decay: float = 0.1,
                 update_rms: float = 0.18, ns_steps: Sequence[tuple[float, float, float]] = HYBRID_STEPS):
        if lr < 0 or not 0 <= momentum < 1:
            raise ValueError(f"invalid Muon hyper-parameters lr={lr}, momentum={momentum}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      update_rms=update_rms, ns_steps=tuple(ns_steps)))
        for g in self.param_groups:
            for p in g["params"]:
                if p.dim() < 2:
                    raise ValueError(f"Muon takes matrices only; got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            lr, mu, wd, rms = g["lr"], g["momentum"], g["weight_decay"], g["update_rms"]
            # Momentum + Nesterov per parameter, then one batched Newton-Schulz per matrix
            # shape (stacked experts and same-shaped projections of all layers together).
            by_shape: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
                buf = st["momentum_buffer"]
                grad = p.grad.float()
                buf.mul_(mu).add_(grad)
                by_shape.setdefault(tuple(p.shape[-2:]), []).append((p, grad.add(buf, alpha=mu)))
            for (n, m), items in by_shape.items():
                stacked = torch.cat([u.reshape(-1, n, m) for _, u in items])
                O = newton_schulz(stacked, g["ns_steps"]) * (math.sqrt(max(n, m)) * rms)
                start = 0
                for p, u in items:
                    k = u.numel() // (n * m)
                    p.mul_(1 - lr * wd)
                    p.add_(O[start:start + k].view_as(p).to(p.dtype), alpha=-lr)
                    start += k
        return loss


@dataclass
class OptimConfig:
    """Optimizer hyper-parameters (SPEC section 6; V4-Flash values by default)."""

    lr: float = 2.7e-4
    min_lr: float = 2.7e-5
    weight_decay: float = 0.1
    muon_momentum: float = 0.95
    update_rms: float = 0.18
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-20
    warmup_steps: int = 2000
    decay_start: int | None = None  # step where cosine decay begins (None: never)
    total_steps: int | None = None
    use_muon: bool = True  # False: AdamW for everything (the baseline of the Muon benchmark)


class CombinedOptimizer:
    """Muon for matrices + AdamW for the rest, stepped and scheduled together.

    ``set_lr(lr)`` sets the learning rate of both. ``state_dict()`` /
    ``load_state_dict()`` cover both (tensors only + plain numbers).
    """

    def __init__(self, model: nn.Module, cfg: OptimConfig):
        self.cfg = cfg
        muon, adam = [], []
        self.names: dict[int, str] = {}
        for name, p in model.named_parameters():  # frozen ones too: curriculum stages unfreeze them
            self.names[id(p)] = name
            (muon if cfg.use_muon and is_muon_param(name, p) else adam).append(p)
        self.muon = Muon(muon, lr=cfg.lr, momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay,
                         update_rms=cfg.update_rms) if muon else None
        self.adam = torch.optim.AdamW(adam, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                      weight_decay=cfg.weight_decay) if adam else None

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.muon, self.adam) if o is not None]

    def set_lr(self, lr: float) -> None:
        for o in self.optimizers:
            for g in o.param_groups:
                g["lr"] = lr

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict() if self.muon else None,
                "adam": self.adam.state_dict() if self.adam else None}

    def load_state_dict(self, sd: dict) -> None:
        if self.muon is not None:
            self.muon.load_state_dict(sd["muon"])
        if self.adam is not None:
            self.adam.load_state_dict(sd["adam"])


def lr_at(step: int, cfg: OptimConfig, multiplier: float = 1.0) -> float:
    """Warmup (linear from 0) -> constant -> cosine decay to ``min_lr`` between
    ``decay_start`` and ``total_steps``; times the curriculum stage ``multiplier``."""
    if step < cfg.warmup_steps:
        lr = cfg.lr * (step + 1) / cfg.warmup_steps
    elif cfg.decay_start is None or cfg.total_steps is None or step < cfg.decay_start:
        lr = cfg.lr
    else:
        span = max(1, cfg.total_steps - cfg.decay_start)
        t = min(1.0, (step - cfg.decay_start) / span)
        lr = cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))
    return lr * multiplier
