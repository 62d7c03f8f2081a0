"""Muon with the hybrid Newton-Schulz, its parameter split, and the LR schedule."""

import math

import pytest
import torch

from model import ModelArgs, Transformer
from model.optim import FAST, CombinedOptimizer, Muon, OptimConfig, is_muon_param, lr_at, newton_schulz


def _matrix(n, m, cond, seed):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    V, _ = torch.linalg.qr(torch.randn(m, m, generator=g))
    k = min(n, m)
    s = torch.logspace(0, -math.log10(cond), k)
    return U[:, :k] @ torch.diag(s) @ V[:, :k].T


@pytest.mark.parametrize("n,m,cond", [(64, 64, 1), (128, 32, 10), (32, 200, 10), (64, 64, 1e3), (96, 48, 1e3)])
def test_hybrid_newton_schulz_drives_singular_values_to_one(n, m, cond):
    G = _matrix(n, m, cond, seed=n + m)
    sv = torch.linalg.svdvals(newton_schulz(G))
    assert (sv - 1).abs().max() <= 1e-2
    # the fast phase alone leaves them rough: the settle phase is doing the work
    rough = torch.linalg.svdvals(newton_schulz(G, (FAST,) * 8))
    assert (rough - 1).abs().max() > 1e-2


def test_one_phase_with_torch_coefficients_matches_torch_muon_bf16():
    G = torch.randn(48, 80, generator=torch.Generator().manual_seed(0))
    W0 = torch.zeros(48, 80)
    p = torch.nn.Parameter(W0.clone())
    p.grad = G.clone()
    torch.optim.Muon([p], lr=1.0, momentum=0.0, nesterov=False, weight_decay=0.0, ns_steps=5).step()
    ratio = math.sqrt(max(1, 48 / 80))
    theirs = (W0 - p.detach()) / ratio
    ours = newton_schulz(G, (FAST,) * 5, dtype=torch.bfloat16).float()
    rel = ((ours - theirs).norm() / theirs.norm()).item()
    assert rel <= 3e-2, rel  # bf16 rounding accumulated over 5 quintic steps
    # the tolerance discriminates: one step more, or float32, already lands farther away
    other = newton_schulz(G, (FAST,) * 6, dtype=torch.bfloat16).float()
    assert ((other - theirs).norm() / theirs.norm()).item() > 3 * rel


def test_muon_update_rms_decay_and_per_expert_orthogonalisation():
    torch.manual_seed(0)
    experts = torch.nn.Parameter(torch.randn(3, 16, 40))
    experts.grad = torch.randn(3, 16, 40) * torch.tensor([1.0, 100.0, 0.01]).view(3, 1, 1)
    W0 = experts.detach().clone()
    opt = Muon([experts], lr=0.5, momentum=0.95, weight_decay=0.0, update_rms=0.18)
    opt.step()
    upd = (W0 - experts.detach()) / 0.5
    for e in range(3):  # each expert gets an orthogonal update of RMS 0.18, whatever its grad scale
        assert upd[e].pow(2).mean().sqrt().item() == pytest.approx(0.18, rel=0.02)
        sv = torch.linalg.svdvals(upd[e] / (0.18 * math.sqrt(40)))
        assert (sv - 1).abs().max() < 2e-2
    # decoupled weight decay with a zero gradient shrinks by (1 - lr * wd) exactly
    w = torch.nn.Parameter(torch.ones(4, 4))
    w.grad = torch.zeros(4, 4)
    Muon([w], lr=0.1, weight_decay=0.5).step()
    assert torch.allclose(w.detach(), torch.full((4, 4), 0.95))


def test_parameter_split():
    m = Transformer(ModelArgs.flavor("debug"))
    opt = CombinedOptimizer(m, OptimConfig())
    muon = {opt.names[id(p)] for p in opt.muon.param_groups[0]["params"]}
    adam = {opt.names[id(p)] for p in opt.adam.param_groups[0]["params"]}
    assert "layers.0.self_attn.q_a_proj.weight" in muon and "layers.1.mlp.experts.gate_up_proj" in muon
    assert "layers.0.attn_hc.fn" in muon
    for name in ("embed_tokens.weight", "lm_head.weight", "norm.weight", "layers.0.attn_hc.base",
                 "layers.0.attn_hc.scale", "layers.0.self_attn.sinks", "layers.1.self_attn.compressor.position_bias",
                 "layers.0.input_layernorm.weight", "hc_head.hc_base"):
        assert name in adam, name
    assert adam.isdisjoint(muon)
    assert opt.adam.defaults["eps"] == 1e-20 and opt.adam.defaults["betas"] == (0.9, 0.95)
    assert not is_muon_param("x.position_bias", torch.zeros(4, 4))


def test_lr_schedule():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, decay_start=50, total_steps=100)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(30, cfg) == 1.0 and lr_at(50, cfg) == pytest.approx(1.0)
    assert lr_at(75, cfg) == pytest.approx(0.55) and lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(30, cfg, multiplier=0.5) == 0.5


def test_muon_batches_bound_the_step_and_change_nothing(monkeypatch):
    """Newton-Schulz over at most MUON_BATCH_BYTES of matrices per call (a stacked-expert parameter
    split across calls) gives the parameters and momentum of one call over everything."""
    import model.optim as optim_mod

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 16, 8)), torch.nn.Parameter(torch.randn(16, 8)),
              torch.nn.Parameter(torch.randn(3, 8, 4))]
    grads = [torch.randn_like(p) for p in params]

    def run(batch_bytes):
        monkeypatch.setattr(optim_mod, "MUON_BATCH_BYTES", batch_bytes)
        ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt = optim_mod.Muon(ps, lr=0.1)
        for _ in range(2):
            for p, g in zip(ps, grads, strict=True):
                p.grad = g.clone()
            opt.step()
        return ps, [opt.state[p]["momentum_buffer"] for p in ps]

    whole, whole_m = run(2**30)
    split, split_m = run(16 * 8 * 4 * 4)  # 4 matrices of 16 x 8 per call: the 6-expert tensor is split
    for a, b in zip(whole + whole_m, split + split_m, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), float((a - b).abs().max())
