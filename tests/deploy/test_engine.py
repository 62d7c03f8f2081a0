"""Continuous batching: concurrent requests decode together and each gets what it would get alone."""

from __future__ import annotations

import threading

import pytest
import torch

from cluster.data import train_or_load_tokenizer
from deploy.engine import LocalEngine
from deploy.protocol import validate_request
from model import ModelArgs, Transformer

TEXTS = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n",
         "for i in range(10):\n    pass\n", "class A:\n    x = 1\n"] * 20


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    tok = train_or_load_tokenizer(TEXTS, 300, tmp_path_factory.mktemp("tok"), progress=False)
    torch.manual_seed(0)
    model = Transformer(ModelArgs.flavor("debug", vocab_size=tok.get_vocab_size(), max_position_embeddings=512))
    return model.eval(), tok


def _req(engine, **fields):
    body = {"prompt": "x", "temperature": 0, **fields}
    return validate_request(body, "completion", vocab_size=engine.vocab_size, context=engine.context,
                            model_name=engine.model_name)


def _run_concurrently(engine, jobs):
    """Run ``(prompt_ids, req)`` jobs on threads at once; returns each job's (text, finish, tokens)."""
    out = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def run(i, ids, req):
        start.wait()
        ds = list(engine.stream(ids, req))
        out[i] = ("".join(d.text for d in ds), ds[-1].finish_reason, ds[-1].tokens)

    threads = [threading.Thread(target=run, args=(i, ids, req)) for i, (ids, req) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_concurrent_requests_batch_and_match_each_alone(parts):
    model, tok = parts
    engine = LocalEngine(model, tok, "m", max_batch=8, prefill_chunk=16)  # small chunks: long prompts take turns
    try:
        g = torch.Generator().manual_seed(0)
        V, eos = model.args.vocab_size, engine.eos_id
        jobs = []
        for i, n in enumerate([3, 40, 7, 90, 1, 25]):  # ragged lengths; 40 and 90 need several prefill chunks
            ids = torch.randint(0, V, (n,), generator=g).tolist()
            # greedy and seeded sampling, different lengths (requests leave the batch at different steps)
            fields = {"max_tokens": 6 + 3 * i, "logit_bias": {str(eos): -100}}
            if i % 2:
                fields.update(temperature=0.8, top_k=20, seed=i)
            jobs.append((ids, _req(engine, **fields)))
        alone = [_run_concurrently(engine, [job])[0] for job in jobs]
        steps, rows = engine.decode_steps, engine.decode_rows
        together = _run_concurrently(engine, jobs)
        assert together == alone
        s = engine.stats()
        assert s["live_sequences"] == 0 and s["decode_state_bytes"] == 0
        assert (engine.decode_rows - rows) / (engine.decode_steps - steps) > 2  # really decoded together
        # greedy rows equal the model's own generate
        for (ids, req), (text, finish, n) in zip(jobs[::2], alone[::2], strict=True):
            want = model.generate(torch.tensor([ids]), req.max_tokens)[0, len(ids):].tolist()
            assert n == req.max_tokens and finish == "length"
            assert text == tok.decode(want)
    finally:
        engine.close()


def test_batch_limit_queues_the_rest_and_everyone_finishes(parts):
    model, tok = parts
    engine = LocalEngine(model, tok, "m", max_batch=2)
    try:
        jobs = [([5 + i, 9], _req(engine, max_tokens=4, logit_bias={str(engine.eos_id): -100})) for i in range(5)]
        res = _run_concurrently(engine, jobs)
        assert [r[1:] for r in res] == [("length", 4)] * 5
        assert engine.stats()["mean_decode_batch"] <= 2
    finally:
        engine.close()


def test_a_backend_failure_reaches_every_request_and_later_ones(parts):
    model, tok = parts
    engine = LocalEngine(model, tok, "m")

    def broken(seqs, toks):
        raise RuntimeError("device lost")

    engine.backend.decode = broken
    with pytest.raises(RuntimeError, match="device lost"):
        list(engine.stream([1, 2, 3], _req(engine, max_tokens=5, logit_bias={str(engine.eos_id): -100})))
    with pytest.raises(RuntimeError, match="failed earlier"):
        list(engine.stream([1, 2, 3], _req(engine, max_tokens=5)))
    from fastapi.testclient import TestClient

    from deploy.app import build_app

    r = TestClient(build_app(engine)).get("/health")  # Serve's health check and load balancers see it
    assert r.status_code == 503 and "device lost" in r.json()["error"]["message"]
    engine.close()


def test_a_short_request_does_not_wait_behind_a_long_prompt(parts):
    model, tok = parts
    engine = LocalEngine(model, tok, "m", prefill_chunk=16)  # the long prompt needs 25 iterations of prefill
    try:
        order = []

        def run(name, ids, n):
            list(engine.stream(ids, _req(engine, max_tokens=n, logit_bias={str(engine.eos_id): -100})))
            order.append(name)

        long = threading.Thread(target=run, args=("long", [7] * 400, 2))
        long.start()
        while engine.stats()["live_sequences"] == 0:  # the long prompt's prefill has begun
            pass
        short = threading.Thread(target=run, args=("short", [5, 9, 11], 2))
        short.start()
        long.join(120)
        short.join(120)
        assert order == ["short", "long"]
    finally:
        engine.close()
