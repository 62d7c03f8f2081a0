"""Ragged batches (continuous batching): rows at different positions, one state per row.

A decode step over a ragged batch must give every row exactly the logits the row gets
alone, whatever the other rows' lengths -- including rows whose step closes a CSA /
HCA block (new compressed entries) and rows past the sliding window.
"""

from __future__ import annotations

import pytest
import torch

from model import Transformer
from tests.model.hf_utils import make_args, randomize


def _model(name: str) -> Transformer:
    args = make_args(name)
    torch.manual_seed(0)
    m = Transformer(args).eval()
    randomize(m, 3, args.n_routed_experts)
    return m


@pytest.mark.parametrize("name,dense", [("c4_16_w32", False), ("c8_32_w16", False), ("c4_8_w8_hc2", False),
                                        ("c4_16_w32", True)])
@torch.no_grad()
def test_ragged_decode_matches_each_row_alone(name, dense):
    m = _model(name)
    m.set_dense_csa(dense)  # dense: CSA attends to every visible entry (curriculum stage 1)
    V = m.args.vocab_size
    g = torch.Generator().manual_seed(7)
    lengths = [1, 15, 16, 33, 70]  # block boundaries of the rates 4/8/16/32 and past the windows
    prompts = [torch.randint(0, V, (1, n), generator=g) for n in lengths]
    alone, ragged = [], []
    for p in prompts:
        a, r = m.new_state(1), m.new_state(1)
        m(p, a)
        m(p, r)
        alone.append(a)
        ragged.append(r)
    for step in range(5):  # every row crosses more boundaries as it advances
        toks = torch.randint(0, V, (len(lengths), 1), generator=g)
        want = torch.cat([m(toks[i:i + 1], alone[i])[:, -1] for i in range(len(lengths))])
        got = m(toks, ragged)[:, -1]
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    # a ragged multi-token chunk (each row its own chunked prefill) takes the per-row path
    toks = torch.randint(0, V, (len(lengths), 3), generator=g)
    want = torch.cat([m(toks[i:i + 1], alone[i])[:, -1] for i in range(len(lengths))])
    torch.testing.assert_close(m(toks, ragged)[:, -1], want, rtol=0, atol=2e-5)
    assert [s.pos for s in ragged] == [n + 8 for n in lengths]
    # rows leave and join between steps: drop row 1, add a fresh sequence
    fresh_alone, fresh = m.new_state(1), m.new_state(1)
    p = torch.randint(0, V, (1, 9), generator=g)
    m(p, fresh_alone)
    m(p, fresh)
    rows = [ragged[0], ragged[2], fresh, ragged[4]]
    refs = [alone[0], alone[2], fresh_alone, alone[4]]
    toks = torch.randint(0, V, (4, 1), generator=g)
    want = torch.cat([m(toks[i:i + 1], refs[i])[:, -1] for i in range(4)])
    torch.testing.assert_close(m(toks, rows)[:, -1], want, rtol=0, atol=2e-5)


def test_ragged_batch_errors():
    m = _model("c4_16_w32")
    one = m.new_state(1)
    with pytest.raises(ValueError, match="one state per row"):
        m(torch.zeros(2, 1, dtype=torch.long), [one])
    with pytest.raises(ValueError, match="holds 2 sequences"):
        m(torch.zeros(1, 1, dtype=torch.long), [m.new_state(2)])
    one.pos = m.args.max_position_embeddings
    with pytest.raises(ValueError, match="beyond max_position_embeddings"):
        m(torch.zeros(1, 1, dtype=torch.long), [one])
