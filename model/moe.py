"""Mixture of experts: shared expert + routed experts (docs/model.md §4).

- Router scores ``s = sqrt(softplus(x W_g^T))`` (float32); selection
  ``topk(s + e_score_correction_bias)`` -- the bias only steers *selection*
  (auxiliary-loss-free balancing, DeepSeek-V3 section 2.1.2); weights are the
  selected ``s`` renormalised to sum 1, times ``routed_scaling_factor``.
- Hash routing (first MoE layers, ``mlp_layer_types == "hash_moe"``): the
  selection is a frozen ``tid2eid[token_id]`` table, weights still from ``s``.
- Experts are SwiGLU with clamp: ``silu(min(gate, L)) * clamp(up, -L, L)``.
- Dispatch is vectorised: token-expert pairs are sorted by expert id and each
  expert runs one GEMM over its contiguous group (grouped-GEMM layout), then a
  single ``index_add`` combines the weighted results.

Letters: N tokens, D hidden, E experts, K experts per token, I expert width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelArgs
from .init import normal_


@dataclass
class Routing:
    """What one MoE call routed: returned by ``MoE.forward`` (never stored on the module).

    Attributes:
        scores: router scores ``[N, E]`` float32, before the selection bias (the
            balance loss's ``s``, DeepSeek-V3 eq. 19).
        indices: selected experts ``[N, K]`` int64 (global expert ids).
        learned: False for hash routing (``tid2eid``): such layers get neither the
            bias update nor the balance loss.
    """

    scores: torch.Tensor
    indices: torch.Tensor
    learned: bool


def score_fn(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Router scoring function (float32 in, float32 out)."""
    if kind == "sqrtsoftplus":
        return F.softplus(logits).sqrt()
    if kind == "sigmoid":
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=-1)


class Router(nn.Module):
    """Top-k (learned) or hash router. ``forward(x [N,D], token_ids [N] | None)``
    returns ``(scores [N,E] f32, weights [N,K] f32, indices [N,K] int64)``."""

    def __init__(self, args: ModelArgs, hashed: bool):
        super().__init__()
        self.hashed = hashed
        self.top_k = args.num_experts_per_tok
        self.n_experts = args.n_routed_experts
        self.scoring = args.scoring_func
        self.norm_topk = args.norm_topk_prob
        self.scaling = args.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.hidden_size))
        normal_(self.weight, args.initializer_range)
        self.vocab_size = args.vocab_size
        if hashed:
            self.register_buffer("tid2eid", self._hash_table(None))  # the ambient device (meta builds)
        else:
            self.register_buffer("e_score_correction_bias", torch.zeros(args.n_routed_experts, dtype=torch.float32))

    def _hash_table(self, device) -> torch.Tensor:
        """The default frozen token -> experts table ``[vocab, K]`` int64 (checkpoints overwrite it):
        a multiplicative hash picks a start expert, the token takes K consecutive (distinct) experts."""
        start = (torch.arange(self.vocab_size, dtype=torch.long, device=device) * 2654435761) % self.n_experts
        return (start[:, None] + torch.arange(self.top_k, device=device)) % self.n_experts

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Initial buffer values on the buffers' device (``model.init.materialize``)."""
        if self.hashed:
            self.tid2eid.copy_(self._hash_table(self.tid2eid.device))
        else:
            self.e_score_correction_bias.zero_()

    def forward(self, x_ND: torch.Tensor, token_ids_N: torch.Tensor | None = None,
                forced_indices_NK: torch.Tensor | None = None):
        """``forced_indices_NK``: use these experts instead of selecting (anticipatory routing);
        the weights still come from the current scores."""
        logits = F.linear(x_ND.float(), self.weight.float())
        scores = score_fn(logits, self.scoring)
        if forced_indices_NK is not None and not self.hashed:
            indices = forced_indices_NK.to(scores.device).long()
        elif self.hashed:
            if token_ids_N is None:
                raise ValueError("hash-routed MoE layer needs the token ids (input_ids)")
            indices = self.tid2eid[token_ids_N].long()
        else:
            indices = torch.topk(scores + self.e_score_correction_bias, self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, indices)
        if self.norm_topk:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return scores, weights * self.scaling, indices


