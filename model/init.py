"""Layout-independent initialisation: every parameter's initial value is a function of
``(seed, its full name)`` alone, so a model split into any actor graph (1 x 1, 2 x 2, 4 x 2)
starts from identical parameters and an actor materialises only the tensors it owns.

Modules declare how each parameter is initialised where they create it:

- :func:`normal_` -- ``N(0, std^2)`` (``per_expert=True`` for routed-expert tensors
  ``[n_experts, ...]``: every expert row is drawn from its own stream, so a shard
  holding experts ``[lo, hi)`` draws only those rows);
- :func:`filled` -- a constant (norm weights 1, hyper-connection biases 0, sinks 0).

The rule is stored on the parameter (attribute ``_tide_init``) and applied at once
unless the parameter lives on the ``meta`` device; :func:`materialize` then turns a
module built on ``meta`` into real tensors on a device: each parameter is drawn with a
``torch.Generator`` seeded from ``sha256("tide-init/<seed>/<name>")`` (expert rows:
``<name>[<global expert id>]``), on the CPU (the same bits on every device), and buffers
are recomputed by their modules' ``reset_buffers`` (rotary tables, hash-routing tables,
router biases: deterministic functions of the config).

A model built directly on the CPU (``Transformer(args)``) still draws from the global
torch RNG in construction order (what tide did before, and what the HF parity tests
use); ``Transformer.build`` / ``PipelineStage.build`` use the per-parameter rule.
Both draw ``N(0, std^2)`` with the same stds (the HF ``initializer_range``, 0.02 for the
hyper-connection mixers), so the two differ only in which normal numbers they draw.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

INIT_ATTR = "_tide_init"
INIT_SCHEMES = ("per_parameter", "sequential")  # how a training run initialises (see the module docstring)

__all__ = ["INIT_ATTR", "INIT_SCHEMES", "normal_", "filled", "init_rule", "param_seed", "materialize"]


def normal_(t: torch.Tensor, std: float, *, per_expert: bool = False) -> torch.Tensor:
    """Declare (and, off ``meta``, apply in place from the global RNG) ``N(0, std^2)`` for ``t``.

    ``per_expert``: ``t`` is ``[n_experts, ...]`` and each row is seeded on its own by
    :func:`materialize`. Returns ``t``.
    """
    setattr(t, INIT_ATTR, ("normal", float(std), bool(per_expert)))
    if t.device.type != "meta":
        nn.init.normal_(t, std=std)
    return t


def filled(shape: int | tuple[int, ...], value: float, dtype: torch.dtype = torch.float32) -> nn.Parameter:
    """A parameter of ``shape`` filled with ``value`` (float32 by default), declared constant."""
    p = nn.Parameter(torch.full((shape,) if isinstance(shape, int) else tuple(shape), float(value), dtype=dtype))
    setattr(p, INIT_ATTR, ("const", float(value), False))
    return p


def init_rule(t: torch.Tensor) -> tuple[str, float, bool] | None:
    """The declared rule ``(kind, value, per_expert)`` of ``t`` (None: none declared)."""
    return getattr(t, INIT_ATTR, None)


def param_seed(seed: int, name: str) -> int:
    """The 63-bit generator seed of the tensor ``name`` under run seed ``seed``."""
    digest = hashlib.sha256(f"tide-init/{int(seed)}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _normal(shape, std: float, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=g)


@torch.no_grad()
def materialize(module: nn.Module, seed: int, device: torch.device | str | None = None, *,
                expert_lo: int = 0, prefix: str = "") -> nn.Module:
    """Give every parameter and buffer of ``module`` (built on ``meta``, or not) its layout-independent value.

    Args:
        module: its parameters carry rules (:func:`normal_`, :func:`filled`); names are
            ``prefix + module.named_parameters()`` names, which must be the full model's
            (``layers.5.self_attn.q_a_proj.weight``) for the values to be layout-independent.
        seed: the run's seed.
        device: where the tensors go (default CPU). Values are drawn on the CPU in float32
            and copied, so they are the same on every device.
        expert_lo: global id of row 0 of the per-expert tensors (an expert shard ``[lo, hi)``).

    Returns:
        ``module`` (materialised in place).

    Raises:
        ValueError: a parameter without a declared rule, or a buffer on ``meta`` whose module
            has no ``reset_buffers`` (it could not be given a value).
    """
    rules = {}
    for name, p in module.named_parameters(prefix=prefix.rstrip(".")):
        rule = init_rule(p)
        if rule is None:
            raise ValueError(f"parameter {name} {tuple(p.shape)} declares no initialisation "
                             f"(model.init.normal_ or model.init.filled where it is created)")
        rules[name] = rule
    orphans = [f"{mn}.{bn}" if mn else bn for mn, m in module.named_modules()
               for bn, b in m.named_buffers(recurse=False) if b.is_meta and not hasattr(m, "reset_buffers")]
    if orphans:
        raise ValueError(f"buffers on the meta device whose module has no reset_buffers(): {orphans[:5]}")
    module.to_empty(device=torch.device(device) if device is not None else torch.device("cpu"))
    for name, p in module.named_parameters(prefix=prefix.rstrip(".")):
        kind, value, per_expert = rule = rules[name]
        setattr(p, INIT_ATTR, rule)
        if kind == "const":
            p.fill_(value)
        elif per_expert:
            for i in range(p.shape[0]):
                p[i].copy_(_normal(p.shape[1:], value, param_seed(seed, f"{name}[{expert_lo + i}]")))
        else:
            p.copy_(_normal(p.shape, value, param_seed(seed, name)))
    for m in module.modules():
        reset = getattr(m, "reset_buffers", None)
        if reset is not None:
            reset()
    return module
