"""The sparse attention forward kernel against the torch reference (model.attention.Attention on a
stateless forward), under TRITON_INTERPRET=1: sliding-window, CSA (indexer picks, top-k larger
than the visible entries) and HCA layers, dense CSA (curriculum stage 1), packed documents, query
chunks, ragged lengths."""

import pytest
import torch

import kernels
from model import ModelArgs
from model.attention import Attention
from model.config import CSA, HCA, SWA


def _attention(layer_type: str, dense: bool = False) -> Attention:
    args = ModelArgs.flavor("debug", sliding_window=16, index_topk=4, compress_rates={CSA: 4, HCA: 8})
    torch.manual_seed(0)
    att = Attention(args, layer_type).eval()
    with torch.no_grad():
        att.sinks.normal_()
    att.dense_csa = dense
    return att


@pytest.mark.parametrize("layer_type,dense", [(SWA, False), (CSA, False), (CSA, True), (HCA, False)])
@pytest.mark.parametrize("S,packed", [(1, False), (37, False), (45, True)])
def test_attention_forward_with_the_kernel_matches_the_reference(layer_type, dense, S, packed, monkeypatch):
    import model.attention as attention_mod

    monkeypatch.setattr(attention_mod, "QUERY_CHUNK", 16)  # several query chunks
    att = _attention(layer_type, dense)
    x = torch.randn(2, S, att.q_a_proj.in_features, generator=torch.Generator().manual_seed(S))
    docs = None
    if packed:
        docs = torch.zeros(2, S, dtype=torch.long)
        docs[0, 13:] = 1
        docs[1, 24:] = 1
    with torch.no_grad():
        want = att(x, 0, None, docs)
        with kernels.forced(True), torch.profiler.profile() as prof:
            got = att(x, 0, None, docs)
    assert any(e.name == "tide::sparse_attention" for e in prof.events())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_training_keeps_the_differentiable_reference():
    att = _attention(CSA)
    x = torch.randn(1, 9, att.q_a_proj.in_features, requires_grad=True)
    with kernels.forced(True), torch.profiler.profile() as prof:
        att(x).sum().backward()
    assert not any(e.name == "tide::sparse_attention" for e in prof.events())
    assert x.grad is not None
