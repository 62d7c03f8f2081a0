"""Layout-independent initialisation (``model.init``): every actor materialises only its own
tensors, and any split of the model starts from the same parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model import ModelArgs, Transformer
from model.init import filled, init_rule, materialize, normal_, param_seed
from model.stage import PipelineStage, merge_state_dicts
from model.transformer import meta_device


def _split(L: int, P: int) -> list[tuple[int, int]]:
    cuts = [round(i * L / P) for i in range(P + 1)]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def _layout_state(args: ModelArgs, P: int, E: int, seed: int) -> dict[str, torch.Tensor]:
    parts = []
    for lo, hi in _split(args.num_hidden_layers, P):
        for e in range(E):
            st = PipelineStage.build(args, lo, hi, e, E, seed=seed)
            assert not any(t.is_meta for t in st.state_dict().values())
            parts.append((st.state_dict(), st.expert_lo))
    return merge_state_dicts(parts, args.n_routed_experts)


@pytest.mark.parametrize("P,E", [(1, 1), (2, 2), (4, 2), (2, 8)])
def test_every_layout_starts_from_the_same_parameters(P, E):
    args = ModelArgs.flavor("debug")
    want = Transformer.build(args, seed=3).state_dict()
    got = _layout_state(args, P, E, seed=3)
    assert set(got) == set(want)
    for k, t in want.items():
        assert torch.equal(got[k], t), k


def test_the_last_stage_copy_of_the_embedding_equals_the_first_stages():
    args = ModelArgs.flavor("debug")
    first = PipelineStage.build(args, 0, 2, seed=0)
    last = PipelineStage.build(args, 2, 4, seed=0)
    assert last.embed_tokens is not None  # MTP reads it
    assert torch.equal(first.embed_tokens.weight, last.embed_tokens.weight)


def test_values_follow_the_declared_rules_and_the_seed():
    args = ModelArgs.flavor("debug")
    a = Transformer.build(args, seed=0)
    b = Transformer.build(args, seed=1)
    legacy = Transformer(args)  # the global-RNG build: the same distributions
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), legacy.parameters(), strict=True):
        kind, value, _ = init_rule(p)
        if kind == "const":
            assert torch.equal(p, torch.full_like(p, value)) and torch.equal(p, r), name
        else:
            assert not torch.equal(p, q), name  # the seed matters
            if p.numel() >= 512:
                std, mean = float(p.detach().std()), float(p.detach().mean())
                assert abs(std / value - 1) < 0.15 and abs(mean) < 0.2 * value, name
    # buffers (rotary tables, hash-routing tables, router biases) are those of a CPU build
    for (name, t), u in zip(a.named_buffers(), legacy.buffers(), strict=True):
        assert torch.equal(t, u), name


def test_tensors_of_the_same_shape_draw_different_values():
    args = ModelArgs.flavor("debug")
    m = Transformer.build(args, seed=0)
    q0, q1 = m.layers[0].self_attn.q_b_proj.weight, m.layers[1].self_attn.q_b_proj.weight
    assert q0.shape == q1.shape and not torch.equal(q0, q1)
    ex = m.layers[3].mlp.experts.gate_up_proj
    assert not torch.equal(ex[0], ex[1])  # every expert row has its own stream
    assert param_seed(0, "a") != param_seed(0, "b") != param_seed(1, "b")


def test_every_flavor_declares_every_parameter():
    for flavor in ("debug", "tiny", "small", "v4-flash", "v4-pro"):
        with meta_device():
            m = Transformer(ModelArgs.flavor(flavor))
        missing = [n for n, p in m.named_parameters() if init_rule(p) is None]
        assert not missing, (flavor, missing[:5])


def test_an_actor_of_v4_flash_materialises_only_its_share():
    """A V4-Flash-shaped model has ~290B parameters (~1.2 TB in float32); one actor of a
    43-stage x 256-shard graph holds one layer's attention, router, shared expert and one
    routed expert, and builds here in seconds."""
    args = ModelArgs.flavor("v4-flash")
    st = PipelineStage.build(args, 10, 11, ep_rank=5, ep_size=args.n_routed_experts, seed=0)
    with meta_device():
        ref = PipelineStage.from_model(Transformer(args), 10, 11, False, False, 5, args.n_routed_experts)
    shapes = {n: tuple(p.shape) for n, p in st.named_parameters()}
    assert shapes == {n: tuple(p.shape) for n, p in ref.named_parameters()}
    n = sum(p.numel() for p in st.parameters())
    assert n < 2e8 and st.layers["10"].mlp.experts.gate_up_proj.shape[0] == 1
    # the shard's expert row is the one the whole model would give expert 5
    small = ModelArgs.flavor("debug")
    whole = Transformer.build(small, seed=0).layers[3].mlp.experts.down_proj
    shard = PipelineStage.build(small, 2, 4, ep_rank=1, ep_size=4, seed=0).layers["3"].mlp.experts.down_proj
    assert torch.equal(shard, whole[2:4])


def test_a_parameter_without_a_rule_is_named():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.ok = filled(3, 1.0)
            self.w = nn.Parameter(torch.empty(2, 2))
            self.v = normal_(nn.Parameter(torch.empty(4, 4)), 0.02)

    with meta_device():
        bad = Bad()
    with pytest.raises(ValueError, match=r"parameter w \(2, 2\) declares no initialisation"):
        materialize(bad, 0)


def test_a_buffer_nobody_resets_is_an_error():
    class Buf(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.zeros(3))

    with meta_device():
        m = Buf()
    with pytest.raises(ValueError, match=r"no reset_buffers\(\): \['table'\]"):
        materialize(m, 0)
