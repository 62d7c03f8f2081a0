"""The end of `tide train --then-serve` (`make run`): `deploy.serve.serve_and_ask` serves a model under
Ray Serve, asks one seeded chat completion through the OpenAI client and stops serving. With
TIDE_API_KEY set the replica gets the key's digest and the client the key."""

import ray
from fastapi.testclient import TestClient

from deploy.app import build_app
from deploy.loader import load_engine
from deploy.serve import serve_and_ask
from tests.deploy.util import write_tiny_hf


def test_serve_and_ask_answers_what_the_model_answers(tmp_path, monkeypatch):
    d = tmp_path / "hf"
    write_tiny_hf(d, tmp_path / "tok")
    monkeypatch.setenv("TIDE_API_KEY", "tk-serve-and-ask-0123456789")
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        got = serve_and_ask(d, None, "hello", max_tokens=6)
        serve_actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE" in a["name"].upper()]
        assert not serve_actors  # Serve was shut down again
    finally:
        ray.shutdown()
    assert got["ttft_s"] > 0 and got["answer"]
    # the same seeded request against the engine in this process (no Serve, no HTTP server)
    engine = load_engine(str(d), model_name="tide")
    try:
        body = {"model": "tide", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 6,
                "temperature": 0.7, "top_p": 0.95, "seed": 0}
        r = TestClient(build_app(engine)).post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert got["answer"] == r.json()["choices"][0]["message"]["content"]
    finally:
        engine.close()
