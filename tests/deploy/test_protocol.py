"""OpenAI request validation: every bad input is a 4xx naming the field, in OpenAI's error shape."""

import pytest

from deploy.protocol import APIError, ChatCompletionRequest, CompletionRequest, validate_request

KW = dict(vocab_size=512, context=1024, model_name="tide-debug")


def _err(body, kind="completion", **kw):
    with pytest.raises(APIError) as e:
        validate_request(body, kind, **{**KW, **kw})
    return e.value


def test_good_requests_parse():
    r = validate_request({"prompt": "def f(", "max_tokens": 5, "temperature": 0, "stop": "\n"}, "completion", **KW)
    assert isinstance(r, CompletionRequest) and r.text() == "def f(" and r.stops() == ["\n"]
    c = validate_request({"model": "tide-debug", "messages": [{"role": "user", "content": "hi"}], "n": 2,
                          "logit_bias": {"5": -100}, "stop_token_ids": [0, 511]}, "chat", **KW)
    assert isinstance(c, ChatCompletionRequest) and c.n == 2


@pytest.mark.parametrize("body,kind,param,status", [
    ([1, 2], "completion", None, 400),
    ("text", "chat", None, 400),
    ({}, "completion", "prompt", 400),
    ({"prompt": ""}, "completion", "prompt", 400),
    ({"prompt": ["a", "b"]}, "completion", "prompt", 400),
    ({"messages": []}, "chat", None, 400),
    ({"messages": [{"role": "robot", "content": "x"}]}, "chat", "messages.0.role", 400),
    ({"prompt": "x", "max_tokens": 0}, "completion", "max_tokens", 400),
    ({"prompt": "x", "max_tokens": 5000}, "completion", "max_tokens", 400),
    ({"prompt": "x", "temperature": -0.1}, "completion", "temperature", 400),
    ({"prompt": "x", "temperature": 2.5}, "completion", "temperature", 400),
    ({"prompt": "x", "temperature": float("nan")}, "completion", "temperature", 400),
    ({"prompt": "x", "top_p": 0}, "completion", "top_p", 400),
    ({"prompt": "x", "top_p": 1.5}, "completion", "top_p", 400),
    ({"prompt": "x", "top_k": -2}, "completion", "top_k", 400),
    ({"prompt": "x", "n": 0}, "completion", "n", 400),
    ({"prompt": "x", "n": 99}, "completion", "n", 400),
    ({"prompt": "x", "stop": ""}, "completion", "stop", 400),
    ({"prompt": "x", "stop": ["a", ""]}, "completion", "stop", 400),
    ({"prompt": "x", "stop_token_ids": [512]}, "completion", "stop_token_ids", 400),
    ({"prompt": "x", "logit_bias": {"abc": 1}}, "completion", "logit_bias", 400),
    ({"prompt": "x", "logit_bias": {"600": 1}}, "completion", "logit_bias", 400),
    ({"prompt": "x", "logit_bias": {"5": 1000}}, "completion", "logit_bias", 400),
    ({"prompt": "x", "model": "gpt-4"}, "completion", "model", 404),
])
def test_bad_inputs_name_the_field(body, kind, param, status):
    e = _err(body, kind)
    assert e.status == status and e.param == param, (e.status, e.param, e.message)
    b = e.body()["error"]
    assert set(b) == {"message", "type", "param", "code"} and b["message"]


def test_prompt_longer_than_the_context_names_both_numbers():
    e = _err({"prompt": "x", "max_tokens": 100}, prompt_tokens=1000)
    assert e.status == 400 and "1000" in e.message and "1024" in e.message and e.param == "prompt"
