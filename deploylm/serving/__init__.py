"""HTTP serving over a Generator: ASGI app, request batcher, request schemas, uvicorn runner.

Starlette and uvicorn (`pip install 'deploylm[serve]'`) are imported only when an app is built.
"""
from __future__ import annotations

from deploylm.serving.schemas import ApiError, ServeConfig


def create_app(generator, config: ServeConfig | None = None):
    """The ASGI app serving `generator` (see deploylm.serving.app)."""
    from deploylm.serving.app import create_app as _create_app

    return _create_app(generator, config)


def serve(generator, config: ServeConfig, *, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info", sock=None) -> None:
    """Serve `generator` over HTTP until SIGTERM/SIGINT (blocking; drains in-flight requests); on `sock`, a
    socket already bound (deploylm.serving.server.bind_address), if given."""
    from deploylm.serving.server import serve as _serve

    _serve(generator, config, host=host, port=port, log_level=log_level, sock=sock)


__all__ = ["ApiError", "ServeConfig", "create_app", "serve"]
