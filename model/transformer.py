"""The DeepSeek-V4 decoder: embedding -> N x (mHC-wrapped attention + MoE) -> hyper-head -> LM head, plus MTP.

Parameter names mirror ``transformers.DeepseekV4ForCausalLM`` (without its
``model.`` prefix) so checkpoints map one to one (see ``model.hf_io``).

Letters: B batch, S sequence, N hc streams, E hidden, V vocab.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .attention import Attention, IndexerKL
from .config import SWA, ModelArgs
from .init import materialize, normal_
from .inputs import check_shapes, check_tokens
from .layers import HyperConnection, HyperHead, RMSNorm
from .moe import MoE, Routing
from .state import ModelState, advance, check_rows, layer_state, start_positions

DEFAULT_PREFILL_CHUNK = 2048


@dataclass
class ForwardAux:
    """What a training forward returns besides activations (nothing of it is kept on modules).

    Attributes:
        routing: per MoE, keyed by the owner's parameter prefix (``"layers.3"``,
            ``"mtp.0"``): its ``Routing`` (scores and selected experts).
        kl: the indexer-training KL summed over this forward's CSA layers, or None.
    """

    routing: dict[str, Routing] = field(default_factory=dict)
    kl: IndexerKL | None = None

    def add(self, name: str, routing: Routing, kl: IndexerKL | None = None) -> None:
        self.routing[name] = routing
        if kl is not None:
            self.kl = kl + self.kl


# ``call(block, *args)`` runs one block; the default calls it. Activation checkpointing passes
# ``model.remat.checkpointed`` (recompute the block in backward), from outside the model.
BlockCall = Callable[..., tuple]


def run_blocks(blocks: Iterable[tuple[str, Block]], streams_BSNE: torch.Tensor, input_ids: torch.Tensor,
               pos0=0, state=None, doc_ids: torch.Tensor | None = None,
               forced: Mapping[str, torch.Tensor] | None = None, call: BlockCall | None = None,
               aux: ForwardAux | None = None) -> tuple[torch.Tensor, ForwardAux]:
    """The layer-running path shared by ``Transformer`` and ``model.stage.PipelineStage``.

    Args:
        blocks: ``(name, Block)`` in order; ``name`` (``"layers.<i>"``) keys ``forced``
            and the returned routing. ``state`` (a ``ModelState`` of these blocks, a list
            of per-row states, or None) is indexed by position in ``blocks``.
        streams_BSNE: hc streams ``[B,S,N,E]``; ``input_ids [B,S]`` (hash routing).
        forced: anticipatory routing: ``name -> [B*S, K]`` expert ids to use instead of selecting.
        call: ``call(block, *args)`` instead of ``block(*args)`` (activation checkpointing).
        aux: add to this ``ForwardAux`` (default: a new one).
    Returns:
        ``(streams [B,S,N,E], aux)``.
    """
    aux = ForwardAux() if aux is None else aux
    for j, (name, blk) in enumerate(blocks):
        args = (streams_BSNE, input_ids, pos0, layer_state(state, j), doc_ids,
                None if forced is None else forced.get(name))
        streams_BSNE, routing, kl = blk(*args) if call is None else call(blk, *args)
        aux.add(name, routing, kl)
    return streams_BSNE, aux


class Block(nn.Module):
    """One decoder layer: ``X <- mHC(attention)``, then ``X <- mHC(MoE)`` (report section 2; ``docs/model.md``)."""

    def __init__(self, args: ModelArgs, layer_type: str, mlp_type: str):
        super().__init__()
        E = args.hidden_size
        self.self_attn = Attention(args, layer_type)
        self.mlp = MoE(args, hashed=mlp_type == "hash_moe")
        self.input_layernorm = RMSNorm(E, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(E, args.rms_norm_eps)
        hc = dict(hidden_size=E, hc_mult=args.hc_mult, sinkhorn_iters=args.hc_sinkhorn_iters,
                  hc_eps=args.hc_eps, norm_eps=args.rms_norm_eps)
        self.attn_hc = HyperConnection(**hc)
        self.ffn_hc = HyperConnection(**hc)

    def forward(self, streams_BSNE: torch.Tensor, input_ids: torch.Tensor | None, pos0: int = 0,
                state=None, doc_ids: torch.Tensor | None = None, forced_indices: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, Routing, IndexerKL | None]:
        """``(streams [B,S,N,E], the MoE's Routing, the attention's IndexerKL or None)``."""
        post, comb, x = self.attn_hc(streams_BSNE)
        a, kl = self.self_attn(self.input_layernorm(x), pos0, state, doc_ids)
        streams_BSNE = HyperConnection.merge(streams_BSNE, a, post, comb)
        post, comb, x = self.ffn_hc(streams_BSNE)
        m, routing = self.mlp(self.post_attention_layernorm(x), input_ids, forced_indices)
        return HyperConnection.merge(streams_BSNE, m, post, comb), routing, kl


class MTPBlock(nn.Module):
    """Multi-token prediction module, depth 1 (DeepSeek-V3 section 2.2, docs/model.md §5).

    At position i it combines the main model's hidden state ``h_i`` (after the
    hyper-head, before the final norm) with the embedding of token ``t_{i+1}``:
    ``x = eh_proj([enorm(emb(t_{i+1})); hnorm(h_i)])``, runs one sliding-window
    decoder block on ``hc_mult`` copies of x, collapses with its own hyper-head
    and norm, and predicts ``t_{i+2}`` with the shared LM head.
    Checkpoint keys: ``mtp.0.*`` (ignored by ``transformers`` on load).
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        E = args.hidden_size
        self.hc_mult = args.hc_mult
        self.enorm = RMSNorm(E, args.rms_norm_eps)
        self.hnorm = RMSNorm(E, args.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * E, E, bias=False)
        normal_(self.eh_proj.weight, args.initializer_range)
        self.block = Block(args, SWA, "moe")
        self.hc_head = HyperHead(E, args.hc_mult, args.hc_eps, args.rms_norm_eps)
        self.norm = RMSNorm(E, args.rms_norm_eps)

    def forward(self, hidden_BSE: torch.Tensor, next_emb_BSE: torch.Tensor, next_ids: torch.Tensor,
                pos0: int = 0, state=None, doc_ids: torch.Tensor | None = None,
                forced_indices: torch.Tensor | None = None, call: BlockCall | None = None
                ) -> tuple[torch.Tensor, Routing]:
        """``(normalised MTP hidden [B,S,E], its MoE's Routing)``; apply the LM head for logits."""
        x = self.eh_proj(torch.cat([self.enorm(next_emb_BSE), self.hnorm(hidden_BSE)], dim=-1))
        streams = x.unsqueeze(2).expand(-1, -1, self.hc_mult, -1).contiguous()
        args = (streams, next_ids, pos0, state, doc_ids, forced_indices)
        streams, routing, _ = self.block(*args) if call is None else call(self.block, *args)  # SWA: no KL
        return self.norm(self.hc_head(streams)), routing


