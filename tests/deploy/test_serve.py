"""The app under Ray Serve, driven by the official `openai` client (completion, chat, streamed chat, models)."""

import pytest
import ray
import torch
from ray import serve

from comm.launch import free_port
from deploy.serve import build
from tests.deploy.util import write_tiny_hf


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    model, tok = write_tiny_hf(d, tmp_path_factory.mktemp("tok"))
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # its own cluster, whatever else runs
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build({"path": str(d), "model_name": "tide-test"}), name="tide", route_prefix="/")
    yield f"http://127.0.0.1:{port}/v1", model, tok
    serve.shutdown()
    ray.shutdown()


def test_openai_client_against_serve(server):
    import openai

    url, model, tok = server
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["tide-test"]
    prompt = "def add(a, b):"
    c = client.completions.create(model="tide-test", prompt=prompt, max_tokens=6, temperature=0)
    ids = tok.encode(prompt).ids
    want = model.eval().generate(torch.tensor([ids]), 6)[0, len(ids):].tolist()
    eos = tok.token_to_id("<|endoftext|>")
    want = want[:want.index(eos)] if eos in want else want
    assert c.choices[0].text == tok.decode(want)
    msgs = [{"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(model="tide-test", messages=msgs, max_tokens=5, temperature=0.7, seed=3)
    text = chat.choices[0].message.content
    stream = client.chat.completions.create(model="tide-test", messages=msgs, max_tokens=5, temperature=0.7, seed=3,
                                            stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream) == text
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tide-test", prompt="x", max_tokens=1, top_p=5)