class Experts(nn.Module):
    """Routed expert weights as 3-D tensors (HF layout):
    ``gate_up_proj [E, 2I, D]`` (gate rows first), ``down_proj [E, D, I]``."""

    def __init__(self, n_experts: int, hidden: int, inter: int, limit: float, std: float):
        super().__init__()
        self.limit = limit
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, inter))
        normal_(self.gate_up_proj, std, per_expert=True)
        normal_(self.down_proj, std, per_expert=True)

    def forward(self, x_ND: torch.Tensor, indices_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
        """Vectorised dispatch/combine: ``sum_k w[n,k] * expert_{idx[n,k]}(x[n])`` -> ``[N, D]``.

        The tokens per expert are read on the host (``counts``): the one synchronisation left in the
        forward, because a grouped GEMM over variable-size groups needs its group sizes (as an
        all-to-all needs its split sizes, ``comm.expert_parallel``); a device-side grouped-GEMM
        kernel taking offsets would remove it.
        """
        N, K = indices_NK.shape
        flat_e = indices_NK.reshape(-1)
        order = torch.argsort(flat_e, stable=True)
        token_of = order // K
        counts = torch.bincount(flat_e, minlength=self.gate_up_proj.shape[0]).tolist()
        w_sorted = weights_NK.reshape(-1)[order].to(x_ND.dtype)
        y = self.grouped(x_ND[token_of], counts, self.gate_up_proj, self.down_proj) * w_sorted.unsqueeze(-1)
        return torch.zeros_like(x_ND).index_add_(0, token_of, y)

    def grouped(self, x_sorted: torch.Tensor, counts: list[int], gate_up: torch.Tensor,
                down: torch.Tensor) -> torch.Tensor:
        """Unweighted expert outputs for rows grouped by expert (grouped-GEMM layout).

        ``x_sorted [R, D]``: ``counts[e]`` consecutive rows for local expert ``e``
        (``sum(counts) == R``); ``gate_up [E', 2I, D]``, ``down [E', D, I]`` the weights
        to use (this module's, or detached copies in the expert-parallel backward).
        Returns ``[R, D]`` in the same row order.
        """
        outs = []
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            xs = x_sorted[start:start + c]
            gate, up = F.linear(xs, gate_up[e]).chunk(2, dim=-1)
            h = F.silu(gate.clamp(max=self.limit)).mul_(up.clamp(min=-self.limit, max=self.limit))
            outs.append(F.linear(h, down[e]))
            start += c
        return torch.cat(outs, dim=0) if outs else x_sorted[:0]


class SharedExpert(nn.Module):
    """Always-on SwiGLU expert with the same clamp (HF ``DeepseekV4MLP``)."""

    def __init__(self, hidden: int, inter: int, limit: float, std: float):
        super().__init__()
        self.limit = limit
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        for m in (self.gate_proj, self.up_proj, self.down_proj):
            normal_(m.weight, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x).clamp(max=self.limit)
        up = self.up_proj(x).clamp(min=-self.limit, max=self.limit)
        return self.down_proj(F.silu(gate) * up)


class MoE(nn.Module):
    """Shared + routed experts for one layer. ``forward(x [B,S,D], input_ids [B,S], forced_indices)``
    returns ``(out [B,S,D], Routing)``: the routing is a return value, so a recomputed
    forward (activation checkpointing) neither changes nor repeats it.

    Anticipatory routing (DeepSeek-V4 report, training stability; ``docs/training.md``):
    ``forced_indices [N,K]`` makes the call use routing indices computed earlier (with
    older parameters) instead of selecting; the weights still come from the current scores.

    Expert parallelism: set ``expert_parallel`` to a callable ``(x [N,D], indices
    [N,K] global expert ids, weights [N,K], experts) -> [N,D]`` (e.g.
    ``comm.expert_parallel.ExpertParallel``) and give ``experts`` only this shard's
    experts; the routed computation is delegated to it (dispatch / combine across
    the expert-parallel group). ``None`` (default): all experts are local."""

    def __init__(self, args: ModelArgs, hashed: bool):
        super().__init__()
        self.gate = Router(args, hashed)
        self.experts = Experts(args.n_routed_experts, args.hidden_size, args.moe_intermediate_size,
                               args.swiglu_limit, args.initializer_range)
        self.shared_experts = (SharedExpert(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts,
                                            args.swiglu_limit, args.initializer_range)
                               if args.n_shared_experts > 0 else None)
        self.expert_parallel = None

    def forward(self, x_BSD: torch.Tensor, input_ids: torch.Tensor | None = None,
                forced_indices: torch.Tensor | None = None) -> tuple[torch.Tensor, Routing]:
        """``x [B,S,D]``, ``input_ids [B,S]`` (hash routing), ``forced_indices [B*S, K]`` or None.

        Raises ValueError when ``forced_indices`` does not have one row per token.
        """
        B, S, D = x_BSD.shape
        flat = x_BSD.reshape(-1, D)
        ids = input_ids.reshape(-1) if input_ids is not None else None
        if forced_indices is not None and forced_indices.shape[0] != flat.shape[0]:
            raise ValueError(f"forced routing has {forced_indices.shape[0]} rows for {flat.shape[0]} tokens")
        scores, weights, indices = self.gate(flat, ids, forced_indices)
        if self.expert_parallel is not None:
            out = self.expert_parallel(flat, indices, weights, self.experts).view(B, S, D)
        else:
            out = self.experts(flat, indices, weights).view(B, S, D)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x_BSD)
        return out, Routing(scores, indices, not self.gate.hashed)
