"""Decode-state (KV cache) size of a DeepSeek-V4 model: pure arithmetic, no torch.

``cache_bytes(args, context_len)`` counts the bytes one decoding sequence holds per
layer after ``context_len`` tokens, sized for the worst case up to that length.
With ``c = head_dim``, ``r = qk_rope_head_dim``, ``ci = index_head_dim``,
``W = sliding_window``, ``L = context_len`` and ``m`` the layer's compression rate:

- every layer (SWA, CSA, HCA): the sliding-window ring buffer, ``min(L, W)`` kv
  vectors of width ``c`` (K = V, shared-KV MQA, so one vector per token);
- CSA and HCA layers: ``L // m`` compressed kv entries of width ``c``, plus the
  uncompressed tail that does not yet fill a block, ``min(L, m - 1)`` tokens of kv
  AND gate projections, each ``2c`` wide for CSA (series a and b) and ``c`` for HCA;
- CSA layers: the overlap slice, the previous block's ``m`` tokens of the series
  that the next entry reuses (kv and gate, ``c`` each), once ``L >= m``;
- CSA layers, Lightning Indexer: ``L // m`` compressed index keys of width ``ci``,
  with the same tail (``min(L, m - 1)`` tokens, kv and gate, ``2ci`` each) and
  overlap (``m`` tokens, kv and gate, ``ci`` each).

Layouts: ``"fp32"`` / ``"bf16"`` store every element in 4 / 2 bytes. ``"paper"`` is
DeepSeek-V4's storage: compressed kv entries keep their ``c - r`` non-RoPE dims in
FP8 (1 B) and their ``r`` RoPE dims in BF16 (2 B); compressed index keys are FP8
(1 B); the window, tails and overlaps are BF16 (2 B). FP8 scale factors are not
counted.

The reference point is DeepSeek-V3.2's MLA cache: 656 B per token per layer (512
FP8 latent + 64 BF16 RoPE dims + 16 B of scales) over 61 layers. The DeepSeek-V4 report gives V4's
1M-token cache at about 7% (Flash) and 10% (Pro) of V3.2's. V3.2 also caches
132 B/token/layer of FP8 indexer keys (with scale); that total is reported as
``v32_with_indexer_bytes`` (about 50 GB at 2**20 tokens, the figure the report quotes).
"""

from __future__ import annotations

from typing import Any

from model.config import CSA, HCA, SWA, ModelArgs

LAYOUTS = ("fp32", "bf16", "paper")
MLA_V32_BYTES_PER_TOKEN_LAYER = 656
V32_INDEXER_BYTES_PER_TOKEN_LAYER = 132
V32_LAYERS = 61

# Element kinds: how one vector of a component is stored under the "paper" layout.
_KV = "kv"  # compressed kv entry: non-RoPE dims FP8, RoPE dims BF16
_INDEX = "index"  # compressed indexer key: FP8
_RAW = "raw"  # window / tail / overlap: BF16


def _vector_bytes(kind: str, width: int, rope: int, layout: str) -> int:
    """Bytes of one stored vector of ``width`` elements."""
    if layout == "fp32":
        return 4 * width
    if layout == "bf16":
        return 2 * width
    if kind == _KV:
        return (width - rope) * 1 + rope * 2
    if kind == _INDEX:
        return width * 1
    return 2 * width


def _layer_components(args: ModelArgs, layer_type: str, context_len: int) -> list[tuple[str, str, int, int]]:
    """``(component, kind, n_vectors, width)`` rows of one layer's per-sequence decode state."""
    c, ci, L = args.head_dim, args.index_head_dim, context_len
    rows = [("window", _RAW, min(L, args.sliding_window), c)]
    if layer_type == SWA:
        return rows
    m = args.compress_rate(layer_type)
    tail = min(L, m - 1)
    series = 2 if layer_type == CSA else 1  # CSA projects two series (current / previous block)
    rows += [("compressed", _KV, L // m, c),
             ("tail", _RAW, 2 * tail, series * c)]  # kv and gate
    if layer_type == CSA:
        overlap = m if L >= m else 0
        rows += [("overlap", _RAW, 2 * overlap, c),
                 ("indexer_compressed", _INDEX, L // m, ci),
                 ("indexer_tail", _RAW, 2 * tail, 2 * ci),
                 ("indexer_overlap", _RAW, 2 * overlap, ci)]
    return rows


def cache_bytes(args: ModelArgs, context_len: int, batch: int = 1, layout: str = "fp32") -> dict[str, Any]:
    """Bytes of the decode state of ``batch`` sequences of ``context_len`` tokens.

    See the module docstring for what is counted and how each layout stores it.

    Args:
        args: the model's hyper-parameters.
        context_len: tokens processed per sequence (prompt plus generated).
        batch: number of sequences.
        layout: ``"fp32"``, ``"bf16"`` or ``"paper"`` (DeepSeek-V4's FP8/BF16 mix).

    Returns:
        A JSON-serialisable dict: ``total_bytes``; ``per_token_bytes`` (total over
        ``batch * context_len``); ``per_layer_type`` (for each layer type present:
        ``layers``, ``bytes_per_layer``, ``bytes``); ``components`` (bytes per state
        component summed over layers); ``mla_v32_bytes`` (656 B x 61 layers x
        tokens), ``ratio_vs_v32`` (total / mla_v32_bytes), and the same against
        V3.2's cache including its indexer keys (``v32_with_indexer_bytes``,
        ``ratio_vs_v32_with_indexer``). Ratios are ``None`` when ``context_len`` is 0.

    Raises:
        ValueError: ``context_len < 0`` or ``> args.max_position_embeddings``, ``batch < 1``
            or an unknown ``layout``.
    """
    if not isinstance(context_len, int) or isinstance(context_len, bool) or context_len < 0:
        raise ValueError(f"context_len must be an int >= 0, got {context_len!r}")
    if context_len > args.max_position_embeddings:
        raise ValueError(f"context_len {context_len} exceeds the model's max_position_embeddings "
                         f"({args.max_position_embeddings})")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; allowed: {list(LAYOUTS)}")

    rope = args.qk_rope_head_dim
    per_type: dict[str, dict[str, int]] = {}
    components: dict[str, int] = {}
    for lt in (SWA, CSA, HCA):
        n_layers = args.layer_types.count(lt)
        if not n_layers:
            continue
        per_layer = 0
        for name, kind, n_vec, width in _layer_components(args, lt, context_len):
            b = batch * n_vec * _vector_bytes(kind, width, rope, layout)
            per_layer += b
            components[name] = components.get(name, 0) + n_layers * b
        per_type[lt] = {"layers": n_layers, "bytes_per_layer": per_layer, "bytes": n_layers * per_layer}

    total = sum(t["bytes"] for t in per_type.values())
    tokens = batch * context_len
    mla = MLA_V32_BYTES_PER_TOKEN_LAYER * V32_LAYERS * tokens
    v32 = (MLA_V32_BYTES_PER_TOKEN_LAYER + V32_INDEXER_BYTES_PER_TOKEN_LAYER) * V32_LAYERS * tokens
    return {
        "context_len": context_len,
        "batch": batch,
        "layout": layout,
        "total_bytes": total,
        "per_token_bytes": total / tokens if tokens else 0.0,
        "per_layer_type": per_type,
        "components": components,
        "mla_v32_bytes": mla,
        "ratio_vs_v32": total / mla if mla else None,
        "v32_with_indexer_bytes": v32,
        "ratio_vs_v32_with_indexer": total / v32 if v32 else None,
    }


__all__ = ["cache_bytes", "LAYOUTS"]
