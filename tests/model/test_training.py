"""Training objectives: attention modes, indexer KL, MTP, balance loss, bias update."""

import pytest
import torch

from model import ModelArgs, Transformer
from model.optim import CombinedOptimizer, OptimConfig
from model.losses import sequence_balance_loss
from model.moe import Routing
from model.training import LossConfig, compute_losses, indexer_parameters, set_attention_mode, update_router_biases


def _batch(B=2, S=96, vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, S + 1), generator=g)
    docs = torch.zeros(B, S, dtype=torch.long)
    docs[:, 40:] = 1
    labels = ids[:, 1:].clone()
    labels[:, 39] = -100
    return {"input_ids": ids[:, :-1], "labels": labels, "doc_ids": docs}


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return Transformer(ModelArgs.flavor("debug", index_n_heads=8))


def test_indexer_warmup_trains_only_the_indexer_and_kl_falls(model):
    set_attention_mode(model, "indexer_warmup")
    ix = {id(p) for p in indexer_parameters(model)}
    assert ix and all(p.requires_grad == (id(p) in ix) for p in model.parameters())
    opt = torch.optim.Adam(indexer_parameters(model), lr=3e-3)
    batch = _batch()
    kls = []
    for _ in range(40):
        loss, m, _ = compute_losses(model, batch, LossConfig(mode="indexer_warmup"))
        opt.zero_grad()
        loss.backward()
        opt.step()
        kls.append(m["indexer_kl"])
    assert kls[0] > 0 and kls[-1] < 0.7 * kls[0], kls[::8]
    assert all(p.grad is None for p in model.parameters() if id(p) not in ix)


def test_sparse_mode_indexer_learns_from_kl_only(model):
    set_attention_mode(model, "sparse")
    batch = _batch()
    loss, m, _ = compute_losses(model, batch, LossConfig(mode="sparse", indexer_kl_weight=0.0))
    loss.backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in indexer_parameters(model))
    assert model.layers[1].self_attn.q_a_proj.weight.grad.abs().max() > 0
    model.zero_grad(set_to_none=True)
    loss, m, _ = compute_losses(model, batch, LossConfig(mode="sparse"))
    assert m["indexer_kl"] > 0
    # KL alone reaches the indexer but not the main model (its input is detached)
    m_kl = LossConfig(mode="sparse", mtp_weight=0, balance_weight=0)
    loss, _, _ = compute_losses(model, batch, m_kl)
    (loss - compute_losses(model, batch, LossConfig(mode="sparse", mtp_weight=0, balance_weight=0,
                                                    indexer_kl_weight=0.0))[0]).backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in indexer_parameters(model))
    assert model.embed_tokens.weight.grad is None or model.embed_tokens.weight.grad.abs().max() < 1e-6


def test_dense_mode_has_no_indexer_kl(model):
    set_attention_mode(model, "dense")
    _, m, _ = compute_losses(model, _batch(), LossConfig(mode="dense"))
    assert "indexer_kl" not in m and m["mtp"] > 0 and m["balance"] > 0


def test_sequence_balance_loss_formula(model):
    moe = model.layers[1].mlp
    E, K = moe.gate.n_experts, moe.gate.top_k
    # perfectly uniform routing and scores -> f_i = 1, P_i = 1/E -> loss 1
    T = 4 * E
    uniform = Routing(torch.ones(T, E), torch.stack([torch.arange(K) + (t % (E // K)) * K for t in range(T)]), True)
    assert sequence_balance_loss(uniform, 1, T).item() == pytest.approx(1.0)
    # everything on expert 0 with all score there -> f_0 = E/K, P_0 = 1
    scores = torch.zeros(T, E)
    scores[:, 0] = 1
    assert sequence_balance_loss(Routing(scores, torch.zeros(T, K, dtype=torch.long), True), 1, T).item() == \
        pytest.approx(E)


def test_bias_update_sign_rule(model):
    moe = model.layers[1].mlp
    E = moe.gate.n_experts
    routing = {"layers.1": Routing(torch.ones(12, E), torch.tensor([[0, 1]] * 10 + [[2, 3]] * 2), True)}
    before = moe.gate.e_score_correction_bias.clone()
    cv = update_router_biases(model, routing, speed=1e-3)
    delta = moe.gate.e_score_correction_bias - before
    assert delta[0].item() == pytest.approx(-1e-3, abs=1e-8)  # load 10 > mean 3: pushed down
    assert delta[2].item() == pytest.approx(1e-3, abs=1e-8)  # load 2 < mean 3: pulled up
    assert delta[4].item() == pytest.approx(1e-3, abs=1e-8)  # unused experts are pulled up
    assert cv["load_cv/1"] > 0
    assert torch.equal(moe.gate.weight.grad if moe.gate.weight.grad is not None else torch.zeros(1),
                       torch.zeros(1))  # the update touches the bias only


def test_mtp_moe_gets_the_balance_loss_and_the_bias_update(model):
    """The MTP block's routed MoE is balanced like the decoder layers' (and only when asked)."""
    set_attention_mode(model, "dense")
    batch = _batch()
    on = LossConfig(mode="dense")
    off = LossConfig(mode="dense", mtp_balance=False)
    _, m_on, aux_on = compute_losses(model, batch, on)
    _, m_off, aux_off = compute_losses(model, batch, off)
    assert "mtp.0" in aux_on.routing and "mtp.0" not in aux_off.routing
    mtp_bal = sequence_balance_loss(aux_on.routing["mtp.0"], 2, batch["input_ids"].shape[1] - 1).item()
    assert m_on["balance"] == pytest.approx(m_off["balance"] + mtp_bal, rel=1e-6) and mtp_bal > 0
    gate = model.mtp[0].block.mlp.gate
    before = gate.e_score_correction_bias.clone()
    cv = update_router_biases(model, aux_on.routing, speed=1e-3)
    assert "load_cv/mtp" in cv and not torch.equal(gate.e_score_correction_bias, before)


def test_a_few_steps_reduce_the_loss(model):
    set_attention_mode(model, "sparse")
    opt = CombinedOptimizer(model, OptimConfig(lr=2e-3, warmup_steps=1))
    batch = _batch(seed=1)
    losses = []
    for _ in range(8):
        loss, m, aux = compute_losses(model, batch, LossConfig())
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_router_biases(model, aux.routing)
        losses.append(m["ce"])
    assert losses[-1] < losses[0] - 0.5, losses
