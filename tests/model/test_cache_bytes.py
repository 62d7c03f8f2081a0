"""Decode-state accounting (model.cache_bytes) against hand-computed cases."""

from __future__ import annotations

import pytest

from model.cache_bytes import cache_bytes
from model.config import ModelArgs


def test_debug_fp32_by_hand():
    # debug: layers [SWA, CSA, HCA, CSA], head_dim 64, index_head_dim 32, window 32, m=4, m'=16.
    args = ModelArgs.flavor("debug")
    L, f = 100, 4
    window = 32 * 64 * f  # min(100, 32) vectors of 64
    csa = (window
           + 25 * 64 * f  # 100 // 4 compressed entries
           + 3 * 2 * 128 * f  # tail: 3 tokens, kv + gate, 2 series x 64
           + 4 * 2 * 64 * f  # overlap: previous block, kv + gate
           + 25 * 32 * f  # indexer compressed keys
           + 3 * 2 * 64 * f  # indexer tail: 3 tokens, kv + gate, 2 x 32
           + 4 * 2 * 32 * f)  # indexer overlap
    hca = window + 6 * 64 * f + 15 * 2 * 64 * f  # 100 // 16 entries; tail of 15 tokens, kv + gate
    r = cache_bytes(args, L)
    assert r["per_layer_type"]["sliding_attention"] == {"layers": 1, "bytes_per_layer": window, "bytes": window}
    assert r["per_layer_type"]["compressed_sparse_attention"]["bytes_per_layer"] == csa
    assert r["per_layer_type"]["heavily_compressed_attention"]["bytes_per_layer"] == hca
    assert r["total_bytes"] == window + 2 * csa + hca
    assert r["per_token_bytes"] == r["total_bytes"] / L
    assert sum(r["components"].values()) == r["total_bytes"]
    assert r["mla_v32_bytes"] == 656 * 61 * L
    assert r["ratio_vs_v32"] == r["total_bytes"] / (656 * 61 * L)


def test_debug_short_context_by_hand():
    # 10 tokens: window holds 10, CSA has 2 entries + tail 3 + overlap 4, HCA has 0 entries + tail 10.
    args = ModelArgs.flavor("debug")
    f = 2
    window = 10 * 64 * f
    csa = window + 2 * 64 * f + 3 * 2 * 128 * f + 4 * 2 * 64 * f + 2 * 32 * f + 3 * 2 * 64 * f + 4 * 2 * 32 * f
    hca = window + 0 + 10 * 2 * 64 * f
    r = cache_bytes(args, 10, layout="bf16")
    assert r["total_bytes"] == window + 2 * csa + hca
    assert cache_bytes(args, 10, batch=3, layout="bf16")["total_bytes"] == 3 * r["total_bytes"]


def test_debug_paper_layout_by_hand():
    # paper: compressed kv = 48 FP8 + 16 BF16 RoPE dims = 80 B; index keys 32 B; the rest BF16.
    args = ModelArgs.flavor("debug")
    window = 32 * 64 * 2
    csa = window + 25 * 80 + 3 * 2 * 128 * 2 + 4 * 2 * 64 * 2 + 25 * 32 + 3 * 2 * 64 * 2 + 4 * 2 * 32 * 2
    hca = window + 6 * 80 + 15 * 2 * 64 * 2
    assert cache_bytes(args, 100, layout="paper")["total_bytes"] == window + 2 * csa + hca


def test_empty_context():
    r = cache_bytes(ModelArgs.flavor("debug"), 0)
    assert r["total_bytes"] == 0 and r["per_token_bytes"] == 0.0 and r["ratio_vs_v32"] is None


@pytest.mark.parametrize("layout", ["fp32", "bf16", "paper"])
def test_monotone_in_context(layout):
    args = ModelArgs.flavor("debug")
    sizes = [cache_bytes(args, n, layout=layout)["total_bytes"] for n in range(0, 300)]
    assert all(a <= b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    assert sizes[-1] > sizes[0]


def test_layout_ordering():
    args = ModelArgs.flavor("small")
    b = {lay: cache_bytes(args, 4096, layout=lay)["total_bytes"] for lay in ("fp32", "bf16", "paper")}
    assert b["fp32"] == 2 * b["bf16"] > b["bf16"] > b["paper"]


@pytest.mark.parametrize("flavor", ["v4-flash", "v4-pro"])
def test_v4_at_one_million_tokens(flavor):
    r = cache_bytes(ModelArgs.flavor(flavor), 1 << 20, layout="paper")
    print(f"{flavor} @ 1M: {r['total_bytes'] / 2**30:.2f} GiB, ratio_vs_v32={r['ratio_vs_v32']:.4f}, "
          f"with V3.2 indexer={r['ratio_vs_v32_with_indexer']:.4f}")
    assert 0.03 < r["ratio_vs_v32"] < 0.15
    assert r["ratio_vs_v32_with_indexer"] < r["ratio_vs_v32"]


def test_flash_is_smaller_than_pro():
    flash = cache_bytes(ModelArgs.flavor("v4-flash"), 1 << 20, layout="paper")["ratio_vs_v32"]
    pro = cache_bytes(ModelArgs.flavor("v4-pro"), 1 << 20, layout="paper")["ratio_vs_v32"]
    assert flash < pro


@pytest.mark.parametrize("kwargs, match", [
    (dict(context_len=-1), "context_len must be an int >= 0"),
    (dict(context_len=8, layout="fp8"), "unknown layout 'fp8'"),
    (dict(context_len=8, batch=0), "batch must be an int >= 1"),
    (dict(context_len=65537), r"context_len 65537 exceeds the model's max_position_embeddings \(65536\)"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cache_bytes(ModelArgs.flavor("debug"), **kwargs)


def test_context_up_to_max_position_embeddings():
    args = ModelArgs.flavor("debug")
    assert cache_bytes(args, args.max_position_embeddings)["context_len"] == 65536
