"""A client that disconnects frees its decode state: the app served by uvicorn on a real socket, checked through
``GET /v1/stats`` only (``admitted_requests``, ``live_sequences``, ``decode_state_bytes``, ``completed``)."""

import gc
import http.client
import json
import socket
import struct
import threading
import time

import pytest
import torch
import uvicorn

from cluster.data import train_or_load_tokenizer
from comm.launch import free_port
from deploy.app import build_app
from deploy.engine import LocalEngine
from model import ModelArgs, Transformer
from tests.deploy.util import TEXTS

CONTEXT = 8192  # room for a stream that would run for a minute or more if nothing stopped it
FREED_WITHIN_S = 15.0  # a dropped request's state must be gone by then (the long stream's natural end is far later)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_or_load_tokenizer(TEXTS, 300, tmp_path_factory.mktemp("tok"), progress=False)


@pytest.fixture(scope="module")
def engine(tokenizer):
    """The engine under test (the only place that names its class)."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs.flavor("debug", vocab_size=tokenizer.get_vocab_size(),
                                         max_position_embeddings=CONTEXT))
    engine = LocalEngine(model, tokenizer, "tide-debug")
    yield engine
    if hasattr(engine, "close"):  # a batching engine's scheduler thread
        engine.close()


@pytest.fixture(scope="module")
def addr(engine):
    """(host, port) of the app over ``engine``, served by uvicorn in a daemon thread."""
    config = uvicorn.Config(build_app(engine), host="127.0.0.1", port=free_port(), log_level="warning",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    yield config.host, config.port
    server.should_exit = True
    thread.join(timeout=15)


@pytest.fixture(autouse=True)
def no_cyclic_gc():
    """Cyclic garbage collection off while a test runs: a dropped request must be freed by the server's own
    code, not whenever the collector happens to reach an abandoned generator (server and client share this
    process, so a collection here would otherwise hide that, or not, by chance)."""
    gc.disable()
    yield
    gc.enable()
    gc.collect()


@pytest.fixture(scope="module")
def never_stop(tokenizer):
    """A logit_bias that keeps the end-of-text token from being sampled, so generation runs to max_tokens."""
    return {str(tokenizer.token_to_id("<|endoftext|>")): -100}


def request(addr, method, path, body=None, timeout=30.0):
    """(status, parsed JSON body) of one request on a fresh connection."""
    conn = http.client.HTTPConnection(*addr, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def stats(addr, timeout=30.0) -> dict:
    status, body = request(addr, "GET", "/v1/stats", timeout=timeout)
    assert status == 200, body
    return body


def wait_until_idle(addr, timeout=FREED_WITHIN_S) -> dict:
    """Poll /v1/stats until no request is admitted and no decode state is live; the stats then."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"decode state not freed within {timeout:g} s; last /v1/stats: {last}")
        try:
            last = stats(addr, timeout=left)
        except TimeoutError:  # the server did not answer in time (it may be busy generating)
            continue
        if last["admitted_requests"] == 0 and last["live_sequences"] == 0 and last["decode_state_bytes"] == 0:
            return last
        time.sleep(0.02)


def send_completion(addr, body: dict, timeout: float) -> socket.socket:
    """A raw socket that has sent ``POST /v1/completions`` with ``body``."""
    data = json.dumps(body).encode()
    s = socket.create_connection(addr, timeout=timeout)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (addr[0].encode(), len(data), data))
    return s


def assert_canary(addr):
    status, body = request(addr, "POST", "/v1/completions", {"prompt": "import", "max_tokens": 2, "temperature": 0})
    assert status == 200, body
    assert body["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("how", ["close", "reset"])
def test_a_client_that_drops_a_stream_frees_its_decode_state(addr, never_stop, how):
    before = wait_until_idle(addr)
    s = send_completion(addr, {"prompt": "def add(a, b):", "max_tokens": CONTEXT - 64, "stream": True,
                               "logit_bias": never_stop}, timeout=30)
    try:
        buf = b""
        while buf.count(b"data: ") < 2:  # two server-sent events in: the sequence is generating
            chunk = s.recv(65536)
            assert chunk, f"the server closed the stream early: {buf!r}"
            buf += chunk
        assert buf.startswith(b"HTTP/1.1 200"), buf
        assert b"[DONE]" not in buf
        live = stats(addr)
        assert live["admitted_requests"] == 1 and live["live_sequences"] == 1 and live["decode_state_bytes"] > 0, live
        assert live["completed"] == before["completed"]
    finally:
        if how == "reset":  # RST instead of FIN
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    after = wait_until_idle(addr)
    assert after["completed"] > before["completed"], (before, after)
    assert_canary(addr)


def test_a_non_streamed_client_that_goes_away_cancels_its_request(addr, never_stop):
    # The non-streamed handler polls the connection (deploy.app.DISCONNECT_POLL_S) while the engine
    # generates; a client that leaves cancels the request and its decode state is freed long before
    # the request's natural end (max_tokens far away, end-of-text banned).
    assert_canary(addr)
    before = wait_until_idle(addr)
    max_tokens = 4000
    s = send_completion(addr, {"prompt": "def add(a, b):", "max_tokens": max_tokens, "logit_bias": never_stop},
                        timeout=1.0)
    try:
        with pytest.raises(TimeoutError):  # the client's timeout: no response yet
            s.recv(65536)
        assert stats(addr)["live_sequences"] == 1
    finally:
        s.close()
    after = wait_until_idle(addr, timeout=FREED_WITHIN_S)
    assert after["completed"] > before["completed"], (before, after)
    assert after["generated_tokens"] - before["generated_tokens"] < max_tokens  # cancelled, not finished
    assert_canary(addr)
