"""CSA really is sparse; the decode state is bounded and matches the cache-bytes accounting."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model import ModelArgs, Transformer
from model import attention as attention_mod
from model.cache_bytes import cache_bytes
from model.config import CSA


def _csa_model(dense: bool = False) -> Transformer:
    torch.manual_seed(0)
    args = ModelArgs.flavor("debug", num_hidden_layers=1, layer_types=[CSA], mlp_layer_types=["moe"],
                            index_topk=8, index_n_heads=16)
    m = Transformer(args).eval()
    m.set_dense_csa(dense)
    return m


def _poisoned_decode(model: Transformer, monkeypatch) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Prefill 200 tokens, then decode one token twice: once as is, once with every
    compressed entry the indexer did NOT select replaced by NaN."""
    ids = torch.randint(0, model.args.vocab_size, (1, 201), generator=torch.Generator().manual_seed(1))
    st = model.new_state(1)
    with torch.no_grad():
        model(ids[:, :200], st)
    picked: list[torch.Tensor] = []
    real_select = attention_mod.Indexer.select

    def recording_select(self, scores, q_pos, allowed=None):
        idx, valid = real_select(self, scores, q_pos, allowed)
        picked.append(idx[valid])
        return idx, valid

    monkeypatch.setattr(attention_mod.Indexer, "select", recording_select)
    clean_state = copy.deepcopy(st)
    with torch.no_grad():
        clean = model(ids[:, 200:], clean_state)
    comp = st.layers[0].compressor.comp
    selected = set(picked[-1].tolist()) if picked else set()
    unselected = [j for j in range(comp.n) if j not in selected]
    comp._buf[:, unselected] = float("nan")
    with torch.no_grad():
        poisoned = model(ids[:, 200:], st)
    return clean, poisoned, len(unselected)


def test_csa_decode_never_reads_unselected_entries(monkeypatch):
    model = _csa_model()
    clean, poisoned, n_poisoned = _poisoned_decode(model, monkeypatch)
    assert n_poisoned >= 40  # 50 entries exist, top-8 are read
    assert torch.isfinite(poisoned).all()
    assert torch.equal(clean, poisoned)


def test_dense_mode_does_read_them_so_the_poison_test_can_fail(monkeypatch):
    model = _csa_model(dense=True)
    _, poisoned, _ = _poisoned_decode(model, monkeypatch)
    assert torch.isnan(poisoned).any()


def _attend_flops(n_entries: int, sparse: bool) -> int:
    torch.manual_seed(0)
    attn = _csa_model().layers[0].self_attn
    B, Q, H, D, K, W = 1, 16, attn.n_heads, attn.head_dim, 8, attn.window
    q = torch.randn(B, Q, H, D)
    win = torch.randn(B, W + Q, D)
    mask = torch.ones(1, Q, W + Q, dtype=torch.bool)
    comp = torch.randn(B, n_entries, D)
    if sparse:
        idx = torch.randint(0, n_entries, (B, Q, K))
        ctx = ("sparse", comp, idx, torch.ones(B, Q, K, dtype=torch.bool))
    else:
        ctx = ("dense", comp, torch.ones(1, Q, n_entries, dtype=torch.bool))
    with FlopCounterMode(display=False) as fc:
        attn._attend(q, win, mask, ctx)[0]
    return fc.get_total_flops()


def test_sparse_attention_cost_is_independent_of_compressed_length():
    small, large = _attend_flops(64, sparse=True), _attend_flops(16384, sparse=True)
    assert small == large > 0
    assert _attend_flops(16384, sparse=False) > 50 * _attend_flops(64, sparse=False)


def test_state_bounded_and_matches_cache_bytes_accounting():
    torch.manual_seed(0)
    args = ModelArgs.flavor("debug")
    m = Transformer(args).eval()
    st = m.new_state(1)
    ids = torch.randint(0, args.vocab_size, (1, 400))
    window_ptrs = [l.window.data_ptr() for l in st.layers]
    sizes = {}
    with torch.no_grad():
        prev = 0
        # decode steps and prefill chunks of odd sizes; sizes sampled when L % 16 == 15
        # (every tail at its worst case, the accounting's assumption)
        for L in (15, 16, 17, 31, 47, 48, 111, 175, 176, 303, 399):
            m(ids[:, prev:L], st)
            prev = L
            if L % 16 == 15:
                sizes[L] = sum(l.nbytes() for l in st.layers)
    # the window ring is allocated once and never grows or moves
    assert [l.window.data_ptr() for l in st.layers] == window_ptrs
    assert all(l.window.shape[1] == args.sliding_window for l in st.layers)
    for L, got in sizes.items():
        if L >= args.sliding_window:
            assert got == cache_bytes(args, L, layout="fp32")["total_bytes"], L
    # growth is only the compressed entries: (1/4 * (D + Di) per CSA layer + 1/16 * D per HCA) floats per token
    per_token = 4 * sum((args.head_dim + args.index_head_dim) / 4 if lt == CSA else args.head_dim / 16
                        for lt in args.layer_types if lt != "sliding_attention")
    (l0, s0), (l1, s1) = min(sizes.items()), max(sizes.items())
    assert (s1 - s0) == pytest.approx(per_token * (l1 - l0))


def test_bad_inputs():
    m = _csa_model()
    with pytest.raises(ValueError, match="input_ids must be"):
        m(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        m(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"\[0, 512\)"):  # values: once per request, not in the forward
        m.generate(torch.full((1, 3), 512), 2)
    with pytest.raises(ValueError, match="no tokens"):
        m(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="batch 2"):
        m(torch.zeros(1, 3, dtype=torch.long), m.new_state(2))
    with pytest.raises(ValueError, match="batch size 0"):
        m(torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="LongTensor"):
        m([[1, 2, 3]])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m(torch.zeros(1, m.args.max_position_embeddings + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="LongTensor"):
        m.generate(torch.zeros(5, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="temperature"):
        m.generate(torch.zeros(1, 5, dtype=torch.long), 3, temperature=-1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        m.prefill(torch.zeros(1, 3, dtype=torch.long), m.new_state(1), chunk_size=0)


def test_mtp_is_trainable_and_predicts_two_ahead():
    torch.manual_seed(0)
    m = Transformer(ModelArgs.flavor("debug"))
    ids = torch.randint(0, 512, (2, 64))
    h = m.forward_hidden(ids)
    logits = m.mtp_logits(h, ids)
    assert logits.shape == (2, 63, 512)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 512), ids[:, 2:].reshape(-1))
    loss.backward()
    assert m.mtp[0].eh_proj.weight.grad.abs().sum() > 0
    assert m.mtp[0].block.self_attn.q_a_proj.weight.grad.abs().sum() > 0
    assert m.layers[0].self_attn.q_a_proj.weight.grad.abs().sum() > 0  # MTP loss also trains the trunk
