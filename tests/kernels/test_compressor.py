"""The compressor pooling kernels against the torch reference (model.attention.Compressor.pool without
a state), under TRITON_INTERPRET=1: CSA's overlapping two-series form and HCA's plain form, ragged
lengths (a tail shorter than a block, fewer tokens than a block), packed documents; forward values
and the gradients of kv, gate and position_bias."""

import pytest
import torch

import kernels
from model.attention import Compressor
from model.rope import Rotary

TOL = dict(rtol=1e-5, atol=1e-5)
ROPE = {"main": {"rope_type": "default", "rope_theta": 10000.0},
        "compress": {"rope_type": "default", "rope_theta": 160000.0}}


def _run(comp, kv, gate, docs, use_kernels):
    comp.zero_grad()
    kv = kv.detach().clone().requires_grad_(True)
    gate = gate.detach().clone().requires_grad_(True)
    with kernels.forced(use_kernels), torch.profiler.profile() as prof:
        out = comp.pool(kv, gate, Rotary(ROPE, 8), None, 0, docs)
    ran = any(e.name == "tide::compressor_pool" for e in prof.events())
    assert ran == (use_kernels and out.shape[1] > 0)  # the kernel really ran (or really did not)
    if out.numel() == 0:  # no complete block: nothing pooled
        return [out, None, None, None]
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * g).sum().backward()
    return [out, kv.grad, gate.grad, comp.position_bias.grad]


@pytest.mark.parametrize("overlap,rate,L,D", [(True, 4, 19, 8),  # CSA, a 3-token tail
                                               (True, 4, 4, 16),  # one block
                                               (False, 8, 37, 8),  # HCA, ragged
                                               (False, 16, 33, 24),  # D not a power of two
                                               (True, 4, 3, 8)])  # no complete block
@pytest.mark.parametrize("packed", [False, True])
def test_pooling_forward_and_backward_match_the_reference(overlap, rate, L, D, packed):
    torch.manual_seed(rate + L)
    comp = Compressor(16, D, rate, overlap, 1e-6, 0.02)
    with torch.no_grad():
        comp.position_bias.normal_()
        comp.kv_norm.weight.uniform_(0.5, 1.5)
    C = 2 * D if overlap else D
    kv, gate = torch.randn(2, L, C), torch.randn(2, L, C) * 2
    docs = None
    if packed:  # two documents in row 0 (one starts mid-block), one in row 1
        docs = torch.zeros(2, L, dtype=torch.long)
        docs[0, L // 2:] = 1
    want = _run(comp, kv, gate, docs, False)
    got = _run(comp, kv, gate, docs, True)
    for name, a, b in zip(["entries", "dkv", "dgate", "dbias"], got, want, strict=True):
        if b is None:  # no complete block: nothing pooled, no gradient
            assert a is None, name
            continue
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"{name}: {m}")
