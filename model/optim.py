"""Muon + AdamW, as trained in DeepSeek-V4 (docs/training.md §7), and the LR schedule.

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


MUON_BATCH_BYTES = 64 * 2**20  # float32 matrices per batched Newton-Schulz call (bounds the step's temporaries)


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
            mu = g["momentum"]
            # Momentum per parameter, then batched Newton-Schulz per matrix shape (stacked experts and
            # same-shaped projections of all layers together), at most MUON_BATCH_BYTES of float32
            # matrices per batch: the Nesterov updates and Newton-Schulz temporaries of one batch,
            # not of every matrix at once, are what the step holds beyond the state.
            by_shape: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
                buf = st["momentum_buffer"]
                buf.mul_(mu).add_(p.grad.float())
                by_shape.setdefault(tuple(p.shape[-2:]), []).append((p, buf))
            for (n, m), items in by_shape.items():
                per = max(1, MUON_BATCH_BYTES // (n * m * 4))  # matrices per Newton-Schulz batch
                batch: list[tuple[torch.Tensor, torch.Tensor, int, int]] = []  # (param, buf, lo, hi) matrices
                count = 0
                for p, buf in items:
                    k = p.numel() // (n * m)
                    lo = 0
                    while lo < k:
                        hi = min(k, lo + per - count)
                        batch.append((p, buf, lo, hi))
                        count += hi - lo
                        lo = hi
                        if count == per:
                            self._orthogonal_step(batch, n, m, g, mu)
                            batch, count = [], 0
                if batch:
                    self._orthogonal_step(batch, n, m, g, mu)
        return loss

    @staticmethod
    def _orthogonal_step(batch, n: int, m: int, g: dict, mu: float) -> None:
        """One Newton-Schulz batch: matrices ``[lo, hi)`` of each ``(param, momentum buffer, lo, hi)``
        (viewed ``[k, n, m]``) get the Nesterov update ``grad + mu * buf``, orthogonalised, RMS-matched
        and applied with decoupled weight decay."""
        lr, wd, rms = g["lr"], g["weight_decay"], g["update_rms"]
        stacked = torch.cat([p.grad.float().reshape(-1, n, m)[lo:hi].add(buf.reshape(-1, n, m)[lo:hi], alpha=mu)
                             for p, buf, lo, hi in batch])
        ortho = newton_schulz(stacked, g["ns_steps"]) * (math.sqrt(max(n, m)) * rms)
        at = 0
        for p, _, lo, hi in batch:
            view = p.view(-1, n, m)[lo:hi]
            view.mul_(1 - lr * wd)
            view.add_(ortho[at:at + hi - lo].to(p.dtype), alpha=-lr)
            at += hi - lo


@dataclass
class OptimConfig:
    """Optimizer hyper-parameters (docs/training.md §7; V4-Flash values by default)."""

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


def state_bytes(name: str, p: torch.Tensor, cfg: OptimConfig) -> int:
    """Bytes of optimizer state :class:`CombinedOptimizer` keeps for parameter ``name`` once it has
    stepped: Muon one float32 momentum buffer of the parameter's shape; AdamW ``exp_avg`` and
    ``exp_avg_sq`` in the parameter's dtype plus a float32 ``step``. Works on ``meta`` tensors
    (memory planning)."""
    if cfg.use_muon and is_muon_param(name, p):
        return p.numel() * 4
    return 2 * p.numel() * p.element_size() + 4


class CombinedOptimizer:
    """Muon for matrices + AdamW for the rest, stepped and scheduled together.

    ``set_lr(lr)`` sets the learning rate of both. ``state_dict()`` /
    ``load_state_dict()`` cover both (tensors only + plain numbers).

    ``only``: the parameter names this optimizer steps (ZeRO-1: the ones this replica owns,
    ``comm.data_parallel.assign_owners``); default every parameter of ``model``.
    :meth:`zero_grad` clears the gradients of every parameter of ``model`` all the same.
    """

    def __init__(self, model: nn.Module, cfg: OptimConfig, only: Iterable[str] | None = None):
        self.cfg = cfg
        self.model = model
        keep = None if only is None else set(only)
        muon, adam = [], []
        self.names: dict[int, str] = {}
        for name, p in model.named_parameters():  # frozen ones too: curriculum stages unfreeze them
            if keep is not None and name not in keep:
                continue
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
        for p in self.model.parameters():
            p.grad = None

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


# ------------------------------------------------------------- by-name state
_MUON_KEYS = ("momentum_buffer",)
_ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _named_params(opt: CombinedOptimizer) -> dict[str, tuple[torch.optim.Optimizer, torch.Tensor]]:
    """``name -> (inner optimizer, parameter)`` for every parameter ``opt`` steps."""
    out = {}
    for o in opt.optimizers:
        for g in o.param_groups:
            for p in g["params"]:
                out[opt.names[id(p)]] = (o, p)
    return out


def optimizer_state_by_name(opt: CombinedOptimizer) -> dict[str, torch.Tensor]:
    """Every per-parameter state tensor of ``opt``, keyed ``"<param name>::<state key>"``.

    Keys: Muon params ``<name>::momentum_buffer`` (float32, the parameter's shape);
    AdamW params ``<name>::step`` (0-d), ``<name>::exp_avg``, ``<name>::exp_avg_sq``
    (the parameter's shape; ``max_exp_avg_sq`` too with amsgrad). Parameters that
    have no state yet (never stepped) have no keys. Non-tensor state values become
    0-d tensors (``torch.tensor(value)``). Tensors are detached contiguous clones on
    the state's device, so the result does not change when ``opt`` steps again.

    Parameter names are those of ``opt.names`` (the module's ``named_parameters``),
    so the state of a ``PipelineStage`` uses the full model's names and re-shards
    like its model tensors (``model.stage.is_expert_param`` understands the keys).
    Hyper-parameters (lr, betas, ...) are not included: they come from the config.
    """
    out: dict[str, torch.Tensor] = {}
    for name, (o, p) in _named_params(opt).items():
        for key, v in o.state.get(p, {}).items():
            t = v.detach().clone(memory_format=torch.contiguous_format) if isinstance(v, torch.Tensor) \
                else torch.tensor(v)
            out[f"{name}::{key}"] = t
    return out


def load_optimizer_state_by_name(opt: CombinedOptimizer, tensors: dict[str, torch.Tensor]) -> None:
    """Replace the per-parameter state of ``opt`` by ``tensors`` (from ``optimizer_state_by_name``).

    ``tensors`` maps ``"<param name>::<state key>"`` to tensors (any device; they
    are copied, never aliased). Parameters with no key get no state: they start
    fresh, exactly as if never stepped. Restored forms: Muon ``momentum_buffer``
    float32 ``[param shape]``; AdamW ``exp_avg``/``exp_avg_sq`` in the parameter's
    dtype ``[param shape]`` and ``step`` as the float32 0-d tensor torch's AdamW
    keeps (on the parameter's device only when the group is capturable/fused).
    All tensors go to the parameter's device. Hyper-parameters are untouched.
    After loading the state of another optimizer over equal parameters, a step
    gives bit-identical parameters.

    Raises:
        ValueError (nothing is changed then): a key without ``::``; a parameter
            name that ``opt`` does not step (e.g. a tensor of another stage); a
            state key that the parameter's optimizer does not use (e.g. Muon state
            for an AdamW parameter: ``use_muon`` differs); a shape that does not
            match the parameter (``step`` must have one element); an incomplete
            state (AdamW needs ``step``, ``exp_avg``, ``exp_avg_sq``).
    """
    params = _named_params(opt)
    per_param: dict[str, dict[str, torch.Tensor]] = {}
    for full_key, t in tensors.items():
        name, sep, key = full_key.rpartition("::")
        if not sep or not name:
            raise ValueError(f"optimizer state key {full_key!r} is not '<param name>::<state key>'")
        if name not in params:
            raise ValueError(f"optimizer state key {full_key!r}: this optimizer has no parameter {name!r}")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"optimizer state {full_key!r} is a {type(t).__name__}, not a tensor")
        o, p = params[name]
        allowed = _MUON_KEYS if o is opt.muon else _ADAM_KEYS
        if key not in allowed:
            raise ValueError(f"optimizer state key {full_key!r}: {name} is stepped by "
                             f"{type(o).__name__}, whose state keys are {list(allowed)}")
        if key == "step":
            if t.numel() != 1:
                raise ValueError(f"optimizer state {full_key!r} has shape {tuple(t.shape)}, expected a scalar")
        elif t.shape != p.shape:
            raise ValueError(f"optimizer state {full_key!r} has shape {tuple(t.shape)}, "
                             f"parameter {name} has {tuple(p.shape)}")
        per_param.setdefault(name, {})[key] = t
    for name, st in per_param.items():
        o, _ = params[name]
        need = _MUON_KEYS if o is opt.muon else ("step", "exp_avg", "exp_avg_sq")
        missing = [k for k in need if k not in st]
        if missing:
            raise ValueError(f"optimizer state of {name} is incomplete: lacks {missing}")

    for o in opt.optimizers:
        o.state.clear()
        group_of = {id(p): g for g in o.param_groups for p in g["params"]}
        for name, st in per_param.items():
            oo, p = params[name]
            if oo is not o:
                continue
            g = group_of[id(p)]
            new = {}
            for key, t in st.items():
                t = t.detach()
                if key == "step":
                    on_param = g.get("capturable", False) or g.get("fused", False)
                    new[key] = t.reshape(()).to(device=p.device if on_param else "cpu", dtype=torch.float32,
                                                copy=True)
                else:
                    dtype = torch.float32 if o is opt.muon else p.dtype
                    new[key] = t.to(device=p.device, dtype=dtype, copy=True, memory_format=torch.contiguous_format)
            o.state[p] = new
