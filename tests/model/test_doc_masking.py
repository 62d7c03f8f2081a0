"""Sample-level attention masking: packed documents do not see each other."""

import pytest
import torch

from model import ModelArgs, Transformer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelArgs.flavor("debug", index_n_heads=16)).eval()


def test_block_aligned_documents_match_running_alone(model):
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 512, (2, 48), generator=g)  # 48 = 3 HCA blocks of 16, 12 CSA blocks of 4
    b = torch.randint(0, 512, (2, 80), generator=g)
    packed = torch.cat([a, b], dim=1)
    docs = torch.cat([torch.zeros(2, 48, dtype=torch.long), torch.ones(2, 80, dtype=torch.long)], dim=1)
    with torch.no_grad():
        out = model(packed, doc_ids=docs)
        alone_a, alone_b = model(a), model(b)
        unmasked = model(packed)
    assert (out[:, :48] - alone_a).abs().max() <= 1e-5
    assert (out[:, 48:] - alone_b).abs().max() <= 1e-5
    assert (unmasked[:, 48:] - alone_b).abs().max() > 1e-2  # without doc_ids, b does see a


def test_unaligned_boundary_still_isolates(model):
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, 512, (1, 150), generator=g)
    docs = torch.tensor([[0] * 37 + [1] * 50 + [2] * 63])
    other = seq.clone()
    other[:, :87] = torch.randint(0, 512, (1, 87), generator=g)  # change documents 0 and 1
    with torch.no_grad():
        x = model(seq, doc_ids=docs)
        y = model(other, doc_ids=docs)
    # document 2 never saw them (up to GEMM rounding: other tokens change the expert batch shapes)
    assert (x[:, 87:] - y[:, 87:]).abs().max() <= 1e-5
    assert not torch.allclose(x[:, 37:87], y[:, 37:87])


def test_gradients_do_not_cross_documents(model):
    emb = model.embed_tokens
    seq = torch.randint(0, 512, (1, 96), generator=torch.Generator().manual_seed(2))
    docs = torch.tensor([[0] * 32 + [1] * 64])
    x = emb(seq).detach().requires_grad_(True)
    handle = emb.register_forward_hook(lambda m, i, o: x)
    try:
        logits = model(seq, doc_ids=docs)
        logits[:, 32:].sum().backward()
    finally:
        handle.remove()
    assert x.grad[:, :32].abs().max() == 0 and x.grad[:, 32:].abs().max() > 0


def test_bad_doc_ids(model):
    """Shapes are checked by every forward; values once per batch (``check_tokens``, no device sync)."""
    from model.inputs import check_tokens

    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="non-decreasing"):
        check_tokens(ids, model.args.vocab_size, torch.tensor([[0, 0, 1, 1, 0, 0, 1, 1]]))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 512\)"):
        check_tokens(ids + 512, model.args.vocab_size)
    with pytest.raises(ValueError, match="shape"):
        model(ids, doc_ids=torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="stateless"):
        model(ids, model.new_state(1), doc_ids=torch.zeros(1, 8, dtype=torch.long))
