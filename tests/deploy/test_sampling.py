"""Sampling and stop conditions for serving."""

import math

import torch

from deploy.sampling import Sampler, StopChecker

V = 50


def _logits(seed=0):
    return torch.randn(V + 6, generator=torch.Generator().manual_seed(seed))  # padded past the vocabulary


def test_greedy_and_its_equivalents():
    x = _logits()
    best = int(torch.argmax(x[:V]))
    assert Sampler(temperature=0, vocab_size=V).sample(x) == best
    assert Sampler(temperature=1.0, top_k=1, seed=3, vocab_size=V).sample(x) == best
    assert Sampler(temperature=1.0, top_p=1e-6, seed=3, vocab_size=V).sample(x) == best


def test_seed_makes_sampling_deterministic_and_padding_is_never_sampled():
    x = _logits()
    a = [Sampler(temperature=1.5, seed=7, vocab_size=V) for _ in range(2)]
    draws = [[s.sample(x) for _ in range(30)] for s in a]
    assert draws[0] == draws[1]
    assert max(draws[0]) < V
    assert len(set(draws[0])) > 3  # it really samples


def test_logit_bias_bans_and_forces_tokens():
    x = _logits()
    best = int(torch.argmax(x[:V]))
    assert Sampler(temperature=0, logit_bias={best: -100}, vocab_size=V).sample(x) != best
    s = Sampler(temperature=1.0, logit_bias={7: 100}, seed=0, vocab_size=V)
    assert all(s.sample(x) == 7 for _ in range(20))


def test_top_k_and_top_p_restrict_the_support():
    x = _logits(1)
    top3 = set(torch.topk(x[:V], 3).indices.tolist())
    s = Sampler(temperature=1.0, top_k=3, seed=1, vocab_size=V)
    assert {s.sample(x) for _ in range(200)} <= top3
    probs = torch.softmax(x[:V], 0)
    order = torch.argsort(probs, descending=True)
    mass = torch.cumsum(probs[order], 0)
    nucleus = set(order[: int((mass < 0.5).sum()) + 1].tolist())
    s = Sampler(temperature=1.0, top_p=0.5, seed=2, vocab_size=V)
    got = {s.sample(x) for _ in range(300)}
    assert got <= nucleus and len(got) >= min(2, len(nucleus))


def test_sampling_frequencies_follow_the_softmax():
    x = torch.tensor([2.0, 1.0, 0.0, -1.0])
    s = Sampler(temperature=1.0, seed=0, vocab_size=4)
    n = 4000
    counts = torch.bincount(torch.tensor([s.sample(x) for _ in range(n)]), minlength=4).float() / n
    want = torch.softmax(x, 0)
    assert float((counts - want).abs().max()) < 4 * math.sqrt(0.25 / n) + 0.01


def test_stop_strings_and_ids():
    c = StopChecker(stop=["\n\n", "END"], stop_token_ids=[3])
    assert c.check(3, "abc") == (True, 3, "stop")
    assert c.check(9, "x = 1\n") == (False, 5, None)  # "\n" may start "\n\n": held back
    assert c.check(9, "x = 1\n\ny") == (True, 5, "stop")  # cut before the stop string
    assert c.check(9, "the EN") == (False, 4, None)
    assert c.check(9, "the END") == (True, 4, "stop")
    assert StopChecker().check(9, "abc") == (False, 3, None)
