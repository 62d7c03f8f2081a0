"""OpenAI-compatible HTTP app (FastAPI) over a generation engine.

``build_app(engine, api_key=None)``: ``GET /health``, ``GET /v1/models``,
``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` -> server-sent
events ending in ``data: [DONE]``). Bad input never gets a 500: bodies over
``max_body_bytes`` -> 413, a content type other than JSON -> 415, invalid UTF-8,
invalid JSON, a lone surrogate or a field out of range -> 400, an unknown model -> 404,
a missing or wrong API key (when one is set; Ray's token auth does not cover Serve's
HTTP port) -> 401 -- all in OpenAI's error shape (``deploy.protocol``).
Requests run concurrently on the engine (``deploy.engine.Engine``: continuous
batching); the app only admits them (``max_queue``) and streams what the engine yields.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import APIError, check_context, validate_request

MAX_BODY_BYTES = 1 << 20
MAX_QUEUE = 32
REQUEST_TIMEOUT_S = 300.0
DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there


# tide_serve_rejections reason of a refused request's HTTP status (cluster.ops.metrics.REJECTION_REASONS)
_REJECTION_OF_STATUS = {401: "unauthorized", 404: "unknown_model", 413: "too_large"}


def _error(e: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def build_app(engine, *, api_key=None, max_body_bytes: int = MAX_BODY_BYTES, max_queue: int = MAX_QUEUE,
              request_timeout_s: float = REQUEST_TIMEOUT_S) -> FastAPI:
    """The FastAPI app serving ``engine`` (see module docstring).

    ``api_key``: None (no key), the key (``str``) or an object with ``matches(presented) -> bool``
    (``deploy.serve.KeyDigest``), or a function returning one of those (read per request).
    ``max_queue``: requests admitted at once (running + waiting); more get a fast 503
    with ``Retry-After``. ``request_timeout_s``: a request still waiting or generating
    after that long is cancelled (408, or an error event when streaming) and its
    decode state freed.
    """
    # no /docs, /redoc, /openapi.json: they would answer without the API key (the API is OpenAI's, documented there)
    app = FastAPI(title="tide", description="OpenAI-compatible completions served by tide", docs_url=None,
                  redoc_url=None, openapi_url=None)
    admitted = [0]  # requests running or waiting in the engine
    admit_lock = threading.Lock()
    def reject(reason: str) -> None:
        """Count a refused request (``tide_serve_rejections``) on the engine's ``ServingMetrics``."""
        metrics = getattr(engine, "metrics", None)
        if metrics is not None:
            metrics.rejected(reason)

    def check_key(request: Request) -> None:
        key = api_key() if callable(api_key) else api_key
        if key is None:
            return
        scheme, _, got = request.headers.get("authorization", "").partition(" ")
        got = got.strip()
        ok = scheme.lower() == "bearer" and (key.matches(got) if hasattr(key, "matches")
                                             else hmac.compare_digest(got.encode(), key.encode()))
        if not ok:
            raise APIError(401, "missing or invalid API key (Authorization: Bearer <key>)", type="authentication_error")

    async def read_json(request: Request) -> object:
        ctype = request.headers.get("content-type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise APIError(415, f"content type must be application/json, got {ctype or 'none'!r}")
        raw = await request.body()
        if len(raw) > max_body_bytes:
            raise APIError(413, f"request body of {len(raw)} bytes exceeds the limit of {max_body_bytes}")
        try:
            return json.loads(raw.decode("utf-8"))
        except RecursionError:
            raise APIError(400, "request body is nested too deeply") from None
        except UnicodeDecodeError as e:
            raise APIError(400, f"request body is not valid UTF-8: {e.reason} at byte {e.start}") from None
        except json.JSONDecodeError as e:
            raise APIError(400, f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") \
                from None

    def prompt_of(req, kind: str) -> tuple[str, list[int]]:
        text = req.text() if kind == "completion" else engine.chat_prompt([m.model_dump() for m in req.messages])
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, "the prompt contains a lone surrogate (invalid Unicode)",
                           "prompt" if kind == "completion" else "messages") from None
        return text, engine.encode(text)

    async def handle(request: Request, kind: str):
        try:
            check_key(request)
            body = await read_json(request)
            req = validate_request(body, kind, vocab_size=engine.vocab_size, context=engine.context,
                                   model_name=engine.model_name)
            _, ids = prompt_of(req, kind)
            check_context(req, len(ids), engine.context, kind)
        except APIError as e:
            reject(_REJECTION_OF_STATUS.get(e.status, "invalid_request"))
            return _error(e)
        err = getattr(engine, "error", None)
        if err is not None:
            reject("engine_failed")
            return JSONResponse(APIError(503, f"the engine failed: {err}", type="engine_error").body(),
                                status_code=503)
        with admit_lock:
            if admitted[0] >= max_queue:
                reject("overloaded")
                e = APIError(503, f"the server is at its limit of {max_queue} requests; retry shortly",
                             type="overloaded_error")
                return JSONResponse(e.body(), status_code=503, headers={"Retry-After": "1"})
            admitted[0] += 1
        deadline = time.monotonic() + request_timeout_s

        def release():
            with admit_lock:
                admitted[0] -= 1

        timeout_error = APIError(408, f"the request exceeded its time limit of {request_timeout_s:g} s",
                                 type="timeout_error")
        rid = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "text_completion" if kind == "completion" else "chat.completion"

        def choice_delta(i: int, text: str, finish: str | None) -> dict:
            if kind == "completion":
                return {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
            return {"index": i, "delta": {"content": text} if text else {}, "finish_reason": finish}

        if req.stream:
            async def events():
                head = {"id": rid, "object": obj + ("" if kind == "completion" else ".chunk"), "created": created,
                        "model": engine.model_name}
                generated = 0
                try:
                    for i in range(req.n):
                        seeded = req.model_copy(update={"seed": None if req.seed is None else req.seed + i})
                        if kind == "chat":  # the role comes first, as OpenAI streams it
                            first = {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                            yield f"data: {json.dumps({**head, 'choices': [first]})}\n\n"
                        gen = engine.astream(ids, seeded, deadline)
                        try:
                            async for d in gen:
                                if d.finish_reason == "timeout":
                                    yield f"data: {json.dumps(timeout_error.body())}\n\n"
                                    return
                                generated += d.tokens
                                chunk = {**head, "choices": [choice_delta(i, d.text, d.finish_reason)]}
                                yield f"data: {json.dumps(chunk)}\n\n"
                        finally:
                            await gen.aclose()  # a client that went away cancels the request (state freed)
                    if (req.stream_options or {}).get("include_usage"):
                        usage = {"prompt_tokens": len(ids), "completion_tokens": generated,
                                 "total_tokens": len(ids) + generated}
                        yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    release()
            return StreamingResponse(events(), media_type="text/event-stream")

        async def generate_all():
            choices, completion_tokens = [], 0
            for i in range(req.n):
                seeded = req.model_copy(update={"seed": None if req.seed is None else req.seed + i})
                parts, finish = [], None
                async for d in engine.astream(ids, seeded, deadline):
                    parts.append(d.text)
                    finish = d.finish_reason or finish
                    completion_tokens += d.tokens
                if finish == "timeout":
                    return _error(timeout_error)
                text = "".join(parts)
                choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": finish}
                               if kind == "completion" else
                               {"index": i, "message": {"role": "assistant", "content": text},
                                "finish_reason": finish})
            return {"id": rid, "object": obj, "created": created, "model": engine.model_name, "choices": choices,
                    "usage": {"prompt_tokens": len(ids), "completion_tokens": completion_tokens,
                              "total_tokens": len(ids) + completion_tokens}}

        task = asyncio.ensure_future(generate_all())
        try:
            while True:  # a client that goes away cancels the generation (and frees its decode state)
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    return JSONResponse(APIError(499, "client closed the request").body(), status_code=499)
        finally:
            if not task.done():
                task.cancel()
            release()

    @app.get("/health")
    def health():
        """200 while the engine can generate; 503 naming the error once its backend has failed."""
        err = getattr(engine, "error", None)
        if err is not None:
            return JSONResponse(APIError(503, f"the engine failed: {err}", type="engine_error").body(),
                                status_code=503)
        return {"status": "ok"}

    @app.get("/v1/stats")
    def stats(request: Request):
        """Engine statistics: admitted requests, live sequences and their decode-state bytes, completed."""
        try:
            check_key(request)
        except APIError as e:
            return _error(e)
        return {"admitted_requests": admitted[0], **engine.stats()}

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        """404 / 405 and other routing errors in OpenAI's error shape."""
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type=kind))

    @app.get("/v1/models")
    def models(request: Request):
        try:
            check_key(request)
        except APIError as e:
            return _error(e)
        return {"object": "list", "data": [{"id": engine.model_name, "object": "model", "owned_by": "tide",
                                            "created": 0}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, "chat")

    return app
