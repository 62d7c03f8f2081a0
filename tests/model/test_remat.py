"""Activation checkpointing from outside the model (``model.remat.checkpointed`` as the block call):
losses and every gradient equal those without it, bit for bit on CPU -- which holds only because the
forward keeps no state on its modules (routing and indexer KL are returned, forced routing is an
argument) -- and the blocks really are recomputed in backward."""

import pytest
import torch

from model import ModelArgs, Transformer
from model.losses import LossConfig
from model.remat import checkpointed
from model.training import compute_losses, set_attention_mode
from model.transformer import Block


def _batch(B=2, S=80, vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, S + 1), generator=g)
    docs = torch.zeros(B, S, dtype=torch.long)
    docs[:, 50:] = 1
    labels = ids[:, 1:].clone()
    labels[:, 49] = -100
    return {"input_ids": ids[:, :-1], "labels": labels, "doc_ids": docs}


def _run(mode: str, call, forced=None):
    torch.manual_seed(0)
    m = Transformer(ModelArgs.flavor("debug"))
    set_attention_mode(m, mode)
    calls = []
    forward = Block.forward

    def counting(self, *args):
        if self in list(m.layers):
            calls.append(1)
        return forward(self, *args)

    cfg = LossConfig(mode=mode, mtp_weight=0.0 if mode == "indexer_warmup" else 0.3)
    Block.forward = counting
    try:
        loss, metrics, aux = compute_losses(m, _batch(), cfg, forced=forced, call=call)
        loss.backward()
    finally:
        Block.forward = forward
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return loss.detach(), metrics, grads, {k: r.indices for k, r in aux.routing.items()}, len(calls)


@pytest.mark.parametrize("mode", ["dense", "indexer_warmup", "sparse"])
def test_checkpointed_blocks_give_the_same_losses_and_gradients(mode):
    loss, metrics, grads, routing, n_plain = _run(mode, None)
    loss_c, metrics_c, grads_c, routing_c, n_ckpt = _run(mode, checkpointed)
    assert torch.equal(loss, loss_c) and metrics == metrics_c
    assert grads.keys() == grads_c.keys() and len(grads) > 10
    for name in grads:
        assert torch.equal(grads[name], grads_c[name]), name
    assert routing.keys() == routing_c.keys() and all(torch.equal(routing[k], routing_c[k]) for k in routing)
    # every block that has something to backpropagate ran again in backward (in the warm-up only the
    # two CSA layers' indexers train)
    assert n_plain == 4 and n_ckpt == 4 + (2 if mode == "indexer_warmup" else 4)


def test_forced_routing_survives_the_recomputation():
    """Anticipatory routing: the forced experts are an argument, so the recomputed block uses them too."""
    _, _, _, routing, _ = _run("sparse", None)
    E = 8
    forced = {k: (idx + 1) % E for k, idx in routing.items() if k != "layers.0"}  # layer 0 is hash-routed
    loss, _, grads, used, _ = _run("sparse", None, forced)
    loss_c, _, grads_c, used_c, _ = _run("sparse", checkpointed, forced)
    assert all(torch.equal(used[k], forced[k]) for k in forced)
    assert torch.equal(loss, loss_c) and all(torch.equal(grads[n], grads_c[n]) for n in grads)
