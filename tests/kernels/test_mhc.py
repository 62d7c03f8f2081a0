"""The fused mHC kernels against the torch reference (model.layers.HyperConnection), on CPU
under TRITON_INTERPRET=1: forward outputs and every input gradient, ragged shapes, the custom
op's registration (fake implementation, autograd), and a whole model forward with the
kernels swapped in."""

import pytest
import torch

import kernels
from kernels.ops import mhc
from model import ModelArgs, Transformer
from model.layers import HyperConnection

TOL = dict(rtol=1e-5, atol=1e-5)


def _hc(N: int, D: int, seed: int) -> HyperConnection:
    torch.manual_seed(seed)
    hc = HyperConnection(D, N, 20, 1e-6, 1e-6)
    with torch.no_grad():  # away from the init's near-zero coefficients: every term matters
        hc.base.normal_(std=0.5)
        hc.scale.uniform_(0.5, 1.5)
        hc.fn.normal_(std=0.05)
    return hc


def _run(hc, x, grads, use_kernels: bool):
    for p in hc.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    with kernels.forced(use_kernels):
        post, comb, out = hc(x)
    loss = sum((t * g).sum() for t, g in zip((post, comb, out), grads, strict=True))
    loss.backward()
    return [post, comb, out, x.grad, hc.fn.grad, hc.base.grad, hc.scale.grad]


@pytest.mark.parametrize("B,S,N,D", [(1, 1, 4, 32),  # a single token
                                     (1, 37, 4, 48),  # rows not a multiple of BLOCK_T = 16
                                     (2, 9, 2, 24),  # hc_mult 2, D not a power of two
                                     (1, 5, 3, 16)])  # N = 3: padded to 4 inside the kernel
def test_mhc_forward_and_backward_match_the_reference(B, S, N, D):
    hc = _hc(N, D, seed=S)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, S, N, D, generator=g)
    grads = (torch.randn(B, S, N, generator=g), torch.randn(B, S, N, N, generator=g),
             torch.randn(B, S, D, generator=g))
    want = _run(hc, x, grads, False)
    got = _run(hc, x, grads, True)
    names = ["post", "comb", "out", "dx", "dfn", "dbase", "dscale"]
    for name, a, b in zip(names, got, want, strict=True):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"{name}: {m}")


def test_the_kernel_sees_every_coefficient():
    """A perturbation of one comb logit's base changes the kernel's comb (the test can fail)."""
    hc = _hc(4, 32, 0)
    x = torch.randn(1, 3, 4, 32)
    with kernels.forced(True), torch.no_grad():
        _, comb, _ = hc(x)
        hc.base[2 * 4 + 5] += 1.0
        _, comb2, _ = hc(x)
    assert (comb2 - comb).abs().max() > 1e-3


def test_custom_op_registration():
    """opcheck: schema, fake (meta) implementation for torch.compile, autograd registration."""
    hc = _hc(4, 16, 3)
    x = torch.randn(20, 4, 16, requires_grad=True)
    torch.library.opcheck(mhc, (x, hc.fn, hc.base, hc.scale, 20, 1e-6, 1e-6),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_model_logits_with_kernels_swapped_in():
    args = ModelArgs.flavor("debug", num_hidden_layers=2, vocab_size=256, mlp_layer_types=["moe", "moe"],
                            layer_types=["sliding_attention", "compressed_sparse_attention"])
    torch.manual_seed(0)
    model = Transformer(args).eval()
    ids = torch.randint(0, args.vocab_size, (2, 12))
    with torch.no_grad():
        want = model(ids)
        with kernels.forced(True), torch.profiler.profile() as prof:
            got = model(ids)
    ran = {e.name for e in prof.events()}
    assert {"tide::mhc", "tide::compressor_pool", "tide::indexer_topk"} <= ran  # the kernels really ran
    torch.testing.assert_close(got, want, **TOL)
