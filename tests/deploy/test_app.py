"""The OpenAI-compatible app over the local engine: real model, real tokenizer, HTTP via TestClient."""

import json

import pytest
import torch
from fastapi.testclient import TestClient

from cluster.data import train_or_load_tokenizer
from deploy.app import build_app
from deploy.engine import LocalEngine
from model import ModelArgs, Transformer
from tests.deploy.util import TEXTS


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    tok = train_or_load_tokenizer(TEXTS, 300, tmp_path_factory.mktemp("tok"), progress=False)
    torch.manual_seed(0)
    model = Transformer(ModelArgs.flavor("debug", vocab_size=tok.get_vocab_size(), max_position_embeddings=512))
    return LocalEngine(model, tok, "tide-debug")


@pytest.fixture(scope="module")
def client(engine):
    return TestClient(build_app(engine))


def test_greedy_completion_equals_model_generate(client, engine):
    prompt = "def add(a, b):"
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    d = r.json()
    ids = engine.encode(prompt)
    want = engine.model.generate(torch.tensor([ids]), 8)[0, len(ids):].tolist()
    if engine.eos_id in want:
        want = want[:want.index(engine.eos_id)]
    assert d["choices"][0]["text"] == engine.tokenizer.decode(want)
    assert d["choices"][0]["finish_reason"] == ("length" if len(want) == 8 else "stop")
    assert d["usage"]["prompt_tokens"] == len(ids) and d["object"] == "text_completion"
    assert d["usage"]["completion_tokens"] == min(8, len(want) + 1)  # the end-of-text token counts


def test_streamed_chat_matches_the_non_streamed_answer(client):
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, "temperature": 0.8, "seed": 5}
    full = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    r = client.post("/v1/chat/completions", json={**body, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    lines = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == full
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_models_and_health(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/v1/models").json()["data"][0]["id"] == "tide-debug"


@pytest.mark.parametrize("kwargs,status", [
    (dict(content=b"{not json", headers={"content-type": "application/json"}), 400),
    (dict(content=b'{"prompt": "\xff\xfe"}', headers={"content-type": "application/json"}), 400),
    (dict(content=b'{"prompt": "a\\ud800b"}', headers={"content-type": "application/json"}), 400),
    (dict(content=b'{"prompt": "a"}', headers={"content-type": "text/plain"}), 415),
    (dict(content=b'{"prompt": "' + b"a" * (2 << 20) + b'"}', headers={"content-type": "application/json"}), 413),
    (dict(json=[1, 2]), 400),
    (dict(json={"prompt": "x", "max_tokens": 0}), 400),
    (dict(json={"prompt": "x", "model": "gpt-4"}), 404),
    (dict(json={"prompt": "x " * 600, "max_tokens": 5}), 400),
    (dict(json={"prompt": "x", "seed": 2 ** 70}), 400),  # beyond 64 bits
    (dict(content=b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
          headers={"content-type": "application/json"}), 400),  # nested too deeply for the JSON parser
    (dict(json={"prompt": "x", "stream": "yes"}), 400),  # no silent type coercion
    (dict(json={"prompt": "x", "max_tokens": True}), 400),
    (dict(json={"prompt": "x", "logprobs": 5}), 400),  # unsupported features are refused, not ignored
    (dict(json={"prompt": "x", "best_of": 3}), 400),
    (dict(json={"prompt": "x", "presence_penalty": 0.5}), 400),
])
def test_bad_input_is_an_openai_error_and_the_engine_survives(client, kwargs, status):
    r = client.post("/v1/completions", **kwargs)
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    canary = client.post("/v1/completions", json={"prompt": "import", "max_tokens": 2, "temperature": 0})
    assert canary.status_code == 200


def test_api_key_is_enforced(engine):
    c = TestClient(build_app(engine, api_key="s3cret"))
    r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert c.get("/v1/models").status_code == 401
    assert c.get("/v1/stats").status_code == 401
    ok = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    ok = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers={"Authorization": "bearer s3cret"})
    assert ok.status_code == 200  # the scheme is case-insensitive
    assert c.get("/v1/stats", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_openai_fields_and_shapes(client):
    """max_completion_tokens bounds chat; text content parts; the usage chunk; the role chunk; 404 shape."""
    msgs = [{"role": "user", "content": [{"type": "text", "text": "he"}, {"type": "text", "text": "llo"}]}]
    r = client.post("/v1/chat/completions", json={"messages": msgs, "max_completion_tokens": 3, "temperature": 0,
                                                  "logit_bias": {"0": -100}})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 3
    plain = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hello"}],
                                                      "max_tokens": 3, "temperature": 0, "logit_bias": {"0": -100}})
    assert r.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]
    with client.stream("POST", "/v1/chat/completions",
                       json={"messages": msgs, "max_tokens": 2, "stream": True,
                             "stream_options": {"include_usage": True}}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] >= 1
    bad = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    assert bad.status_code == 400
    nf = client.get("/v1/nothing")
    assert nf.status_code == 404 and nf.json()["error"]["type"] == "not_found_error"


def test_overload_is_a_fast_503_with_retry_after(engine):
    c = TestClient(build_app(engine, max_queue=0))
    r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "overloaded_error"


def test_time_limit_cancels_and_frees_the_state(engine):
    c = TestClient(build_app(engine, request_timeout_s=0))
    r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 50})
    assert r.status_code == 408 and "time limit" in r.json()["error"]["message"]
    r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 50, "stream": True})
    events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert json.loads(events[-1])["error"]["type"] == "timeout_error"
    stats = c.get("/v1/stats").json()
    assert stats["live_sequences"] == 0 and stats["decode_state_bytes"] == 0 and stats["admitted_requests"] == 0


def _wait_for(pred, timeout=30.0):
    import time

    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, "condition not reached in time"
        time.sleep(0.01)


def test_a_dropped_stream_frees_its_decode_state(engine):
    from deploy.protocol import validate_request

    eos = engine.eos_id
    req = validate_request({"prompt": "import", "max_tokens": 400, "temperature": 0.9, "seed": 1,
                            "logit_bias": {str(eos): -100}}, "completion",
                           vocab_size=engine.vocab_size, context=engine.context, model_name=engine.model_name)
    _wait_for(lambda: engine.stats()["live_sequences"] == 0)
    before = engine.stats()["completed"]
    gen = engine.stream(engine.encode("import"), req)
    next(gen)
    live = engine.stats()
    assert live["live_sequences"] == 1 and live["decode_state_bytes"] > 0
    gen.close()  # what a client disconnect does to the streaming response's generator
    _wait_for(lambda: engine.stats()["live_sequences"] == 0)  # freed at the engine's next step
    after = engine.stats()
    assert after["decode_state_bytes"] == 0 and after["completed"] == before + 1
    assert after["generated_tokens"] - live["generated_tokens"] < 399  # cancelled, not run to the end
