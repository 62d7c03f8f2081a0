"""Flavors: debug is fast on CPU; v4-flash / v4-pro build on the meta device with the paper's sizes."""

import time

import pytest
import torch

from model import FLAVORS, ModelArgs, Transformer
from model.transformer import meta_device


@pytest.mark.parametrize("name,total,active", [("v4-flash", 284e9, 13e9), ("v4-pro", 1.6e12, 49e9)])
def test_released_shapes_on_meta(name, total, active):
    with meta_device():
        m = Transformer(ModelArgs.flavor(name))
    assert next(m.parameters()).device.type == "meta"
    n = m.num_params()
    print(name, n)
    assert abs(n["total"] / total - 1) < 0.03
    assert abs(n["active"] / active - 1) < 0.10  # the paper's active count may exclude embedding/head
    assert n["mtp"] > 0


def test_debug_forward_is_fast():
    torch.manual_seed(0)
    m = Transformer(ModelArgs.flavor("debug")).eval()
    ids = torch.randint(0, m.args.vocab_size, (1, 256))
    with torch.no_grad():
        m(ids)
        t = time.perf_counter()
        logits = m(ids)
        elapsed = time.perf_counter() - t
    print(f"debug forward, 256 tokens: {elapsed * 1e3:.1f} ms")
    assert logits.shape == (1, 256, m.args.vocab_size) and torch.isfinite(logits).all()


def test_every_flavor_is_valid_and_round_trips():
    for name in FLAVORS:
        a = ModelArgs.flavor(name)
        assert ModelArgs.from_dict(a.to_dict()) == a
        assert ModelArgs.from_dict({"flavor": name}) == a
