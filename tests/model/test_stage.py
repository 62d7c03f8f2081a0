"""Pipeline stages in one process: slicing a Transformer into stages x expert shards changes nothing."""

import pytest
import torch

from model import ModelArgs, Transformer
from model.losses import LossNorms
from model.stage import PipelineStage, is_expert_param, merge_state_dicts, shard_range
from model.training import LossConfig, compute_losses, set_attention_mode


def _batch(B=2, S=64, vocab=512):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (B, S + 1), generator=g)
    labels = ids[:, 1:].clone()
    labels[0, :5] = -100
    return {"input_ids": ids[:, :-1], "labels": labels}


def fresh() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelArgs.flavor("debug", index_n_heads=8))


@pytest.fixture()
def model():
    return fresh()


def test_chained_stages_equal_the_model(model):
    batch = _batch()
    ref = model.forward_hidden(batch["input_ids"])
    m = fresh()
    stages = [PipelineStage.from_model(m, lo, hi, lo == 0, hi == 4) for lo, hi in ((0, 1), (1, 3), (3, 4))]
    x = None
    for st in stages:
        x, _ = st(x, batch["input_ids"])
    assert torch.equal(x, ref)
    assert [n for n, _ in stages[1].named_parameters()][0].startswith("layers.1.")


def test_stage_losses_add_up_to_compute_losses(model):
    m = fresh()
    set_attention_mode(m, "sparse")
    batch = _batch(B=4)
    want, metrics, _ = compute_losses(m, batch, LossConfig(mode="sparse"))
    m2 = fresh()
    st = PipelineStage.from_model(m2, 0, 4, True, True)
    set_attention_mode(st, "sparse")
    norms = LossNorms.of(batch)
    total, kl_sum, kl_rows = 0.0, 0.0, 0.0
    for half in (slice(0, 2), slice(2, 4)):  # two microbatches of the global batch
        mb = {k: v[half] for k, v in batch.items()}
        out, aux = st(None, mb["input_ids"])
        loss, sums, _ = st.losses(out, aux, mb, norms, LossConfig(mode="sparse"))
        total += loss.item() - sums["kl_sum"]
        kl_sum, kl_rows = kl_sum + sums["kl_sum"], kl_rows + sums["kl_rows"]
    assert total + kl_sum / kl_rows == pytest.approx(want.item(), abs=1e-5)


def test_expert_shards_slice_and_merge(model):
    full = model.state_dict()
    shards = []
    for e in range(2):
        st = PipelineStage.from_model(fresh(), 0, 4, True, True, ep_rank=e, ep_size=2)
        assert st.layers["1"].mlp.experts.gate_up_proj.shape[0] == 4
        shards.append((st.state_dict(), st.expert_lo))
    merged = merge_state_dicts(shards, 8)
    assert merged.keys() == full.keys()
    assert all(torch.equal(merged[k], full[k]) for k in full)
    with pytest.raises(ValueError, match="tile"):
        merge_state_dicts(shards[1:], 8)
    assert is_expert_param("layers.1.mlp.experts.down_proj") and not is_expert_param("layers.1.mlp.gate.weight")


def test_bad_slices_and_shards_are_errors(model):
    with pytest.raises(ValueError, match="divisible"):
        shard_range(8, 0, 3)
    with pytest.raises(ValueError, match="slice"):
        PipelineStage.from_model(fresh(), 2, 9, False, True)
    with pytest.raises(ValueError, match="first/last"):
        PipelineStage.from_model(fresh(), 0, 2, True, True)
    st = PipelineStage.from_model(fresh(), 2, 4, False, True)
    with pytest.raises(ValueError, match="streams"):
        st(None, _batch()["input_ids"])


@torch.no_grad()
def test_stages_with_decode_state_generate_like_the_model():
    m = fresh().eval()
    prompt = _batch(B=2, S=40)["input_ids"]
    want = m.generate(prompt, 12, chunk_size=16)
    stages = [PipelineStage.from_model(fresh().eval(), lo, hi, lo == 0, hi == 4) for lo, hi in ((0, 2), (2, 3), (3, 4))]
    states = [st.new_state(2) for st in stages]

    def step(ids):
        x = None
        for st, state in zip(stages, states, strict=True):
            x, _ = st(x, ids, state=state)
        return stages[-1].logits(x[:, -1:])[:, -1]

    for c in range(0, prompt.shape[1], 16):  # chunked prefill through the stages
        logits = step(prompt[:, c:c + 16])
    out = [prompt]
    for _ in range(12):
        nxt = logits.argmax(-1, keepdim=True)
        out.append(nxt)
        logits = step(nxt)
    assert torch.equal(torch.cat(out, 1), want)
    assert all(s.pos == 40 + 12 for s in states)
