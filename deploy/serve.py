"""Ray Serve deployment of the OpenAI-compatible app (issue 5, first piece).

``serve run deploy.serve:build path=runs/pipeline`` (or ``tide serve runs/pipeline``)
starts one replica that loads the model (``deploy.loader.load_engine``) and answers
through ``deploy.app``'s FastAPI routes (``serve.ingress``: streaming responses stay
streamed). The API key, when wanted, comes from the environment variable named by
``api_key_env`` (default ``TIDE_API_KEY``), never from arguments or logs: Ray's token
auth does not cover Serve's HTTP port. Serving over the stage actors (placement
group with rack label selectors) and continuous batching come next; this replica
runs one request at a time.
"""

from __future__ import annotations

import os

from ray import serve

from .app import build_app


class _Current:
    """The replica's engine, looked up per request (the FastAPI app exists before the replica loads it)."""

    engine = None
    api_key: str | None = None

    def __getattr__(self, name):
        if _Current.engine is None:
            raise RuntimeError("the model is still loading")
        return getattr(_Current.engine, name)


_app = build_app(_Current(), api_key=lambda: _Current.api_key)


@serve.deployment(max_ongoing_requests=16)
@serve.ingress(_app)
class OpenAIServer:
    """One replica: loads the engine; ``deploy.app``'s routes answer."""

    def __init__(self, path: str, model_name: str | None = None, api_key_env: str = "TIDE_API_KEY"):
        from .loader import load_engine

        _Current.engine = load_engine(path, model_name=model_name)
        _Current.api_key = os.environ.get(api_key_env) or None


def build(args: dict) -> serve.Application:
    """``serve run deploy.serve:build path=RUN_OR_CHECKPOINT [model_name=NAME] [api_key_env=VAR]``."""
    if "path" not in args:
        raise ValueError("deploy.serve:build needs path=<run directory, checkpoint or HF model directory>")
    return OpenAIServer.bind(args["path"], args.get("model_name"), args.get("api_key_env", "TIDE_API_KEY"))
