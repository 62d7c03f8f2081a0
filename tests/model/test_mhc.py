"""mHC: Sinkhorn-Knopp gives doubly-stochastic mixing; deep stacks stay bounded."""

import torch

from model.layers import HyperConnection, sinkhorn_knopp


def test_sinkhorn_doubly_stochastic():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 4, 4, generator=g)
    comb = sinkhorn_knopp(logits, iters=20, eps=1e-6)
    assert (comb >= 0).all()
    assert (comb.sum(-1) - 1).abs().max() <= 1e-4
    assert (comb.sum(-2) - 1).abs().max() <= 1e-4
    # one iteration is not enough for such logits: the test can tell the difference
    rough = sinkhorn_knopp(logits, iters=1, eps=1e-6)
    assert (rough.sum(-1) - 1).abs().max() > 1e-3


def test_hyper_connection_comb_from_module_is_doubly_stochastic():
    torch.manual_seed(0)
    hc = HyperConnection(hidden_size=32, hc_mult=4, sinkhorn_iters=20, hc_eps=1e-6, norm_eps=1e-6)
    with torch.no_grad():
        hc.fn.normal_(std=0.02)
        hc.base.normal_(std=0.5)
    post, comb, collapsed = hc(torch.randn(2, 5, 4, 32))
    assert comb.shape == (2, 5, 4, 4) and post.shape == (2, 5, 4) and collapsed.shape == (2, 5, 32)
    assert (comb.sum(-1) - 1).abs().max() <= 1e-4 and (comb.sum(-2) - 1).abs().max() <= 1e-4
    assert ((post > 0) & (post < 2)).all()


def _stack_norms(constrained: bool, depth: int = 64) -> list[float]:
    torch.manual_seed(1)
    D, N = 32, 4
    layers = [HyperConnection(D, N, 20, 1e-6, 1e-6, constrained=constrained) for _ in range(depth)]
    blocks = [torch.nn.Linear(D, D) for _ in range(depth)]
    x = torch.randn(2, 8, N, D)
    norms = [x.norm().item()]
    with torch.no_grad():
        for hc, blk in zip(layers, blocks):
            hc.fn.normal_(std=0.02)
            # comb logits start at identity + noise (the unconstrained HC initialisation)
            hc.base.normal_(std=0.3)
            hc.base[2 * N:].add_(torch.eye(N).flatten())
            post, comb, inp = hc(x)
            x = HyperConnection.merge(x, torch.tanh(blk(inp)), post, comb)
            norms.append(x.norm().item())
    return norms


def test_deep_stack_residual_bounded_with_mhc_and_grows_without():
    constrained = _stack_norms(True)
    free = _stack_norms(False)
    growth_c = max(constrained) / constrained[0]
    growth_f = free[-1] / free[0]
    print(f"64-layer residual norm growth: mHC {growth_c:.2f}x, unconstrained {growth_f:.3g}x")
    assert growth_c < 10.0
    assert growth_f > 1e3
