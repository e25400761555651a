"""Embedding deploylm in your own web service: one Generator per process, called from a handler.

The Generator is loaded once and shared by every request; it is thread-safe (calls run one at a
time on the model), so the handler hands the blocking `generate` call to a worker thread and the
event loop stays free. FastAPI is the same (`await run_in_threadpool(...)`, or a plain `def` route);
Flask/Django just call `generator.generate(...)` in the view.

Run it:
    pip install 'deploylm[serve]'
    DEPLOYLM_MODEL=export/smollm2-135m-int8 uvicorn --factory examples.embed_starlette:create_app
    curl -s localhost:8000/complete -d '{"text": "The capital of France is", "max_new_tokens": 16}'

(For a ready-made server with batching, streaming and an OpenAI-style API use `deploylm serve`.)
"""
from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import deploylm
from deploylm.errors import UsageError


def build_app(model: str, backend: str | None = None) -> Starlette:
    """A Starlette app with POST /complete {"text", "max_new_tokens"?} -> {"text", "score"}."""
    generator = deploylm.load(model, backend=backend)  # once per process, shared by all requests

    async def complete(request: Request) -> JSONResponse:
        try:
            body = await request.json()                   # malformed JSON raises ValueError
            text, max_new_tokens = body["text"], body.get("max_new_tokens", 32)
            if not isinstance(text, str):
                raise ValueError(f"'text' must be a string, got {type(text).__name__}")
            if type(max_new_tokens) is not int:           # not 2.7, 1e999 or true
                raise ValueError(f"'max_new_tokens' must be an integer, got {max_new_tokens!r}")
            results = await run_in_threadpool(generator.generate, [text], num_beams=4,
                                              max_new_tokens=max_new_tokens,
                                              max_time=10.0)  # seconds of decoding, after the wait for the model
        except KeyError as exc:
            return JSONResponse({"error": f"bad request: missing field {exc}"}, status_code=400)
        except (TypeError, ValueError, UsageError) as exc:   # including generate's refusals (UsageError)
            return JSONResponse({"error": f"bad request: {exc}"}, status_code=400)
        best = results[0].sequences[0]
        return JSONResponse({"text": best.text, "score": best.score})

    return Starlette(routes=[Route("/complete", complete, methods=["POST"])])


def create_app() -> Starlette:
    """Factory for `uvicorn --factory`: the model comes from $DEPLOYLM_MODEL (and $DEPLOYLM_BACKEND)."""
    return build_app(os.environ["DEPLOYLM_MODEL"], os.environ.get("DEPLOYLM_BACKEND"))
