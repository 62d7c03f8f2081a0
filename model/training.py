"""Training losses and per-step recipe pieces (SPEC sections 4-7), stage-agnostic.

- ``set_attention_mode(model, mode)``: the curriculum's attention mode --
  ``dense`` (CSA attends to every visible compressed entry), ``indexer_warmup``
  (dense attention, main model frozen, the Lightning Indexer trained by KL towards
  the main attention), ``sparse`` (top-k gather; indexer input detached, indexer
  still trained by KL). DeepSeek-V3.2 section 2.1 / V4 report section 4.
- ``compute_losses(model, batch, cfg)``: next-token cross-entropy, MTP loss
  (predict t+2, weight 0.3 -> 0.1 once LR decay starts), the sequence-wise balance
  loss (DeepSeek-V3 eqs. 17-20, alpha 1e-4) and the indexer KL.
- ``update_router_biases(model, speed)``: auxiliary-loss-free balancing
  (DeepSeek-V3 section 2.1.2): after each step, ``b_i += speed * sign(mean_load -
  load_i)`` on the selection-only correction bias; returns the per-layer expert
  load coefficient of variation.

Batches are dicts: ``input_ids [B,S] int64``, ``labels [B,S] int64`` (-100 =
ignore), optional ``doc_ids [B,S] int64`` (packed documents).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import Attention
from .moe import MoE
from .transformer import Transformer

ATTENTION_MODES = ("dense", "indexer_warmup", "sparse")
IGNORE = -100


@dataclass
class LossConfig:
    """Weights of the training objectives for one step."""

    mode: str = "sparse"
    mtp_weight: float = 0.3
    balance_weight: float = 1e-4
    indexer_kl_weight: float = 1.0


def _attentions(model: Transformer) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def indexer_parameters(model: Transformer) -> list[torch.nn.Parameter]:
    """The Lightning Indexers' parameters (every CSA layer)."""
    return [p for a in _attentions(model) if a.compressor is not None and hasattr(a.compressor, "indexer")
            for p in a.compressor.indexer.parameters()]


def set_attention_mode(model: Transformer, mode: str) -> None:
    """Apply a curriculum attention mode (see module docstring).

    ``indexer_warmup`` freezes every parameter but the indexers' (``requires_grad``);
    the other modes make every parameter trainable again.
    Raises ValueError for an unknown mode.
    """
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, got {mode!r}")
    for a in _attentions(model):
        a.dense_csa = mode in ("dense", "indexer_warmup")
        a.indexer_kl = mode in ("indexer_warmup", "sparse")
    ix = {id(p) for p in indexer_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(mode != "indexer_warmup" or id(p) in ix)


def _reset_kl(model: Transformer) -> None:
    for a in _attentions(model):
        a.kl_sum, a.kl_rows = None, 0


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy over labels != -100 (float32)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)


def sequence_balance_loss(moe: MoE, batch: int, seq: int) -> torch.Tensor:
    """Sequence-wise balance loss of one routed MoE layer (DeepSeek-V3 eqs. 17-20).

    Per sequence: ``f_i = E / (K * T) * #tokens choosing i``, ``P_i = mean_t s'_{t,i}``
    with ``s'`` the scores normalised over experts; loss ``sum_i f_i P_i``, averaged
    over the batch (``alpha`` is applied by the caller).
    """
    scores, idx = moe.last_scores, moe.last_indices
    E, K = scores.shape[-1], idx.shape[-1]
    s = (scores / scores.sum(-1, keepdim=True).clamp(min=1e-20)).view(batch, seq, E)
    counts = torch.zeros(batch, E, device=scores.device).scatter_add_(
        1, idx.view(batch, seq * K), torch.ones(batch, seq * K, device=scores.device))
    f = counts * E / (K * seq)
    return (f * s.mean(1)).sum(-1).mean()


def compute_losses(model: Transformer, batch: dict, cfg: LossConfig) -> tuple[torch.Tensor, dict]:
    """Forward + every training objective. Returns ``(total_loss, metrics)``.

    In ``indexer_warmup`` the total is the indexer KL only (the main model is frozen);
    otherwise ``ce + mtp_weight * mtp + balance_weight * balance + kl``.
    ``metrics`` holds floats: ``loss``, ``ce``, ``mtp``, ``balance``, ``indexer_kl``.
    """
    ids, labels = batch["input_ids"], batch["labels"]
    docs = batch.get("doc_ids")
    B, S = ids.shape
    _reset_kl(model)
    h = model.forward_hidden(ids, doc_ids=docs)
    logits = model.lm_head(model.norm(h))
    ce = cross_entropy(logits, labels)
    metrics = {"ce": ce.item()}
    total = ce
    if cfg.mtp_weight > 0 and len(model.mtp) and S > 2:
        mtp_logits = model.mtp_logits(h, ids, docs)  # row i predicts token i+2 = labels[:, i+1]
        target = labels[:, 1:].clone()
        target[labels[:, :-1] == IGNORE] = IGNORE  # row i's input token i+1 starts another document
        mtp = cross_entropy(mtp_logits, target)
        metrics["mtp"] = float((mtp).detach())
        total = total + cfg.mtp_weight * mtp
    if cfg.balance_weight > 0:
        routed = [m for m in model.layers.modules() if isinstance(m, MoE) and not m.gate.hashed]
        if routed:
            bal = torch.stack([sequence_balance_loss(m, B, S) for m in routed]).sum()
            metrics["balance"] = float((bal).detach())
            total = total + cfg.balance_weight * bal
    kls = [(a.kl_sum, a.kl_rows) for a in _attentions(model) if a.kl_sum is not None and a.kl_rows]
    if kls:
        kl = sum(k for k, _ in kls) / sum(n for _, n in kls)
        metrics["indexer_kl"] = float((kl).detach())
        total = cfg.indexer_kl_weight * kl if cfg.mode == "indexer_warmup" else total + cfg.indexer_kl_weight * kl
    elif cfg.mode == "indexer_warmup":
        raise ValueError("indexer_warmup needs CSA layers with visible compressed entries "
                         "(sequence longer than the CSA compression rate)")
    _reset_kl(model)
    metrics["loss"] = float((total).detach())
    return total, metrics


@torch.no_grad()
def update_router_biases(model: Transformer, speed: float = 1e-3) -> dict[str, float]:
    """Auxiliary-loss-free balancing step on every learned-routing MoE layer.

    Uses the routing of the last forward (``MoE.last_indices``):
    ``bias_i += speed * sign(mean_load - load_i)``. Returns ``{"load_cv/<layer>": cv}``
    (std / mean of the per-expert token counts, before the update).
    """
    out = {}
    for i, blk in enumerate(model.layers):
        moe = blk.mlp
        if moe.last_indices is None:
            continue
        E = moe.gate.n_experts
        load = torch.bincount(moe.last_indices.reshape(-1), minlength=E).float()
        out[f"load_cv/{i}"] = float(load.std(unbiased=False) / load.mean().clamp(min=1e-9))
        if not moe.gate.hashed and speed > 0:
            moe.gate.e_score_correction_bias.add_(speed * torch.sign(load.mean() - load))
    return out
