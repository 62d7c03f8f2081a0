"""The training objective, written once: every run (one process, or stages x expert shards) uses it.

Terms (DeepSeek-V4 report, training; ``docs/training.md``):

- next-token cross-entropy over labels != -100;
- MTP cross-entropy: row i predicts token i+2 (weight 0.3, 0.1 once the LR decay starts);
  DeepSeek-V3 section 2.2;
- the sequence-wise balance loss of every learned-routing MoE, the MTP block's included
  (weight 1e-4); DeepSeek-V3 eqs. 17-20;
- the Lightning Indexer's KL towards the main attention (``model.attention``);
  DeepSeek-V3.2 section 2.1.

Every term is a *sum* divided by a batch-global count (:class:`LossNorms`), so the partial
sums of microbatches, waves, pipeline stages and expert shards add up to exactly the loss of
the whole batch in one process. The indexer KL is the exception: the rows it is averaged over
are only known once every forward of the step has run, so a stage returns it unnormalised
and its gradients (which reach only the indexers) are divided by the global row count after
backward -- unless the caller already knows that count (``kl_rows=``, one process).

Also here: the auxiliary-loss-free balancing step (DeepSeek-V3 section 2.1.2), applied to
global expert loads, and :func:`combine_metrics`, which turns globally reduced sums into the
step's reported metrics.

Batches are dicts: ``input_ids [B,S] int64``, ``labels [B,S] int64`` (-100 = ignore),
optional ``doc_ids [B,S] int64`` (packed documents).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .moe import Router, Routing

IGNORE = -100
METRIC_KEYS = ("ce", "mtp", "balance", "kl_sum", "kl_rows")


@dataclass
class LossConfig:
    """Weights of the training objectives for one step.

    ``mode``: the curriculum's attention mode (``indexer_warmup`` trains only the KL);
    ``mtp_balance``: the MTP block's MoE gets the balance loss and the bias update too.
    """

    mode: str = "sparse"
    mtp_weight: float = 0.3
    balance_weight: float = 1e-4
    indexer_kl_weight: float = 1.0
    mtp_balance: bool = True


@dataclass
class LossNorms:
    """Batch-global denominators, so that partial sums over microbatches and shards
    add up to the single-process means: ``ce_tokens`` (labels != -100),
    ``mtp_tokens`` (MTP targets != -100), ``sequences`` (for the sequence-wise balance loss)."""

    ce_tokens: int
    mtp_tokens: int
    sequences: int

    @staticmethod
    def of(batch: dict) -> LossNorms:
        """Denominators of a whole (global) batch dict with ``labels [B,S]``."""
        labels = batch["labels"]
        return LossNorms(int((labels != IGNORE).sum()), int((mtp_targets(labels) != IGNORE).sum()),
                         int(labels.shape[0]))


def mtp_targets(labels_BS: torch.Tensor) -> torch.Tensor:
    """MTP targets ``[B, S-1]``: row i predicts token i+2 = ``labels[:, i+1]``, ignored where row
    i's input token i+1 starts another document (``labels[:, i] == -100``)."""
    target = labels_BS[:, 1:].clone()
    target[labels_BS[:, :-1] == IGNORE] = IGNORE
    return target


def token_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy over labels != -100 (float32 logits), a 0-d tensor."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")


def sequence_balance_loss(routing: Routing, batch: int, seq: int) -> torch.Tensor:
    """Sequence-wise balance loss of one routed MoE call (DeepSeek-V3 eqs. 17-20).

    ``routing`` covers ``batch x seq`` tokens. Per sequence: ``f_i = E / (K * T) * #tokens
    choosing i``, ``P_i = mean_t s'_{t,i}`` with ``s'`` the scores normalised over experts;
    loss ``sum_i f_i P_i``, averaged over the sequences (``alpha`` is applied by the caller).
    """
    scores, idx = routing.scores, routing.indices
    E, K = scores.shape[-1], idx.shape[-1]
    s = (scores / scores.sum(-1, keepdim=True).clamp(min=1e-20)).view(batch, seq, E)
    counts = torch.zeros(batch, E, device=scores.device).scatter_add_(
        1, idx.view(batch, seq * K), torch.ones(batch, seq * K, device=scores.device))
    f = counts * E / (K * seq)
    return (f * s.mean(1)).sum(-1).mean()


def expert_load(routing: Routing, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert in one call: ``[n_experts]`` int64."""
    return torch.bincount(routing.indices.reshape(-1), minlength=n_experts)


@torch.no_grad()
def bias_update(gate: Router, load: torch.Tensor, speed: float | None) -> float:
    """Auxiliary-loss-free balancing of one MoE (DeepSeek-V3 section 2.1.2).

    ``load [E]``: the step's *global* tokens per expert. ``b_i += speed * sign(mean_load - load_i)``
    on the selection-only correction bias of a learned router (hash routers and ``speed`` None or
    0: no update). Returns the load's coefficient of variation (std / mean, before the update).
    """
    load = load.float()
    cv = float(load.std(unbiased=False) / load.mean().clamp(min=1e-9))
    if not gate.hashed and speed:
        gate.e_score_correction_bias.add_(speed * torch.sign(load.mean() - load))
    return cv


def combine_metrics(totals: dict[str, float], present: set[str], cfg: LossConfig) -> dict[str, float]:
    """The step's metrics from the batch-global sums of :data:`METRIC_KEYS`.

    ``present``: the terms some part of the batch produced. Returns ``ce``, ``mtp``,
    ``balance``, ``indexer_kl`` (those present), ``loss`` (the weighted total; the KL alone
    in ``indexer_warmup``) and ``kl_rows``.

    Raises:
        ValueError: ``indexer_warmup`` with no query row that sees a compressed entry.
    """
    metrics, total = {}, 0.0
    if "ce" in present:
        metrics["ce"] = totals["ce"]
        total = totals["ce"]
    if "mtp" in present:
        metrics["mtp"] = totals["mtp"]
        total += cfg.mtp_weight * totals["mtp"]
    if "balance" in present:
        metrics["balance"] = totals["balance"]
        total += cfg.balance_weight * totals["balance"]
    rows = totals["kl_rows"]
    if rows > 0:
        kl = totals["kl_sum"] / rows
        metrics["indexer_kl"] = kl
        total = cfg.indexer_kl_weight * kl if cfg.mode == "indexer_warmup" else total + cfg.indexer_kl_weight * kl
    elif cfg.mode == "indexer_warmup":
        raise ValueError("indexer_warmup needs CSA layers with visible compressed entries "
                         "(sequence longer than the CSA compression rate)")
    metrics["loss"] = total
    metrics["kl_rows"] = rows
    return metrics


__all__ = ["IGNORE", "METRIC_KEYS", "LossConfig", "LossNorms", "mtp_targets", "token_ce_sum",
           "sequence_balance_loss", "expert_load", "bias_update", "combine_metrics"]
