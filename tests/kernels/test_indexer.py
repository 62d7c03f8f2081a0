"""The Lightning Indexer kernel against the torch reference (model.attention.Indexer.scores /
Indexer.select), under TRITON_INTERPRET=1: scores within 1e-5, and the selection exactly the
reference's on the same scores -- including ties (ReLU makes exact zeros common), top-k larger
than the visible entries, a single query, packed documents."""

import pytest
import torch

from kernels.indexer import indexer_topk
from model import ModelArgs
from model.attention import Indexer


def _indexer(topk: int, heads: int, dim: int) -> Indexer:
    args = ModelArgs.flavor("debug", index_topk=topk, index_n_heads=heads, index_head_dim=dim)
    return Indexer(args)


def _check(ix, q, w, keys, q_pos, docs=None):
    entry_doc = query_doc = allowed = None
    if docs is not None:
        query_doc, entry_doc = docs
        allowed = entry_doc.unsqueeze(1) == query_doc.unsqueeze(2)
    idx, valid, scores = indexer_topk(q, w, keys, q_pos, ix.rate, ix.topk, entry_doc, query_doc)
    torch.testing.assert_close(scores, ix.scores(q, w, keys), rtol=1e-5, atol=1e-5)
    want_idx, want_valid = ix.select(scores, q_pos, allowed)  # the reference rule on the kernel's own scores
    assert torch.equal(valid.sum(-1), want_valid.sum(-1))  # the kernel packs its picks first (index order)
    got = torch.where(valid, idx, -1).sort(-1).values
    want = torch.where(want_valid, want_idx, -1).sort(-1).values
    assert torch.equal(got, want)
    assert not idx[~valid].any()
    return valid


@pytest.mark.parametrize("B,Q,T,topk,heads,dim", [(1, 1, 1, 4, 16, 16),  # a single query and entry
                                                  (2, 7, 13, 4, 16, 24),  # ragged, Di not a power of two (padded)
                                                  (1, 5, 40, 64, 8, 16),  # top-k beyond the visible entries
                                                  (1, 4, 150, 8, 4, 32)])  # several blocks, 4 heads (padded)
def test_scores_and_selection_match_the_reference(B, Q, T, topk, heads, dim):
    torch.manual_seed(T)
    ix = _indexer(topk, heads, dim)
    q = torch.randn(B, Q, heads, dim)
    w = torch.randn(B, Q, heads)
    keys = torch.randn(B, T, dim)
    q_pos = torch.arange(4 * T - Q, 4 * T)  # the last Q positions: every entry visible to the last query
    valid = _check(ix, q, w, keys, q_pos)
    assert valid.any()


def test_ties_are_broken_by_index_like_the_reference():
    torch.manual_seed(0)
    ix = _indexer(4, 16, 16)
    q = -torch.rand(1, 3, 16, 16)  # negative queries against positive keys: every ReLU is 0, every score 0
    keys = torch.rand(1, 20, 16)
    w = torch.randn(1, 3, 16)  # mixed signs: some sums are -0.0, which must tie with +0.0
    keys[0, 7] = -keys[0, 7]  # ... except entry 7 (and its score sign follows w)
    valid = _check(ix, q, w, keys, torch.tensor([40, 60, 79]))
    assert valid.all()


def test_packed_documents_and_causality():
    torch.manual_seed(1)
    ix = _indexer(6, 16, 16)
    B, Q, T = 2, 9, 24
    q, w, keys = torch.randn(B, Q, 16, 16), torch.randn(B, Q, 16), torch.randn(B, T, 16)
    q_pos = torch.arange(0, 4 * T, 4 * T // Q)[:Q]  # early queries see few or no entries
    entry_doc = (torch.arange(T) >= 10).long().expand(B, T).clone()
    query_doc = (q_pos.div(4, rounding_mode="floor") >= 10).long().expand(B, Q).clone()
    valid = _check(ix, q, w, keys, q_pos, (query_doc, entry_doc))
    assert not valid[:, 0].any()  # position 0 sees no complete block