class Transformer(nn.Module):
    """DeepSeek-V4 causal LM (logit-for-logit with ``transformers.DeepseekV4ForCausalLM``).

    ``forward(input_ids [B,S] int64) -> logits [B,S,V]`` float (the parameters' dtype).
    Pass a ``ModelState`` (``new_state``) to continue a sequence (decode or
    chunked prefill): positions start at ``state.pos`` and the state advances.
    A list of batch-1 ``ModelState``s, one per row, runs a ragged batch: every row
    continues its own sequence from its own position (continuous batching).
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        E = args.hidden_size
        self.embed_tokens = nn.Embedding(args.vocab_size, E)
        normal_(self.embed_tokens.weight, args.initializer_range)
        self.layers = nn.ModuleList(
            Block(args, lt, mt) for lt, mt in zip(args.layer_types, args.mlp_layer_types, strict=True))
        self.hc_head = HyperHead(E, args.hc_mult, args.hc_eps, args.rms_norm_eps)
        self.norm = RMSNorm(E, args.rms_norm_eps)
        self.lm_head = nn.Linear(E, args.vocab_size, bias=False)
        normal_(self.lm_head.weight, args.initializer_range)
        self.mtp = nn.ModuleList(MTPBlock(args) for _ in range(args.num_nextn_predict_layers))

    @classmethod
    def build(cls, args: ModelArgs, seed: int = 0, device: torch.device | str | None = None) -> Transformer:
        """The whole model with layout-independent initial values (``model.init``): built on
        ``meta``, then every tensor drawn from ``(seed, its name)`` on ``device`` (default CPU).

        Equals, tensor for tensor, the union of ``PipelineStage.build`` stages of any layout
        with the same seed. (``Transformer(args)`` instead draws from the global RNG in
        construction order.)
        """
        with meta_device():
            model = cls(args)
        return materialize(model, seed, device)

    # ------------------------------------------------------------------ state
    def new_state(self, batch: int = 1, dtype: torch.dtype | None = None, device=None) -> ModelState:
        """An empty decode state for ``batch`` sequences (see ``model.state``)."""
        p = self.embed_tokens.weight
        dtype, device = dtype or p.dtype, device or p.device
        st = ModelState([blk.self_attn.new_state(batch, dtype, device) for blk in self.layers])
        if len(self.mtp):
            st.mtp = self.mtp[0].block.self_attn.new_state(batch, dtype, device)
        return st

    # ---------------------------------------------------------------- forward
    def forward_hidden(self, input_ids: torch.Tensor, state: ModelState | None = None,
                       doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states after the hyper-head, before the final norm: ``[B,S,E]``.

        ``doc_ids [B,S]`` (optional, training): non-decreasing document ids of packed
        sequences; tokens attend only within their document (sample-level masking).
        Token values are not checked here (that would synchronise with the device on
        every call): validate a batch or request once with ``model.inputs.check_tokens``.
        """
        return self.run(input_ids, state, doc_ids)[0]

    def run(self, input_ids: torch.Tensor, state: ModelState | None = None, doc_ids: torch.Tensor | None = None,
            *, forced: Mapping[str, torch.Tensor] | None = None, call: BlockCall | None = None
            ) -> tuple[torch.Tensor, ForwardAux]:
        """``forward_hidden`` that also returns the ``ForwardAux`` (routing per MoE, indexer KL).

        ``forced`` / ``call``: see ``run_blocks``. Raises ValueError for inputs whose shape,
        dtype or positions are wrong (checked on the host, no device synchronisation).
        """
        check_shapes(input_ids, doc_ids)
        check_rows(state, input_ids.shape[0], input_ids.shape[1], self.args.max_position_embeddings)
        if input_ids.shape[1] > self.args.max_position_embeddings:
            raise ValueError(f"sequence reaches position {input_ids.shape[1]}, beyond "
                             f"max_position_embeddings = {self.args.max_position_embeddings}")
        pos0 = start_positions(state)
        x = self.embed_tokens(input_ids)
        streams = x.unsqueeze(2).expand(-1, -1, self.args.hc_mult, -1).contiguous()
        streams, aux = run_blocks(((f"layers.{i}", blk) for i, blk in enumerate(self.layers)), streams, input_ids,
                                  pos0, state, doc_ids, forced, call)
        advance(state, input_ids.shape[1])
        return self.hc_head(streams), aux

    def forward(self, input_ids: torch.Tensor, state: ModelState | None = None,
                logits_to_keep: int = 0, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, S, V]`` (or ``[B, logits_to_keep, V]`` for the last positions)."""
        h = self.forward_hidden(input_ids, state, doc_ids)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.lm_head(self.norm(h))

    def mtp_logits(self, hidden_BSE: torch.Tensor, input_ids: torch.Tensor,
                   doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """MTP logits ``[B, S-1, V]``: row i predicts token ``i+2`` from ``h_i`` and token ``i+1``."""
        if not len(self.mtp):
            raise ValueError("this model has num_nextn_predict_layers = 0 (no MTP module)")
        nxt = input_ids[:, 1:]
        docs = doc_ids[:, :-1] if doc_ids is not None else None
        h, _ = self.mtp[0](hidden_BSE[:, :-1], self.embed_tokens(nxt), nxt, doc_ids=docs)
        return self.lm_head(h)

    # -------------------------------------------------------------- inference
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, state: ModelState,
                chunk_size: int = DEFAULT_PREFILL_CHUNK) -> torch.Tensor:
        """Feed a prompt through ``state`` in chunks of ``chunk_size`` tokens (memory
        O(chunk) + state); returns the last position's logits ``[B, V]``."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        check_tokens(input_ids, self.args.vocab_size)
        logits = None
        for s in range(0, input_ids.shape[1], chunk_size):
            logits = self.forward(input_ids[:, s:s + chunk_size], state, logits_to_keep=1)
        if logits is None:
            raise ValueError("prefill needs at least one token")
        return logits[:, -1]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 eos_token_id: int | None = None, chunk_size: int = DEFAULT_PREFILL_CHUNK,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Greedy (``temperature=0``) or sampled continuation: returns ``[B, S + new]`` int64."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a torch.LongTensor [batch, seq]")
        state = self.new_state(input_ids.shape[0])
        logits = self.prefill(input_ids, state, chunk_size)
        out = [input_ids]
        for _ in range(max_new_tokens):
            if temperature > 0:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            else:
                nxt = logits.argmax(dim=-1, keepdim=True)
            out.append(nxt)
            if eos_token_id is not None and bool((nxt == eos_token_id).all()):
                break
            logits = self.forward(nxt, state)[:, -1]
        return torch.cat(out, dim=1)

    # ------------------------------------------------------------- reporting
    def num_params(self) -> dict[str, int]:
        """Parameter counts: ``total`` (without MTP), ``active`` per token (routed experts
        counted ``k/E``, embedding and head included), ``mtp`` (the MTP module).
        Works on the ``meta`` device (no memory is allocated)."""
        mtp = sum(p.numel() for p in self.mtp.parameters())
        total = sum(p.numel() for p in self.parameters()) - mtp
        routed = sum(p.numel() for n, p in self.layers.named_parameters() if ".experts." in n)
        frac = self.args.num_experts_per_tok / self.args.n_routed_experts
        active = total - routed + int(routed * frac)
        return {"total": total, "active": active, "mtp": mtp}

    def set_dense_csa(self, dense: bool) -> None:
        """Dense mode: CSA layers attend to every visible compressed entry (curriculum stage 1)."""
        for blk in self.layers:
            blk.self_attn.dense_csa = dense


@contextlib.contextmanager
def meta_device():
    """Build modules on the ``meta`` device (shape/memory accounting of v4-flash / v4-pro)."""
    with torch.device("meta"):
        yield
