"""The sparse attention forward kernel against the torch reference (model.attention.Attention on a
stateless forward), under TRITON_INTERPRET=1: sliding-window, CSA (indexer picks, top-k larger
than the visible entries) and HCA layers, dense CSA (curriculum stage 1), packed documents, query
chunks, ragged lengths."""

import pytest
import torch

import kernels
from model import ModelArgs
from model.attention import Attention
from model.config import CSA, HCA, SWA


def _attention(layer_type: str, dense: bool = False) -> Attention:
    args = ModelArgs.flavor("debug", sliding_window=16, index_topk=4, compress_rates={CSA: 4, HCA: 8})
    torch.manual_seed(0)
    att = Attention(args, layer_type).eval()
    with torch.no_grad():
        att.sinks.normal_()
    att.dense_csa = dense
    return att


@pytest.mark.parametrize("layer_type,dense", [(SWA, False), (CSA, False), (CSA, True), (HCA, False)])
@pytest.mark.parametrize("S,packed", [(1, False), (37, False), (45, True)])
def test_attention_forward_with_the_kernel_matches_the_reference(layer_type, dense, S, packed, monkeypatch):
    import model.attention as attention_mod

    monkeypatch.setattr(attention_mod, "QUERY_CHUNK", 16)  # several query chunks
    att = _attention(layer_type, dense)
    x = torch.randn(2, S, att.q_a_proj.in_features, generator=torch.Generator().manual_seed(S))
    docs = None
    if packed:
        docs = torch.zeros(2, S, dtype=torch.long)
        docs[0, 13:] = 1
        docs[1, 24:] = 1
    with torch.no_grad():
        want = att(x, 0, None, docs)[0]
        with kernels.forced(True), torch.profiler.profile() as prof:
            got = att(x, 0, None, docs)[0]
    assert any(e.name == "tide::sparse_attention" for e in prof.events())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_training_through_the_kernel_matches_the_reference():
    """With gradients the layer backpropagates through the kernel: input and parameter gradients equal the
    reference's."""
    att = _attention(CSA)
    x = torch.randn(1, 23, att.q_a_proj.in_features, generator=torch.Generator().manual_seed(2))

    def run(on):
        att.zero_grad()
        xx = x.clone().requires_grad_(True)
        with kernels.forced(on), torch.profiler.profile() as prof:
            att(xx)[0].square().sum().backward()
        used = any(e.name == "tide::sparse_attention_backward" for e in prof.events())
        return used, [xx.grad] + [p.grad for p in att.parameters() if p.grad is not None]

    used, got = run(True)
    _, want = run(False)
    assert used
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "warmup"])
def test_indexer_kl_through_the_kernel_matches_the_reference(dense, monkeypatch):
    """Indexer warm-up (dense CSA) and sparse training: the kernel runs, its log-sum-exp rebuilds the
    teacher probabilities over the compressed entries, and the KL and every gradient (the indexer's
    come from the KL only) equal the reference's."""
    import model.attention as attention_mod

    monkeypatch.setattr(attention_mod, "QUERY_CHUNK", 16)  # several query chunks
    att = _attention(CSA, dense)
    att.indexer_kl = True
    x = torch.randn(2, 37, att.q_a_proj.in_features, generator=torch.Generator().manual_seed(5))

    def run(on):
        att.zero_grad()
        xx = x.clone().requires_grad_(True)
        with kernels.forced(on), torch.profiler.profile() as prof:
            out, kl = att(xx)
            (out.square().sum() + kl.total).backward()
        used = any(e.name == "tide::sparse_attention" for e in prof.events())
        return used, kl.total.detach(), int(kl.rows), {n: p.grad.clone() for n, p in att.named_parameters()
                                                 if p.grad is not None} | {"x": xx.grad}

    used, kl, rows, got = run(True)
    _, kl_ref, rows_ref, want = run(False)
    assert used and rows == rows_ref > 0
    torch.testing.assert_close(kl, kl_ref, rtol=1e-5, atol=1e-6)
    assert got.keys() == want.keys() and any("indexer" in n for n in got)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("mode", ["swa", "csa", "hca"])
@pytest.mark.parametrize("packed", [False, True])
def test_backward_matches_the_reference(mode, packed):
    """dq, dkv, dcomp, dsinks of the op against autograd through Attention._attend (one query chunk)."""
    from kernels.ops import sparse_attention

    layer = {"swa": SWA, "csa": CSA, "hca": HCA}[mode]
    att = _attention(layer)
    g = torch.Generator().manual_seed(3)
    B, S, H, D, K = 2, 21, 4, 64, 4
    T = S // att.rate if mode != "swa" else 0  # the complete blocks of the sequence
    q = torch.randn(B, S, H, D, generator=g, requires_grad=True)
    kv = torch.randn(B, S, D, generator=g, requires_grad=True)
    comp = torch.randn(B, T, D, generator=g, requires_grad=True) if mode != "swa" else None
    sinks = att.sinks  # the Parameter _attend reads
    docs = entry_doc = None
    if packed:
        docs = (torch.arange(S) >= 9).long().expand(B, S).contiguous()
        entry_doc = docs[:, torch.arange(T) * att.rate] if mode != "swa" else None
    idx = valid = None
    if mode == "csa":
        idx = torch.randint(0, T, (B, S, K), generator=g)
        limit = ((torch.arange(S) + 1) // att.rate).view(1, S, 1)
        valid = (idx < limit) & (torch.rand(B, S, K, generator=g) > 0.3)
        if packed:
            valid &= entry_doc.gather(1, idx.flatten(1)).view(B, S, K) == docs.unsqueeze(-1)
        idx = torch.where(valid, idx, torch.zeros_like(idx))
    dout = torch.randn(B, S, H, D, generator=g)

    def reference():
        pos = torch.arange(S)
        win = (pos.view(1, -1) <= pos.view(-1, 1)) & (pos.view(1, -1) > pos.view(-1, 1) - att.window)
        win = win.unsqueeze(0)
        if packed:
            win = win & (docs.unsqueeze(1) == docs.unsqueeze(2))
        ctx = None
        if mode == "csa":
            ctx = ("sparse", comp, idx, valid)
        elif mode == "hca":
            vis = (torch.arange(T).view(1, -1) < ((pos + 1) // att.rate).view(-1, 1)).unsqueeze(0)
            if packed:
                vis = vis & (entry_doc.unsqueeze(1) == docs.unsqueeze(2))
            ctx = ("dense", comp, vis)
        return att._attend(q, kv, win, ctx)[0]

    def grads(o):
        ins = [q, kv, sinks] + ([comp] if comp is not None else [])
        return torch.autograd.grad(o, ins, dout)

    want = reference()
    got, _ = sparse_attention(q, kv, sinks, att.window, 0, comp, idx, valid, att.rate, docs, entry_doc)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(["dq", "dkv", "dsinks", "dcomp"], grads(got), grads(want), strict=False):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
