"""OpenAI-compatible request schemas and the OpenAI error shape.

Pydantic models validate ``/v1/completions`` and ``/v1/chat/completions`` bodies;
``validate_request`` adds the checks that need the served model (vocabulary size,
context length) and turns every problem into an ``APIError`` carrying the HTTP
status and OpenAI's error body::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "top_p", "code": null}}

so the HTTP layer never answers 500 for bad input.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

MAX_N = 8  # completions per request
MAX_STOP = 4  # stop strings per request (OpenAI's limit)


class APIError(Exception):
    """A request that gets an error answer: ``status`` (HTTP), ``message``, ``param`` (the field), ``type``."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type

    def body(self) -> dict:
        """OpenAI's error JSON."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": None}}


class SamplingParams(BaseModel):
    """Fields shared by completions and chat completions (OpenAI semantics; ``top_k`` and
    ``stop_token_ids`` are vLLM-style extensions). ``seed`` makes sampling deterministic."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: StrictInt | None = Field(default=None, description="new tokens, >= 1 (default: up to the context)")
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: StrictInt = -1
    n: StrictInt = 1
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] | None = None
    logit_bias: dict[str, float] | None = None
    stream: StrictBool = False
    stream_options: dict | None = None
    user: str | None = None
    # accepted at their no-op values only (anything else is a 400 naming the field: never silently ignored)
    logprobs: bool | int | None = None
    echo: bool | None = None
    best_of: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    tools: list | None = None
    response_format: dict | None = None

    @model_validator(mode="after")
    def _unsupported(self):
        noop = {"logprobs": (None, False, 0), "echo": (None, False), "best_of": (None, 1),
                "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "tools": (None, [])}
        for name, ok in noop.items():
            if getattr(self, name) not in ok:
                raise ValueError(f"{name} is not supported by this server (allowed: omitted or "
                                 f"{', '.join(repr(v) for v in ok if v is not None)})")
        if self.response_format not in (None, {"type": "text"}):
            raise ValueError("response_format: only {\"type\": \"text\"} is supported")
        if self.stream_options is not None:
            extra = set(self.stream_options) - {"include_usage"}
            if extra or not isinstance(self.stream_options.get("include_usage", False), bool):
                raise ValueError("stream_options: only {\"include_usage\": true|false} is supported")
        return self

    @field_validator("seed")
    @classmethod
    def _seed(cls, v):
        if v is not None and not -(2 ** 63) <= v < 2 ** 63:
            raise ValueError(f"seed must fit a signed 64-bit integer, got {v}")
        return v

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, v):
        if v is not None and v <= 0:
            raise ValueError(f"max_tokens must be >= 1, got {v}")
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v):
        if not math.isfinite(v) or not 0 <= v <= 2:
            raise ValueError(f"temperature must be a finite number in [0, 2], got {v}")
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v):
        if not math.isfinite(v) or not 0 < v <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {v}")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v):
        if v < -1 or v == 0:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {v}")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v):
        if not 1 <= v <= MAX_N:
            raise ValueError(f"n must be between 1 and {MAX_N}, got {v}")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(SamplingParams):
    """``POST /v1/completions``: ``prompt`` is a non-empty string (or a list of one)."""

    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        items = [v] if isinstance(v, str) else v
        if not items or any(not p for p in items):
            raise ValueError("prompt must be a non-empty string")
        if len(items) > 1:
            raise ValueError("one prompt per request (use n for several completions)")
        return v

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ChatMessage(BaseModel):
    """A chat message; ``content`` is a string or a list of ``{"type": "text", "text": ...}`` parts (joined)."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict]

    @field_validator("content")
    @classmethod
    def _content(cls, v):
        if isinstance(v, str):
            return v
        texts = []
        for part in v:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content parts must be {{\"type\": \"text\", \"text\": ...}} (this model reads "
                                 f"text only), got type {part.get('type')!r}")
            texts.append(part["text"])
        return "".join(texts)


class ChatCompletionRequest(SamplingParams):
    """``POST /v1/chat/completions``: a non-empty list of messages."""

    messages: list[ChatMessage]
    max_completion_tokens: StrictInt | None = None  # the newer name of max_tokens

    @model_validator(mode="after")
    def _messages(self):
        if not self.messages:
            raise ValueError("messages must be a non-empty list")
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError("give max_tokens or max_completion_tokens, not two different values")
            if self.max_completion_tokens <= 0:
                raise ValueError(f"max_completion_tokens must be >= 1, got {self.max_completion_tokens}")
            self.max_tokens = self.max_completion_tokens
        return self


def _first_error(e: ValidationError) -> APIError:
    err = e.errors()[0]
    param = ".".join(str(p) for p in err.get("loc", ())) or None
    msg = err.get("msg", "invalid request")
    msg = msg.removeprefix("Value error, ")
    return APIError(400, f"{param}: {msg}" if param else msg, param)


def validate_request(body: object, kind: Literal["completion", "chat"], *, vocab_size: int, context: int,
                     model_name: str, prompt_tokens: int | None = None):
    """Parse and check a request body against the served model.

    Args:
        body: the decoded JSON body (anything: non-objects are rejected).
        kind: ``"completion"`` or ``"chat"``.
        vocab_size: the tokenizer/model vocabulary (for stop token ids and logit_bias keys).
        context: the model's context length (``max_position_embeddings`` or the serving cap).
        model_name: the served model's id (a different ``model`` is a 404, as OpenAI answers).
        prompt_tokens: the prompt's length in tokens when already known (checked against the context).
    Returns:
        The ``CompletionRequest`` or ``ChatCompletionRequest``.
    Raises:
        APIError: 400 naming the field and the allowed values; 404 for an unknown model.
    """
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    cls = CompletionRequest if kind == "completion" else ChatCompletionRequest
    try:
        req = cls.model_validate(body)
    except ValidationError as e:
        raise _first_error(e) from None
    if req.model is not None and req.model != model_name:
        raise APIError(404, f"model {req.model!r} does not exist; this server serves {model_name!r}", "model",
                       type="not_found_error")
    bad = [t for t in (req.stop_token_ids or []) if not 0 <= t < vocab_size]
    if bad:
        raise APIError(400, f"stop_token_ids {bad} are outside the vocabulary [0, {vocab_size})", "stop_token_ids")
    for key, bias in (req.logit_bias or {}).items():
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab_size:
            raise APIError(400, f"logit_bias key {key!r} is not a token id in [0, {vocab_size})", "logit_bias")
        if not math.isfinite(bias) or not -100 <= bias <= 100:
            raise APIError(400, f"logit_bias values must be in [-100, 100], got {bias} for token {key}",
                           "logit_bias")
    if req.max_tokens is not None and req.max_tokens >= context:
        raise APIError(400, f"max_tokens ({req.max_tokens}) must be below the context length ({context})",
                       "max_tokens")
    if prompt_tokens is not None:
        check_context(req, prompt_tokens, context, kind)
    return req


def check_context(req, prompt_tokens: int, context: int, kind: Literal["completion", "chat"]) -> None:
    """The prompt plus ``max_tokens`` (at least one new token) must fit the context.

    Raises:
        APIError: 400 naming both numbers.
    """
    want = prompt_tokens + (req.max_tokens or 1)
    if want > context:
        raise APIError(400, f"the prompt has {prompt_tokens} tokens and max_tokens asks for "
                            f"{req.max_tokens or 1} more: {want} > the context length {context}",
                       "messages" if kind == "chat" else "prompt")
