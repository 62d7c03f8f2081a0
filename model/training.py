"""The curriculum's attention modes and the single-process reference of the training objective.

- ``set_attention_mode(module, mode)``: ``dense`` (CSA attends to every visible
  compressed entry), ``indexer_warmup`` (dense attention, main model frozen, the
  Lightning Indexer trained by KL towards the main attention), ``sparse`` (top-k
  gather; indexer input detached, indexer still trained by KL). DeepSeek-V3.2
  section 2.1; DeepSeek-V4 report, training (``docs/training.md``).
- ``compute_losses(model, batch, cfg)``: forward + the whole objective of one batch in
  one process, through the same stage code every training run uses (``PipelineStage.whole``
  and ``model.losses``); tests and benchmarks compare distributed runs with it.

Batches are dicts: ``input_ids [B,S] int64``, ``labels [B,S] int64`` (-100 = ignore),
optional ``doc_ids [B,S] int64`` (packed documents).
"""

from __future__ import annotations

import torch

from .attention import Attention
from .losses import METRIC_KEYS, LossConfig, LossNorms
from .stage import PipelineStage
from .transformer import BlockCall, ForwardAux, Transformer

ATTENTION_MODES = ("dense", "indexer_warmup", "sparse")


def _attentions(module: torch.nn.Module) -> list[Attention]:
    return [m for m in module.modules() if isinstance(m, Attention)]


def indexer_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The Lightning Indexers' parameters (every CSA layer of ``module``)."""
    return [p for a in _attentions(module) if a.compressor is not None and hasattr(a.compressor, "indexer")
            for p in a.compressor.indexer.parameters()]


def set_attention_mode(module: torch.nn.Module, mode: str) -> None:
    """Apply a curriculum attention mode (see module docstring) to a model or a stage.

    ``indexer_warmup`` freezes every parameter but the indexers' (``requires_grad``);
    the other modes make every parameter trainable again.
    Raises ValueError for an unknown mode.
    """
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, got {mode!r}")
    for a in _attentions(module):
        a.dense_csa = mode in ("dense", "indexer_warmup")
        a.indexer_kl = mode in ("indexer_warmup", "sparse")
    ix = {id(p) for p in indexer_parameters(module)}
    for p in module.parameters():
        p.requires_grad_(mode != "indexer_warmup" or id(p) in ix)


def compute_losses(model: Transformer, batch: dict, cfg: LossConfig, *, forced: dict | None = None,
                   call: BlockCall | None = None) -> tuple[torch.Tensor, dict, ForwardAux]:
    """Forward + every training objective of ``batch`` in one process (the reference).

    Returns ``(total_loss, metrics, aux)``: ``total_loss`` is differentiable with the KL already
    normalised by the batch's row count (its gradients need no post-processing); ``metrics``
    holds floats ``loss``, ``ce``, ``mtp``, ``balance``, ``indexer_kl`` (those that apply) and
    ``kl_rows``; ``aux.routing`` every MoE's routing (the MTP block's when ``cfg.mtp_balance``).

    Raises:
        ValueError: ``indexer_warmup`` with no query row that sees a compressed entry.
    """
    stage = PipelineStage.whole(model)
    out, aux = stage(None, batch["input_ids"], batch.get("doc_ids"), forced=forced, call=call)
    rows = float(aux.kl.rows) if aux.kl is not None else 0.0
    loss, sums, routing = stage.losses(out, aux, batch, LossNorms.of(batch), cfg, forced=forced, call=call,
                                       kl_rows=rows if rows > 0 else None)
    totals = {k: sums.get(k, 0.0) for k in METRIC_KEYS}
    metrics = stage.combine_metrics(totals, set(sums), cfg)
    aux.routing = routing
    return loss, metrics, aux


def update_router_biases(model: Transformer, routing: dict, speed: float | None = 1e-3) -> dict[str, float]:
    """The auxiliary-loss-free bias update of every MoE in ``routing`` (``compute_losses``'s
    ``aux.routing``) in one process: ``model.losses.bias_update`` on each MoE's loads.
    Returns ``{"load_cv/<layer>": cv}``."""
    stage = PipelineStage.whole(model)
    return stage.update_router_biases(stage.expert_loads(routing), speed)


__all__ = ["ATTENTION_MODES", "LossConfig", "compute_losses", "indexer_parameters", "set_attention_mode",
           "update_router_biases"]
