"""Logit-for-logit parity with ``transformers.DeepseekV4ForCausalLM`` (random weights, float32)."""

from __future__ import annotations

import pytest
import torch

from tests.model.hf_utils import CONFIGS, hf_pair, make_args

TOL = 1e-5


def _lengths(name: str) -> list[int]:
    a = make_args(name)
    m, mh, w = a.csa_rate, a.hca_rate, a.sliding_window
    return sorted({1, 2, m - 1, m, m + 1, w - 1, w, w + 1, mh - 1, mh, mh + 1, 2 * mh + 3, 300})


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    hf, ours = hf_pair(request.param, seed=list(CONFIGS).index(request.param))
    return request.param, hf, ours


def test_full_sequence_logits(pair):
    name, hf, ours = pair
    g = torch.Generator().manual_seed(7)
    for S in _lengths(name):
        ids = torch.randint(0, hf.config.vocab_size, (2, S), generator=g)
        with torch.no_grad():
            ref = hf(ids).logits
            got = ours(ids)
        err = (ref - got).abs().max().item()
        assert err <= TOL, f"{name}: S={S} max abs err {err:.3e}"


def test_decode_and_chunked_prefill_match_full_forward_and_hf_cache(pair):
    name, hf, ours = pair
    g = torch.Generator().manual_seed(11)
    S, p = 120, 37
    ids = torch.randint(0, hf.config.vocab_size, (2, S), generator=g)
    with torch.no_grad():
        full = ours(ids)
        # token-by-token decode after a prefill of p tokens
        st = ours.new_state(2)
        steps = [ours(ids[:, :p], st)] + [ours(ids[:, t:t + 1], st) for t in range(p, S)]
        dec = torch.cat(steps, dim=1)
        assert st.pos == S
        assert (dec - full).abs().max().item() <= TOL
        # chunked prefill with ragged chunk sizes (prefill -> decode -> chunked prefill)
        st = ours.new_state(2)
        bounds = [0, 5, 6, 29, 30, 31, 77, 78, S]
        chunks = [ours(ids[:, a:b], st) for a, b in zip(bounds, bounds[1:])]
        assert (torch.cat(chunks, 1) - full).abs().max().item() <= TOL
        # HF's own cached path agrees with ours step by step
        out = hf(ids[:, :p], use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        hf_steps = [out.logits]
        for t in range(p, S):
            out = hf(ids[:, t:t + 1], cache=cache, use_cache=True)
            hf_steps.append(out.logits)
        assert (torch.cat(hf_steps, 1) - dec).abs().max().item() <= TOL


def test_gradients_match(pair):
    name, hf, ours = pair
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, hf.config.vocab_size, (2, 150), generator=g)
    labels = torch.randint(0, hf.config.vocab_size, (2 * 150,), generator=g)

    def ce(logits):  # the training loss: mean next-token cross-entropy
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels)

    hf.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)
    ce(hf(ids).logits).backward()
    ce(ours(ids)).backward()
    ours_params = dict(ours.named_parameters())
    checked = 0
    for key, p in hf.named_parameters():
        name_ = key[len("model."):] if key.startswith("model.") else key
        mine = ours_params[name_]
        if p.grad is None:  # HF trains nothing through the indexer's top-k selection
            assert mine.grad is None or mine.grad.abs().max() == 0, name_
            continue
        err = (p.grad - mine.grad).abs().max().item()
        scale = p.grad.abs().max().item()
        assert err <= 1e-4, f"{name}: grad of {name_} differs by {err:.3e}"
        assert err <= 1e-4 * scale + 1e-8, f"{name}: grad of {name_} rel. err {err / scale:.3e}"
        checked += 1
    assert checked > 20
